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
//!
//! - `http`: `HTTPDest`, a POST per event;
//! - `kafka`: `eventDest.mqDest`, records on a Kafka topic.

mod http;
mod kafka;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::store::Store;

/// Events queued per task before the oldest are dropped.
pub const MAX_QUEUED_PER_TASK: u64 = 10_000;
/// Bytes of events queued per task before the oldest are dropped: events with
/// images are large, and `[video] max-running-tasks` of these bound the disk.
pub const MAX_QUEUED_BYTES_PER_TASK: u64 = 64 * 1024 * 1024;
/// Events read from the queue at a time.
const BATCH: usize = 64;
/// Consecutive events for one Kafka topic go in one request up to this many bytes
/// (brokers take 1 MB per request by default).
const KAFKA_REQUEST_BYTES: usize = 512 * 1024;
/// Retry backoff: doubling from the first, capped.
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Where a rule's events go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Destination {
    /// G.2 `HTTPDest`: a POST of each event's JSON.
    Http { url: String },
    /// G.2 `eventDest.mqDest` of type KAFKA: a record per event on `topic`.
    Kafka { brokers: Vec<String>, topic: String },
}

/// Why a delivery did not happen.
#[derive(Debug)]
pub(crate) enum Failed {
    /// Worth another try (receiver down, broker unreachable, topic missing).
    Retry(String),
    /// The destination will never take it (too large): dropped, counted.
    Refused(String),
}

/// Delivery counters of one task.
#[derive(Debug, Default)]
pub struct Delivery {
    pub delivered: AtomicU64,
    /// Dropped past the queue bound (oldest first).
    pub dropped: AtomicU64,
    /// Refused for good by the destination (too large), and so dropped.
    pub refused: AtomicU64,
    /// Bytes of the events queued (their documents).
    pub queued_bytes: AtomicU64,
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
    http: reqwest::Client,
    kafka: kafka::Producers,
    loops: Mutex<HashMap<String, Loop>>,
    runtime: tokio::runtime::Handle,
}

