//! Events out: a durable queue per task, and a delivery loop per task that empties
//! it in order.
//!
//! A frame's events are written to the queue (SQLite, the same durable store as
//! every object) before analysis goes on, and deleted once the destination has
//! taken them: a receiver that is down, a restart or `kill -9` loses nothing up to
//! the bound. Past the bound the oldest are dropped, counted, and said. Delivery
//! runs on its own task: a slow receiver grows the queue, never the frame latency.
//! Each event carries an `eventId` made when it was queued, so a receiver can drop
//! the duplicate a retry after a lost answer makes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::Store;

/// Events queued per task before the oldest are dropped.
pub const MAX_QUEUED_PER_TASK: u64 = 10_000;
/// Events read from the queue at a time.
const BATCH: usize = 64;
/// Retry backoff: doubling from the first, capped.
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// One POST may take this long.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a rule's events go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Destination {
    /// G.2 `HTTPDest`: a POST of each event's JSON.
    Http { url: String },
}

/// Delivery counters of one task.
#[derive(Debug, Default)]
pub struct Delivery {
    pub delivered: AtomicU64,
    /// Dropped past the queue bound (oldest first).
    pub dropped: AtomicU64,
    /// Why the last attempt failed, while deliveries fail.
    pub last_error: Mutex<Option<String>>,
}

struct Loop {
    wake: Arc<tokio::sync::Notify>,
    handle: tokio::task::JoinHandle<()>,
    delivery: Arc<Delivery>,
}

/// The queue and the delivery loops.
pub struct Outbox {
    store: Arc<Store>,
    client: reqwest::Client,
    loops: Mutex<HashMap<String, Loop>>,
    runtime: tokio::runtime::Handle,
}

