//! `GET /metrics`: what xpud observes, in the OpenMetrics text format Prometheus
//! scrapes, rendered by `prometheus-client`.
//!
//! Nothing here is kept twice: every scrape reads the same sources the API does
//! (the sampler's driver snapshots, the machine's latest sample, the scheduler's
//! ledger, the plugins' supervisors, the tasks' pipelines and queues, the model
//! sessions) and never calls a plugin, so a driver that hangs cannot delay it.
//! Card figures carry DCGM exporter's names and labels (`DCGM_FI_DEV_GPU_UTIL`
//! with `gpu`, `UUID`, `modelName`, `Hostname`), so dashboards made for NVIDIA's
//! exporter read xpud's cards of any vendor; the rest are `xpud_*`. A figure a
//! driver did not report is absent, never 0; a driver whose figures went stale
//! has none.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry as Exposition;

use crate::machine::Machine;
use crate::plugins::calls::{Latency, BUCKETS};
use crate::plugins::supervisor::Health;
use crate::plugins::{Kind, Registry};
use crate::sampler::SampleCache;
use crate::scheduler::Scheduler;
use crate::tasks::{TaskStatus, Tasks};

/// The media type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

/// Where the figures come from.
pub struct Sources {
    pub registry: Arc<Registry>,
    pub samples: Arc<SampleCache>,
    pub machine: Arc<Machine>,
    pub scheduler: Arc<Scheduler>,
    pub tasks: Arc<Tasks>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("metrics::Sources")
    }
}

/// The exposition, rendered per scrape.
pub struct Metrics {
    exposition: Exposition,
}

impl Metrics {
    pub fn new(sources: Sources) -> Metrics {
        let mut exposition = Exposition::default();
        exposition.register_collector(Box::new(sources));
        Metrics { exposition }
    }

    /// The OpenMetrics text of everything observed now.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(64 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.exposition)?;
        Ok(text)
    }
}

type Labels = Vec<(&'static str, String)>;

/// A family of `metric_type` from its samples, each written by `sample`; none at
/// all when there are no samples.
fn family<T>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: &[(Labels, T)],
    sample: impl Fn(&T, MetricEncoder) -> std::fmt::Result,
) -> std::fmt::Result {
    if samples.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in samples {
        sample(value, family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, f64)],
) -> std::fmt::Result {
    family(encoder, name, help, MetricType::Gauge, samples, |v, e| {
        ConstGauge::new(*v).encode(e)
    })
}

/// Counters (`name` without `_total`, which the encoding adds).
fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, u64)],
) -> std::fmt::Result {
    family(encoder, name, help, MetricType::Counter, samples, |v, e| {
        ConstCounter::new(*v).encode(e)
    })
}

/// Histograms over `BUCKETS`.
fn histograms(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, Latency)],
) -> std::fmt::Result {
    family(
        encoder,
        name,
        help,
        MetricType::Histogram,
        samples,
        |latency, mut e| {
            let buckets: Vec<(f64, u64)> = BUCKETS
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(latency.buckets)
                .collect();
            e.encode_histogram::<NoLabelSet>(latency.seconds, latency.count, &buckets, None)
        },
    )
}

/// A state set: one sample per state, 1 for the current one.
fn states(labels: &Labels, all: &[&'static str], current: &str, into: &mut Vec<(Labels, f64)>) {
    for state in all {
        let mut labels = labels.clone();
        labels.push(("state", (*state).to_string()));
        into.push((labels, if *state == current { 1.0 } else { 0.0 }));
    }
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let host = self.machine.facts().host_name.clone();
        self.cards(&mut encoder, &host)?;
        self.host(&mut encoder, &host)?;
        self.plugins(&mut encoder)?;
        self.tasks(&mut encoder)?;
        self.inference(&mut encoder)
    }
}