impl Outbox {
    /// Must be called inside the tokio runtime that runs the delivery loops.
    pub fn new(store: Arc<Store>) -> anyhow::Result<Arc<Outbox>> {
        Ok(Arc::new(Outbox {
            store,
            http: http::client()?,
            kafka: kafka::Producers::default(),
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
        let queued_bytes = self.store.with(|conn| {
            conn.query_row(
                "SELECT COALESCE(SUM(octet_length(body)), 0) FROM event_queue WHERE task_id = ?1",
                [task],
                |row| row.get::<_, i64>(0),
            )
        });
        match queued_bytes {
            Ok(bytes) => delivery
                .queued_bytes
                .store(bytes.max(0) as u64, Ordering::Relaxed),
            Err(e) => tracing::error!(%task, "cannot size the event queue: {e:#}"),
        }
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

    /// Events waiting, by task (one query for every task).
    pub fn queued_by_task(&self) -> HashMap<String, u64> {
        let counted = self.store.with(|conn| {
            let mut select =
                conn.prepare_cached("SELECT task_id, COUNT(*) FROM event_queue GROUP BY task_id")?;
            let rows = select.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)?.max(0) as u64,
                ))
            })?;
            rows.collect::<rusqlite::Result<HashMap<_, _>>>()
        });
        counted.unwrap_or_else(|e| {
            tracing::warn!("cannot count the queued events: {e:#}");
            HashMap::new()
        })
    }

    /// Queues `events` (JSON documents) for `destination`, durably; drops the
    /// oldest of the task past the bounds. Blocking (one SQLite transaction).
    pub fn enqueue(&self, task: &str, destination: &Destination, events: &[String]) {
        let destination = match serde_json::to_string(destination) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(%task, "cannot queue events: {e}");
                return;
            }
        };
        // Not held across the transaction: reads of other tasks' counters go on.
        let (delivery, wake) = crate::sync::lock(&self.loops)
            .get(task)
            .map(|l| (l.delivery.clone(), l.wake.clone()))
            .unzip();
        let added: u64 = events.iter().map(|e| e.len() as u64).sum();
        let bytes = delivery
            .as_ref()
            .map_or(0, |d| d.queued_bytes.load(Ordering::Relaxed))
            + added;
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
            let mut over_count = (queued - MAX_QUEUED_PER_TASK as i64).max(0) as u64;
            let mut over_bytes = bytes.saturating_sub(MAX_QUEUED_BYTES_PER_TASK);
            let (mut count, mut freed) = (0u64, 0u64);
            // The oldest go, read a few at a time: a queue held at its bound (a
            // receiver down for long) drops a handful per frame, not a scan of
            // the whole queue.
            let mut oldest = tx.prepare_cached(
                "SELECT seq, octet_length(body) FROM event_queue WHERE task_id = ?1 \
                 ORDER BY seq LIMIT ?2",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM event_queue WHERE seq = ?1")?;
            while over_count > 0 || over_bytes > 0 {
                let chunk: Vec<(i64, i64)> = oldest
                    .query_map((task, over_count.clamp(1, 64) as i64), |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                if chunk.is_empty() {
                    break;
                }
                for (seq, size) in chunk {
                    if over_count == 0 && over_bytes == 0 {
                        break;
                    }
                    delete.execute([seq])?;
                    let size = size.max(0) as u64;
                    over_count = over_count.saturating_sub(1);
                    over_bytes = over_bytes.saturating_sub(size);
                    count += 1;
                    freed += size;
                }
            }
            drop((oldest, delete));
            tx.commit()?;
            Ok((count, freed))
        });
        match dropped {
            Ok((count, freed)) => {
                if let Some(d) = &delivery {
                    let _ =
                        d.queued_bytes
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                                Some((b + added).saturating_sub(freed))
                            });
                    d.dropped.fetch_add(count, Ordering::Relaxed);
                }
                if count > 0 {
                    tracing::warn!(%task, dropped = count, bound = MAX_QUEUED_PER_TASK, bound_bytes = MAX_QUEUED_BYTES_PER_TASK, "event queue full: the oldest events were dropped");
                }
            }
            Err(e) => {
                // Lost, not queued: counted with the dropped, so that the task's
                // figures add up (a full disk shows as drops, not as nothing).
                if let Some(d) = &delivery {
                    d.dropped.fetch_add(events.len() as u64, Ordering::Relaxed);
                }
                tracing::error!(%task, lost = events.len(), "cannot queue events (they are lost): {e:#}");
            }
        }
        if let Some(wake) = wake {
            wake.notify_one();
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

    fn oldest(&self, task: &str) -> anyhow::Result<Vec<Queued>> {
        self.store.with(|conn| {
            let mut select = conn.prepare_cached(
                "SELECT seq, destination, body FROM event_queue WHERE task_id = ?1 \
                 ORDER BY seq LIMIT ?2",
            )?;
            let rows = select.query_map((task, BATCH as i64), |row| {
                Ok(Queued {
                    seq: row.get(0)?,
                    destination: row.get(1)?,
                    body: row.get(2)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Deletes `events` from the queue; returns the bytes that left it (an event
    /// the bound dropped meanwhile is not counted twice).
    fn delivered(&self, events: &[(i64, usize)]) -> anyhow::Result<u64> {
        self.store.with(|conn| {
            let tx = conn.transaction()?;
            let mut freed = 0;
            {
                let mut delete = tx.prepare_cached("DELETE FROM event_queue WHERE seq = ?1")?;
                for (seq, size) in events {
                    if delete.execute([seq])? > 0 {
                        freed += *size as u64;
                    }
                }
            }
            tx.commit()?;
            Ok(freed)
        })
    }

    /// Sends `run` (events for one destination, oldest first) in one go where
    /// the destination takes several at once.
    async fn send(
        &self,
        task: &str,
        destination: &Destination,
        run: &[Queued],
    ) -> Result<(), Failed> {
        match destination {
            Destination::Http { url } => http::post(&self.http, url, &run[0].body).await,
            Destination::Kafka { brokers, topic } => {
                let values: Vec<&str> = run.iter().map(|q| q.body.as_str()).collect();
                self.kafka.produce(brokers, topic, task, &values).await
            }
        }
    }
}

/// An event in the queue.
struct Queued {
    seq: i64,
    destination: String,
    body: String,
}

/// How many of `batch` (from the first) go in one request.
fn run_length(destination: &Destination, batch: &[Queued], single: bool) -> usize {
    if single || matches!(destination, Destination::Http { .. }) {
        return 1;
    }
    let mut bytes = 0;
    batch
        .iter()
        .take_while(|q| {
            bytes += q.body.len();
            q.destination == batch[0].destination && bytes <= KAFKA_REQUEST_BYTES
        })
        .count()
        .max(1)
}

/// Empties `task`'s queue in order, for as long as the task lives.
async fn deliver(
    outbox: Arc<Outbox>,
    task: String,
    wake: Arc<tokio::sync::Notify>,
    delivery: Arc<Delivery>,
) {
    // After a request of several events was refused as too large: one at a time
    // until the next success, so only the event that is too large is dropped.
    let mut single = false;
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
        let mut next = 0;
        while next < batch.len() {
            let first = &batch[next];
            let destination: Destination = match serde_json::from_str(&first.destination) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(%task, seq = first.seq, "queued event with an unreadable destination dropped: {e}");
                    delivery.refused.fetch_add(1, Ordering::Relaxed);
                    forget(
                        &outbox,
                        &task,
                        &delivery,
                        vec![(first.seq, first.body.len())],
                    )
                    .await;
                    next += 1;
                    continue;
                }
            };
            let run = &batch[next..next + run_length(&destination, &batch[next..], single)];
            let mut attempt = 0u32;
            let sent = loop {
                match outbox.send(&task, &destination, run).await {
                    Ok(()) => break Ok(()),
                    Err(Failed::Refused(why)) => break Err(why),
                    Err(Failed::Retry(why)) => {
                        attempt += 1;
                        let wait = (FIRST_RETRY * (1 << attempt.min(8))).min(MAX_RETRY);
                        remember(&task, &delivery, why);
                        tokio::time::sleep(wait).await;
                    }
                }
            };
            match sent {
                Ok(()) => {
                    single = false;
                    crate::sync::lock(&delivery.last_error).take();
                    delivery
                        .delivered
                        .fetch_add(run.len() as u64, Ordering::Relaxed);
                }
                Err(why) if run.len() > 1 => {
                    tracing::info!(%task, events = run.len(), "refused as too large, sending one at a time: {why}");
                    single = true;
                    continue;
                }
                Err(why) => {
                    tracing::error!(%task, seq = run[0].seq, "event refused by its destination, dropped: {why}");
                    delivery.refused.fetch_add(1, Ordering::Relaxed);
                    *crate::sync::lock(&delivery.last_error) = Some(why);
                }
            }
            let sent = run.iter().map(|q| (q.seq, q.body.len())).collect();
            forget(&outbox, &task, &delivery, sent).await;
            next += run.len();
        }
    }
}

/// Deletes events that left (or were refused) from the queue: (seq, bytes).
async fn forget(outbox: &Arc<Outbox>, task: &str, delivery: &Delivery, events: Vec<(i64, usize)>) {
    let outbox = outbox.clone();
    let deleted = tokio::task::spawn_blocking(move || outbox.delivered(&events)).await;
    match deleted {
        Ok(Ok(freed)) => {
            let _ = delivery
                .queued_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    Some(b.saturating_sub(freed))
                });
        }
        Ok(Err(e)) => {
            tracing::error!(%task, "delivered events stay queued (they will be sent again): {e:#}")
        }
        Err(_) => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An outbox over a store in `dir`, with task "t" open and a destination
    /// nobody serves (nothing leaves the queue).
    struct Queue {
        store: Arc<Store>,
        runtime: tokio::runtime::Runtime,
        outbox: Arc<Outbox>,
        delivery: Arc<Delivery>,
        nowhere: Destination,
    }

    fn queue(dir: &std::path::Path) -> Queue {
        let store = Arc::new(Store::open(&dir.join("xpud.db")).unwrap());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let outbox = runtime.block_on(async { Outbox::new(store.clone()).unwrap() });
        let delivery = runtime.block_on(async { outbox.open("t") });
        let nowhere = Destination::Http {
            url: "http://127.0.0.1:9/events".into(),
        };
        Queue {
            store,
            runtime,
            outbox,
            delivery,
            nowhere,
        }
    }

    /// Past the bound the oldest events go, counted; the newest stay, in order.
    #[test]
    fn the_queue_keeps_the_newest_up_to_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let Queue {
            runtime: _runtime,
            outbox,
            delivery,
            nowhere,
            ..
        } = queue(dir.path());
        let events: Vec<String> = (0..MAX_QUEUED_PER_TASK + 5)
            .map(|i| i.to_string())
            .collect();
        outbox.enqueue("t", &nowhere, &events);
        assert_eq!(outbox.queued("t"), MAX_QUEUED_PER_TASK);
        assert_eq!(delivery.dropped.load(Ordering::Relaxed), 5);
        let oldest = outbox.oldest("t").unwrap();
        assert_eq!(oldest[0].body, "5", "the five oldest went");
        outbox.forget("t");
        assert_eq!(outbox.queued("t"), 0);
    }

    /// Events the store could not take (a full disk) are lost, and counted as
    /// dropped; the queue is as it was.
    #[test]
    fn events_the_store_cannot_take_are_counted_as_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let Queue {
            store,
            runtime: _runtime,
            outbox,
            delivery,
            nowhere,
        } = queue(dir.path());
        outbox.enqueue("t", &nowhere, &["kept".to_string()]);
        store
            .with(|conn| {
                conn.execute_batch(
                    "CREATE TRIGGER full BEFORE INSERT ON event_queue \
                     BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END;",
                )
            })
            .unwrap();
        outbox.enqueue("t", &nowhere, &["a".to_string(), "b".to_string()]);
        assert_eq!(delivery.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(outbox.queued("t"), 1);
        assert_eq!(delivery.queued_bytes.load(Ordering::Relaxed), 4);
        outbox.close_all();
    }

    /// Events with images are large: past the byte bound the oldest go too, and
    /// the queue's size is known again after a restart.
    #[test]
    fn the_queue_keeps_the_newest_up_to_its_byte_bound() {
        let dir = tempfile::tempdir().unwrap();
        let Queue {
            store,
            runtime,
            outbox,
            delivery,
            nowhere,
        } = queue(dir.path());
        let mib = 1024 * 1024;
        let limit = (MAX_QUEUED_BYTES_PER_TASK / mib) as usize;
        for i in 0..limit + 6 {
            let event = format!("{i:08}{}", " ".repeat(mib as usize - 8));
            outbox.enqueue("t", &nowhere, &[event]);
        }
        assert_eq!(outbox.queued("t"), limit as u64);
        assert_eq!(delivery.dropped.load(Ordering::Relaxed), 6);
        assert_eq!(
            delivery.queued_bytes.load(Ordering::Relaxed),
            MAX_QUEUED_BYTES_PER_TASK
        );
        assert_eq!(&outbox.oldest("t").unwrap()[0].body[..8], "00000006");
        outbox.close_all();
        let again = runtime.block_on(async { Outbox::new(store).unwrap() });
        let delivery = runtime.block_on(async { again.open("t") });
        assert_eq!(
            delivery.queued_bytes.load(Ordering::Relaxed),
            MAX_QUEUED_BYTES_PER_TASK
        );
        again.forget("t");
    }
}
