//! Replicas on a card that turned unhealthy are placed again, where the policy
//! allows: on another card of the same type with room for the same ask (share,
//! memory, labels). Services' replicas and workloads' pods move; the tasks that
//! analysed on a moved replica follow it (their pipeline restarts on the new card)
//! and their detail says so. Where no card has room the replica stays, and the
//! refusal is logged once for that card.
//!
//! Machine packages (CAD mode) are not moved: their placement is the machine's.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::machine::XpuSample;
use crate::runtime::bindings::driver_types::Health;
use crate::scheduler::Scheduler;
use crate::services::Services;
use crate::tasks::Tasks;
use crate::workloads::Workloads;

pub struct Evacuation {
    pub scheduler: Arc<Scheduler>,
    pub services: Arc<Services>,
    pub workloads: Arc<Workloads>,
    pub tasks: Arc<Tasks>,
    /// (owner, position, card) whose move was refused: said once, tried again
    /// every round.
    refused: Mutex<HashSet<(String, usize, String)>>,
}

impl Evacuation {
    pub fn new(
        scheduler: Arc<Scheduler>,
        services: Arc<Services>,
        workloads: Arc<Workloads>,
        tasks: Arc<Tasks>,
    ) -> Evacuation {
        Evacuation {
            scheduler,
            services,
            workloads,
            tasks,
            refused: Mutex::new(HashSet::new()),
        }
    }

    /// Runs a round every `interval`, on the cards `xpus` reads (the sampler's).
    pub fn spawn(
        self,
        interval: std::time::Duration,
        xpus: impl Fn() -> Vec<XpuSample> + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::new(self);
        let xpus = Arc::new(xpus);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (this, xpus) = (this.clone(), xpus.clone());
                // Moves call drivers and start workers: off the async threads.
                if let Err(e) = tokio::task::spawn_blocking(move || this.run_once(&xpus())).await {
                    tracing::error!("evacuation round failed: {e}");
                }
            }
        })
    }

    /// Moves what sits on the unhealthy cards among `xpus`. Blocking.
    pub fn run_once(&self, xpus: &[XpuSample]) {
        let unhealthy: Vec<(String, u32)> = xpus
            .iter()
            .filter(|x| x.health == Health::Unhealthy)
            .filter_map(|x| x.card().map(|(driver, index)| (driver.to_string(), index)))
            .collect();
        if unhealthy.is_empty() {
            crate::sync::lock(&self.refused).clear();
            return;
        }
        for (owner, index, placement) in self.scheduler.placed_on(&unhealthy) {
            let from = placement.card_name();
            let moved = if let Some(id) = owner.strip_prefix("service:") {
                self.services
                    .move_replica(id, index, &placement, xpus)
                    .map(|moved| {
                        if let Some(old) = &moved.replaced {
                            self.tasks.follow_moved_replica(
                                old,
                                &moved.from,
                                &moved.to,
                                "card unhealthy",
                            );
                        }
                        moved.to
                    })
            } else if let Some(key) = owner.strip_prefix("workload:") {
                self.workloads
                    .move_pod(key, index, &placement, xpus)
                    .map(|(_, to)| to)
            } else {
                continue;
            };
            let mut refused = crate::sync::lock(&self.refused);
            match moved {
                Ok(to) => {
                    refused.remove(&(owner.clone(), index, from.clone()));
                    tracing::warn!(%owner, replica = index, %from, %to, "replica moved off an unhealthy card");
                }
                Err(e) => {
                    if refused.insert((owner.clone(), index, from.clone())) {
                        tracing::error!(%owner, replica = index, card = %from, "replica stays on an unhealthy card: {e}");
                    }
                }
            }
        }
    }
}