impl Sources {
    /// Cards and their instances (partitions), from the drivers' current samples.
    fn cards(&self, encoder: &mut DescriptorEncoder, host: &str) -> std::fmt::Result {
        let owners = self.scheduler.partition_owners();
        let mut f = CardFamilies::default();
        for (driver, _) in self.registry.drivers() {
            let Some(snapshot) = self.samples.get(&driver) else {
                continue;
            };
            let metrics: HashMap<u32, _> = snapshot
                .metrics
                .cards
                .iter()
                .map(|c| (c.device_index, c))
                .collect();
            let mut card_labels: HashMap<u32, Labels> = HashMap::new();
            for device in snapshot.devices.iter() {
                let labels: Labels = vec![
                    ("gpu", device.index.to_string()),
                    (
                        "UUID",
                        device.uuid.clone().unwrap_or_else(|| device.id.clone()),
                    ),
                    ("modelName", device.accelerator_type.clone()),
                    ("Hostname", host.to_string()),
                    ("driver", driver.clone()),
                ];
                let mut info = labels.clone();
                info.push(("pci_bus_id", device.pci_bus_id.clone().unwrap_or_default()));
                info.push(("simulated", snapshot.simulated.to_string()));
                f.info.push((info, 1.0));
                states(
                    &labels,
                    &["healthy", "degraded", "unhealthy", "unknown"],
                    crate::sampler::health_name(device.health),
                    &mut f.health,
                );
                if let Some(card) = metrics.get(&device.index) {
                    let total = card.memory_total_mib.or(device.memory_total_mib);
                    let put = |into: &mut Vec<(Labels, f64)>, value: Option<f64>| {
                        if let Some(value) = value {
                            into.push((labels.clone(), value));
                        }
                    };
                    put(&mut f.util, card.ai_utilization_pct.map(f64::from));
                    put(&mut f.fb_used, card.memory_used_mib.map(|m| m as f64));
                    put(&mut f.fb_total, total.map(|m| m as f64));
                    put(
                        &mut f.fb_free,
                        total
                            .zip(card.memory_used_mib)
                            .map(|(t, u)| t.saturating_sub(u) as f64),
                    );
                    put(
                        &mut f.dec_util,
                        card.video_decode_utilization_pct.map(f64::from),
                    );
                    put(
                        &mut f.jpeg_util,
                        card.picture_decode_utilization_pct.map(f64::from),
                    );
                    put(&mut f.temp, card.temperature_celsius.map(f64::from));
                    put(&mut f.power, card.power_watts.map(f64::from));
                }
                card_labels.insert(device.index, labels);
            }
            for instance in &snapshot.metrics.instances {
                let Some(card) = card_labels.get(&instance.device_index) else {
                    continue;
                };
                let mut labels = card.clone();
                labels.push(("partition", instance.partition_id.clone()));
                let owner = owners
                    .get(&(driver.clone(), instance.partition_id.clone()))
                    .cloned()
                    .unwrap_or_default();
                labels.push(("owner", owner));
                if let Some(util) = instance.ai_utilization_pct {
                    f.instance_util.push((labels.clone(), f64::from(util)));
                }
                if let Some(used) = instance.memory_used_mib {
                    f.instance_used.push((labels.clone(), used as f64));
                }
                f.instance_quota
                    .push((labels, instance.memory_quota_mib as f64));
            }
        }
        f.encode(encoder)
    }

    /// The machine's latest sample.
    fn host(&self, encoder: &mut DescriptorEncoder, host: &str) -> std::fmt::Result {
        let Some(sample) = self.machine.latest() else {
            return Ok(());
        };
        let labels = || vec![("Hostname", host.to_string())];
        let one = |value: f64| vec![(labels(), value)];
        gauges(
            encoder,
            "xpud_host_cpu_utilization_ratio",
            "CPU utilisation over all cores, 0-1.",
            &one(sample.cpu_utilization),
        )?;
        gauges(
            encoder,
            "xpud_host_memory_used_bytes",
            "Memory in use.",
            &one(sample.memory_used_gb * GIB),
        )?;
        gauges(
            encoder,
            "xpud_host_memory_total_bytes",
            "Memory installed.",
            &one(sample.memory_total_gb * GIB),
        )?;
        let disk = |value: Option<f64>| {
            value
                .map(|gb| vec![(labels(), gb * GIB)])
                .unwrap_or_default()
        };
        gauges(
            encoder,
            "xpud_host_disk_used_bytes",
            "Space used on the data directory's disk.",
            &disk(sample.disk_used_gb),
        )?;
        gauges(
            encoder,
            "xpud_host_disk_total_bytes",
            "Size of the data directory's disk.",
            &disk(sample.disk_total_gb),
        )?;
        gauges(
            encoder,
            "xpud_host_network_receive_bytes_per_second",
            "Bytes received per second over every non-loopback interface, between the last two samples.",
            &one(sample.net_rx_bps),
        )?;
        gauges(
            encoder,
            "xpud_host_network_transmit_bytes_per_second",
            "Bytes sent per second over every non-loopback interface, between the last two samples.",
            &one(sample.net_tx_bps),
        )
    }