impl Outbox {
    /// Must be called inside the tokio runtime that runs the delivery loops.
    pub fn new(store: Arc<Store>) -> anyhow::Result<Arc<Outbox>> {
        let client = reqwest::Client::builder()
            .timeout(POST_TIMEOUT)
            .build()
            .map_err(|e| anyhow::anyhow!("event delivery client: {e}"))?;
        Ok(Arc::new(Outbox {
            store,
            client,
            loops: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    /// Starts the delivery loop of `task` (a no-op if it runs): at start for every
    /// live task, so that what was queued before a restart goes out.
    pub fn open(self: &Arc<Self>, task: &str) -> Arc<Delivery> {
        let mut loops = crate::sync::lock(&self.loops);
        if let Some(existing) = loops.get(task) {
            return existing.delivery.clone();
        }
        let wake = Arc::new(tokio::sync::Notify::new());
        let delivery = Arc::new(Delivery::default());
        let handle = self.runtime.spawn(deliver(
            self.clone(),
            task.to_string(),
            wake.clone(),
            delivery.clone(),
        ));
        loops.insert(
            task.to_string(),
            Loop {
                wake,
                handle,
                delivery: delivery.clone(),
            },
        );
        delivery
    }

    /// The delivery counters of `task`, if its loop runs.
    pub fn delivery(&self, task: &str) -> Option<Arc<Delivery>> {
        crate::sync::lock(&self.loops)
            .get(task)
            .map(|l| l.delivery.clone())
    }

    /// Events waiting for `task`.
    pub fn queued(&self, task: &str) -> u64 {
        self.store
            .with(|conn| {
                conn.query_row(
                    "SELECT COUNT(*) FROM event_queue WHERE task_id = ?1",
                    [task],
                    |row| row.get::<_, i64>(0),
                )
            })
            .map_or(0, |n| n.max(0) as u64)
    }

    /// Queues `events` (JSON documents) for `destination`, durably; drops the
    /// oldest of the task past the bound. Blocking (one SQLite transaction).
    pub fn enqueue(&self, task: &str, destination: &Destination, events: &[String]) {
        let destination = match serde_json::to_string(destination) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(%task, "cannot queue events: {e}");
                return;
            }
        };
        let dropped = self.store.with(|conn| {
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO event_queue (task_id, destination, body) VALUES (?1, ?2, ?3)",
                )?;
                for event in events {
                    insert.execute((task, &destination, event))?;
                }
            }
            let queued: i64 = tx.query_row(
                "SELECT COUNT(*) FROM event_queue WHERE task_id = ?1",
                [task],
                |row| row.get(0),
            )?;
            let over = (queued - MAX_QUEUED_PER_TASK as i64).max(0);
            if over > 0 {
                tx.execute(
                    "DELETE FROM event_queue WHERE seq IN \
                     (SELECT seq FROM event_queue WHERE task_id = ?1 ORDER BY seq LIMIT ?2)",
                    (task, over),
                )?;
            }
            tx.commit()?;
            Ok(over as u64)
        });
        let loops = crate::sync::lock(&self.loops);
        let delivery = loops.get(task);
        match dropped {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(%task, dropped = n, bound = MAX_QUEUED_PER_TASK, "event queue full: the oldest events were dropped");
                if let Some(l) = delivery {
                    l.delivery.dropped.fetch_add(n, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::error!(%task, "cannot queue events (they are lost): {e:#}"),
        }
        if let Some(l) = delivery {
            l.wake.notify_one();
        }
    }

    /// Stops every delivery loop (server shutdown); the queue stays for the next
    /// start.
    pub fn close_all(&self) {
        for (_, l) in crate::sync::lock(&self.loops).drain() {
            l.handle.abort();
        }
    }

    /// Stops `task`'s delivery and deletes what it had queued (the task is gone).
    pub fn forget(&self, task: &str) {
        if let Some(l) = crate::sync::lock(&self.loops).remove(task) {
            l.handle.abort();
        }
        if let Err(e) = self
            .store
            .with(|conn| conn.execute("DELETE FROM event_queue WHERE task_id = ?1", [task]))
        {
            tracing::warn!(%task, "cannot delete the task's queued events: {e:#}");
        }
    }

    fn oldest(&self, task: &str) -> anyhow::Result<Vec<(i64, String, String)>> {
        self.store.with(|conn| {
            let mut select = conn.prepare_cached(
                "SELECT seq, destination, body FROM event_queue WHERE task_id = ?1 \
                 ORDER BY seq LIMIT ?2",
            )?;
            let rows = select.query_map((task, BATCH as i64), |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })?;
            rows.collect()
        })
    }

    fn delivered(&self, seq: i64) -> anyhow::Result<()> {
        self.store
            .with(|conn| conn.execute("DELETE FROM event_queue WHERE seq = ?1", [seq]))
            .map(|_| ())
    }
}

/// Empties `task`'s queue in order, for as long as the task lives.
async fn deliver(
    outbox: Arc<Outbox>,
    task: String,
    wake: Arc<tokio::sync::Notify>,
    delivery: Arc<Delivery>,
) {
    loop {
        let batch = {
            let (outbox, task) = (outbox.clone(), task.clone());
            tokio::task::spawn_blocking(move || outbox.oldest(&task)).await
        };
        let batch = match batch {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => {
                tracing::error!(%task, "cannot read the event queue: {e:#}");
                tokio::time::sleep(MAX_RETRY).await;
                continue;
            }
            Err(_) => return,
        };
        if batch.is_empty() {
            // A notify_one before this wait is kept: no enqueue is missed.
            wake.notified().await;
            continue;
        }
        for (seq, destination, body) in batch {
            let destination: Destination = match serde_json::from_str(&destination) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(%task, seq, "queued event with an unreadable destination dropped: {e}");
                    delivery.dropped.fetch_add(1, Ordering::Relaxed);
                    let _ = outbox.delivered(seq);
                    continue;
                }
            };
            let mut attempt = 0u32;
            loop {
                match send(&outbox.client, &destination, &body).await {
                    Ok(()) => break,
                    Err(why) => {
                        attempt += 1;
                        let wait = (FIRST_RETRY * (1 << attempt.min(8))).min(MAX_RETRY);
                        remember(&task, &delivery, why);
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            crate::sync::lock(&delivery.last_error).take();
            delivery.delivered.fetch_add(1, Ordering::Relaxed);
            let (outbox, task) = (outbox.clone(), task.clone());
            let deleted = tokio::task::spawn_blocking(move || outbox.delivered(seq)).await;
            if let Ok(Err(e)) = deleted {
                tracing::error!(%task, seq, "delivered event stays queued (it will be sent again): {e:#}");
            }
        }
    }
}

/// Records a delivery failure (logged when it differs from the last one).
fn remember(task: &str, delivery: &Delivery, why: String) {
    let mut last = crate::sync::lock(&delivery.last_error);
    if last.as_deref() != Some(why.as_str()) {
        tracing::warn!(%task, "event delivery failed, retrying: {why}");
    }
    *last = Some(why);
}

async fn send(
    client: &reqwest::Client,
    destination: &Destination,
    body: &str,
) -> Result<(), String> {
    match destination {
        Destination::Http { url } => {
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .map_err(|e| format!("POST {url}: {e}"))?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(format!("POST {url}: {}", response.status()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the bound the oldest events go, counted; the newest stay, in order.
    #[test]
    fn the_queue_keeps_the_newest_up_to_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("xpud.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let outbox = runtime.block_on(async { Outbox::new(store).unwrap() });
        // A receiver nobody serves: nothing leaves the queue.
        let delivery = runtime.block_on(async { outbox.open("t") });
        let nowhere = Destination::Http {
            url: "http://127.0.0.1:9/events".into(),
        };
        let events: Vec<String> = (0..MAX_QUEUED_PER_TASK + 5)
            .map(|i| i.to_string())
            .collect();
        outbox.enqueue("t", &nowhere, &events);
        assert_eq!(outbox.queued("t"), MAX_QUEUED_PER_TASK);
        assert_eq!(delivery.dropped.load(Ordering::Relaxed), 5);
        let oldest = outbox.oldest("t").unwrap();
        assert_eq!(oldest[0].2, "5", "the five oldest went");
        outbox.forget("t");
        assert_eq!(outbox.queued("t"), 0);
    }
}