    /// The plugins: loaded or refused, and how their supervised instances fare.
    fn plugins(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let (mut state, mut health, mut restarts, mut crashes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut logs_dropped, mut refused, mut stale) = (Vec::new(), Vec::new(), Vec::new());
        for view in self.registry.views() {
            let kind = match view.kind {
                Some(Kind::Driver) => "driver",
                Some(Kind::Algorithm) => "algorithm",
                None => "",
            };
            let labels: Labels = vec![("plugin", view.name.clone()), ("kind", kind.to_string())];
            states(&labels, &["loaded", "refused"], view.state, &mut state);
            logs_dropped.push((labels.clone(), view.log_lines_dropped));
            if let Some(status) = &view.instance {
                let current = match status.health {
                    Health::Idle => "idle",
                    Health::Running => "running",
                    Health::Restarting { .. } => "restarting",
                    Health::StartFailed { .. } => "start_failed",
                    Health::Unhealthy { .. } => "unhealthy",
                };
                states(
                    &labels,
                    &["idle", "running", "restarting", "start_failed", "unhealthy"],
                    current,
                    &mut health,
                );
                restarts.push((labels.clone(), u64::from(status.restarts)));
                crashes.push((labels.clone(), u64::from(status.crashes)));
            }
            if matches!(view.kind, Some(Kind::Driver)) && view.state == "loaded" {
                refused.push((labels.clone(), view.answers_refused));
                let sampling = self.samples.sampling(&view.name);
                stale.push((labels, if sampling.stale { 1.0 } else { 0.0 }));
            }
        }
        gauges(
            encoder,
            "xpud_plugin_state",
            "Whether each plugin's files are loaded or refused.",
            &state,
        )?;
        gauges(
            encoder,
            "xpud_plugin_health",
            "The supervised instance's state (drivers).",
            &health,
        )?;
        counters(
            encoder,
            "xpud_plugin_restarts",
            "Instances started again after a crash.",
            &restarts,
        )?;
        counters(
            encoder,
            "xpud_plugin_crashes",
            "Instances that trapped, ran past their deadline or broke their contract.",
            &crashes,
        )?;
        counters(
            encoder,
            "xpud_plugin_log_lines_dropped",
            "Log lines dropped past [plugin-limits] log-lines-per-s.",
            &logs_dropped,
        )?;
        counters(
            encoder,
            "xpud_driver_answers_refused",
            "Driver answers refused for breaking the contract.",
            &refused,
        )?;
        gauges(
            encoder,
            "xpud_driver_sample_stale",
            "1 while a driver's figures are withdrawn (no good answer within 3 sampling intervals).",
            &stale,
        )?;
        self.calls(encoder)
    }

    /// Every loaded plugin's calls, per exported function, over all its instances.
    fn calls(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut f = CallFamilies::default();
        for plugin in self.registry.loaded() {
            for (function, figures) in plugin.calls.snapshot() {
                let labels: Labels = vec![
                    ("plugin", plugin.manifest.name.clone()),
                    ("function", function.to_string()),
                ];
                f.calls.push((labels.clone(), figures.calls));
                for (reason, count) in [
                    ("trap", figures.traps),
                    ("timeout", figures.timeouts),
                    ("out_of_memory", figures.out_of_memory),
                    ("refused", figures.refused),
                ] {
                    let mut labels = labels.clone();
                    labels.push(("reason", reason.to_string()));
                    f.failures.push((labels, count));
                }
                f.durations.push((labels, figures.latency));
            }
        }
        counters(
            encoder,
            "xpud_plugin_calls",
            "Calls of each plugin function.",
            &f.calls,
        )?;
        counters(
            encoder,
            "xpud_plugin_call_failures",
            "Calls that failed: trapped, past their deadline, out of memory, or refused (restarting, unhealthy, busy, cannot start).",
            &f.failures,
        )?;
        histograms(
            encoder,
            "xpud_plugin_call_duration_seconds",
            "How long each plugin function's calls took, queueing for the instance included.",
            &f.durations,
        )
    }

    /// Each task's pipeline and delivery.
    fn tasks(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut f = TaskFamilies::default();
        for (task, progress) in self.tasks.all_progress() {
            let labels: Labels = vec![
                ("task", task.id.clone()),
                ("service", task.algo_service_id.clone()),
            ];
            let status = match task.status {
                TaskStatus::Pending => "PENDING",
                TaskStatus::Running => "RUNNING",
                TaskStatus::Paused => "PAUSED",
                TaskStatus::Finished => "FINISHED",
                TaskStatus::Error => "ERROR",
            };
            states(
                &labels,
                &["PENDING", "RUNNING", "PAUSED", "FINISHED", "ERROR"],
                status,
                &mut f.status,
            );
            let put = |into: &mut Vec<(Labels, u64)>, value: Option<u64>| {
                if let Some(value) = value {
                    into.push((labels.clone(), value));
                }
            };
            put(&mut f.decoded, progress.frames_decoded);
            put(&mut f.analysed, progress.frames_analysed);
            put(&mut f.failed, progress.frames_failed);
            put(&mut f.frames_dropped, progress.frames_dropped);
            put(&mut f.events, progress.events);
            put(&mut f.delivered, Some(progress.events_delivered));
            put(&mut f.dropped, Some(progress.events_dropped));
            put(&mut f.refused, Some(progress.events_refused));
            f.queued
                .push((labels.clone(), progress.events_queued as f64));
            f.queued_bytes
                .push((labels, progress.events_queued_bytes as f64));
        }
        f.encode(encoder)
    }

    /// The model sessions.
    fn inference(&self, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
        let (mut runs, mut requests, mut latency) = (Vec::new(), Vec::new(), Vec::new());
        for session in self.registry.runtime().inference().session_figures() {
            let labels: Labels = vec![
                ("model", session.model),
                ("device", session.device),
                ("provider", session.provider.to_string()),
            ];
            runs.push((labels.clone(), session.runs));
            requests.push((labels.clone(), session.requests));
            latency.push((labels, session.latency));
        }
        histograms(
            encoder,
            "xpud_inference_run_duration_seconds",
            "How long each session run took in ONNX Runtime (a batch is one run).",
            &latency,
        )?;
        counters(
            encoder,
            "xpud_inference_runs",
            "Model session runs (a batch is one run).",
            &runs,
        )?;
        counters(
            encoder,
            "xpud_inference_requests",
            "Model runs asked for by plugins (more than runs: batching).",
            &requests,
        )?;
        let (mut up, mut starts, mut failures) = (Vec::new(), Vec::new(), Vec::new());
        for worker in self.registry.runtime().inference().worker_figures() {
            let labels: Labels = vec![("partition", worker.partition), ("device", worker.device)];
            up.push((labels.clone(), if worker.up { 1.0 } else { 0.0 }));
            starts.push((labels.clone(), worker.starts));
            failures.push((labels, worker.failures));
        }
        gauges(
            encoder,
            "xpud_inference_worker_up",
            "Whether the inference worker of a partition (a MIG instance, a time slice) runs.",
            &up,
        )?;
        counters(
            encoder,
            "xpud_inference_worker_starts",
            "Inference worker processes started for the partition, the first included.",
            &starts,
        )?;
        counters(
            encoder,
            "xpud_inference_worker_failures",
            "Inference workers of the partition that failed to start, exited or stopped answering.",
            &failures,
        )
    }
}

#[derive(Default)]
struct CardFamilies {
    info: Vec<(Labels, f64)>,
    health: Vec<(Labels, f64)>,
    util: Vec<(Labels, f64)>,
    fb_used: Vec<(Labels, f64)>,
    fb_free: Vec<(Labels, f64)>,
    fb_total: Vec<(Labels, f64)>,
    dec_util: Vec<(Labels, f64)>,
    jpeg_util: Vec<(Labels, f64)>,
    temp: Vec<(Labels, f64)>,
    power: Vec<(Labels, f64)>,
    instance_util: Vec<(Labels, f64)>,
    instance_used: Vec<(Labels, f64)>,
    instance_quota: Vec<(Labels, f64)>,
}

impl CardFamilies {
    fn encode(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        gauges(
            e,
            "xpud_device_info",
            "A card a driver reports (1), with its PCI address and whether it is simulated.",
            &self.info,
        )?;
        gauges(
            e,
            "xpud_device_health",
            "The card's health as its driver reports it.",
            &self.health,
        )?;
        gauges(
            e,
            "DCGM_FI_DEV_GPU_UTIL",
            "AI (compute) utilisation, %.",
            &self.util,
        )?;
        gauges(e, "DCGM_FI_DEV_FB_USED", "Memory used, MiB.", &self.fb_used)?;
        gauges(e, "DCGM_FI_DEV_FB_FREE", "Memory free, MiB.", &self.fb_free)?;
        gauges(e, "DCGM_FI_DEV_FB_TOTAL", "Memory, MiB.", &self.fb_total)?;
        gauges(
            e,
            "DCGM_FI_DEV_DEC_UTIL",
            "Video decoder utilisation, %.",
            &self.dec_util,
        )?;
        gauges(
            e,
            "xpud_device_picture_decode_utilization_percent",
            "Picture (JPEG) decoder utilisation, %.",
            &self.jpeg_util,
        )?;
        gauges(
            e,
            "DCGM_FI_DEV_GPU_TEMP",
            "Temperature, degrees Celsius.",
            &self.temp,
        )?;
        gauges(e, "DCGM_FI_DEV_POWER_USAGE", "Power draw, W.", &self.power)?;
        gauges(
            e,
            "xpud_instance_ai_utilization_percent",
            "AI utilisation of one instance (partition) of a card, %, with who holds it.",
            &self.instance_util,
        )?;
        gauges(
            e,
            "xpud_instance_memory_used_mib",
            "Memory one instance (partition) uses, MiB.",
            &self.instance_used,
        )?;
        gauges(
            e,
            "xpud_instance_memory_quota_mib",
            "Memory quota of one instance (partition), MiB.",
            &self.instance_quota,
        )
    }
}

#[derive(Default)]
struct CallFamilies {
    calls: Vec<(Labels, u64)>,
    failures: Vec<(Labels, u64)>,
    durations: Vec<(Labels, Latency)>,
}

#[derive(Default)]
struct TaskFamilies {
    status: Vec<(Labels, f64)>,
    decoded: Vec<(Labels, u64)>,
    analysed: Vec<(Labels, u64)>,
    failed: Vec<(Labels, u64)>,
    frames_dropped: Vec<(Labels, u64)>,
    events: Vec<(Labels, u64)>,
    delivered: Vec<(Labels, u64)>,
    dropped: Vec<(Labels, u64)>,
    refused: Vec<(Labels, u64)>,
    queued: Vec<(Labels, f64)>,
    queued_bytes: Vec<(Labels, f64)>,
}

impl TaskFamilies {
    fn encode(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        gauges(
            e,
            "xpud_task_status",
            "The task's G.7 status.",
            &self.status,
        )?;
        counters(
            e,
            "xpud_task_frames_decoded",
            "Frames decoded by the task's pipeline (since it started).",
            &self.decoded,
        )?;
        counters(
            e,
            "xpud_task_frames_analysed",
            "Frames its algorithm analysed.",
            &self.analysed,
        )?;
        counters(
            e,
            "xpud_task_frames_failed",
            "Frames its algorithm failed on (a crash, a deadline, its own error).",
            &self.failed,
        )?;
        counters(
            e,
            "xpud_task_frames_dropped",
            "Frames of a live source skipped for a newer one: the algorithm was busy.",
            &self.frames_dropped,
        )?;
        counters(
            e,
            "xpud_task_events",
            "Events its algorithm raised.",
            &self.events,
        )?;
        counters(
            e,
            "xpud_task_events_delivered",
            "Events its destinations took.",
            &self.delivered,
        )?;
        counters(
            e,
            "xpud_task_events_dropped",
            "Events dropped past the queue's bounds (oldest first).",
            &self.dropped,
        )?;
        counters(
            e,
            "xpud_task_events_refused",
            "Events a destination refused for good (too large).",
            &self.refused,
        )?;
        gauges(
            e,
            "xpud_task_events_queued",
            "Events waiting for delivery.",
            &self.queued,
        )?;
        gauges(
            e,
            "xpud_task_events_queued_bytes",
            "Bytes of the events waiting for delivery.",
            &self.queued_bytes,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_without_samples_are_left_out_and_state_sets_mark_the_current_state() {
        let mut into = Vec::new();
        states(&vec![("plugin", "p".into())], &["a", "b"], "b", &mut into);
        assert_eq!(into.len(), 2);
        assert_eq!(into[0].1, 0.0);
        assert_eq!(into[1].1, 1.0);
        assert_eq!(into[1].0[1], ("state", "b".to_string()));
    }
}
