//! The simulator itself, free of host calls but for `init`'s log line, so that the
//! host's benchmark can compile this very file natively as its baseline.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use xpud_sdk::driver::*;

/// The simulator's state. Public so that benchmarks can run the very same code
/// natively as a baseline.
pub struct SimXpu {
    accelerator_type: String,
    memory_mib: u64,
    max_partitions_per_card: usize,
    partitions: BTreeMap<String, PartitionSpec>,
    next_partition: u64,
    /// The simulated cards never change: described once, not on every call.
    devices: Vec<Device>,
}

impl SimXpu {
    /// Builds the simulator from its config (no host calls: usable natively).
    pub fn from_config(config: &Config) -> Result<(Self, DriverInfo), DriverError> {
        let cards: u32 = config.parse_or("cards", 2)?;
        let model: String = config.parse_or("model", "XPU16".to_string())?;
        let memory_mib: u64 = config.parse_or("memory-mib", 16384)?;
        if memory_mib == 0 {
            return Err(DriverError::InvalidArgument(
                "config `memory-mib` must be positive".into(),
            ));
        }
        let model = model.trim().to_uppercase().replace(['-', ' '], "_");
        let accelerator_type = format!("SIMULATED_{model}");
        let decoders = config.parse_or("decoders", 2)?;
        let encoders = config.parse_or("encoders", 1)?;
        let devices = (0..cards)
            .map(|index| Device {
                id: format!("sim:{index}"),
                uuid: Some(format!("SIM-00000000-0000-0000-0000-{index:012}")),
                index,
                accelerator_type: accelerator_type.clone(),
                memory_total_mib: Some(memory_mib),
                decoder_units: Some(decoders),
                encoder_units: Some(encoders),
                pci_bus_id: None,
                health: Health::Healthy,
            })
            .collect();
        let driver = SimXpu {
            accelerator_type,
            memory_mib,
            max_partitions_per_card: config.parse_or("max-partitions-per-card", 7)?,
            partitions: BTreeMap::new(),
            next_partition: 0,
            devices,
        };
        let info = DriverInfo {
            vendor: "SIMULATED".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            accelerator_types: vec![driver.accelerator_type.clone()],
            simulated: true,
        };
        Ok((driver, info))
    }

    fn cards(&self) -> u32 {
        self.devices.len() as u32
    }

    fn check_device(&self, index: u32) -> Result<(), DriverError> {
        if index < self.cards() {
            Ok(())
        } else {
            Err(DriverError::NotFound(format!(
                "device-index {index}: sim-xpu has {} cards",
                self.cards()
            )))
        }
    }

    fn on_device(&self, index: u32) -> impl Iterator<Item = (&String, &PartitionSpec)> {
        self.partitions
            .iter()
            .filter(move |(_, spec)| spec.device_index == index)
    }
}

fn seconds_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A smooth wave in [0, 1]: each card and figure gets its own phase and period.
/// The time is reduced to one cycle first: `sin` of ~1e8 radians (Unix seconds
/// scaled) takes libm's slow large-argument reduction and loses precision.
fn wave(t: f64, period_s: f64, phase: f64) -> f64 {
    let cycle = (t / period_s).fract();
    0.5 + 0.5 * (cycle * std::f64::consts::TAU + phase).sin()
}

impl Driver for SimXpu {
    fn init(config: Config) -> Result<(Self, DriverInfo), DriverError> {
        let (driver, info) = SimXpu::from_config(&config)?;
        xpud_sdk::info!(
            "simulating {} x {} with {} MiB each",
            driver.cards(),
            driver.accelerator_type,
            driver.memory_mib
        );
        Ok((driver, info))
    }

    fn devices(&mut self) -> Result<Vec<Device>, DriverError> {
        Ok(self.devices.clone())
    }

    /// The simulated cards are made at init and never change.
    fn devices_version(&self) -> Option<u64> {
        Some(0)
    }

    fn sample(&mut self) -> Result<Metrics, DriverError> {
        let t = seconds_now();
        let mut cards = Vec::with_capacity(self.devices.len());
        let mut instances = Vec::with_capacity(self.partitions.len());
        for index in 0..self.cards() {
            let phase = f64::from(index) * 1.7;
            let reserved: u64 = self.on_device(index).map(|(_, s)| s.memory_quota_mib).sum();
            let load: u32 = self
                .on_device(index)
                .map(|(_, s)| u32::from(s.compute_share_pct))
                .sum();
            // Idle background plus the partitions' share of work, never above 100.
            let ai = (8.0 + 30.0 * wave(t, 37.0, phase) + 0.5 * f64::from(load)).min(100.0);
            let base_mib = 300 + (self.memory_mib / 20) * (wave(t, 53.0, phase) * 4.0) as u64;
            let used = (base_mib + reserved * 6 / 10).min(self.memory_mib);
            cards.push(CardMetrics {
                device_index: index,
                ai_utilization_pct: Some(ai as f32),
                memory_used_mib: Some(used),
                memory_total_mib: Some(self.memory_mib),
                video_decode_utilization_pct: Some((5.0 + 40.0 * wave(t, 23.0, phase)) as f32),
                picture_decode_utilization_pct: Some((2.0 + 20.0 * wave(t, 17.0, phase)) as f32),
                temperature_celsius: Some((38.0 + ai * 0.35) as f32),
                power_watts: Some((20.0 + ai * 0.5) as f32),
            });
            for (id, spec) in self.on_device(index) {
                let share = f64::from(spec.compute_share_pct) / 100.0;
                instances.push(InstanceMetrics {
                    partition_id: id.clone(),
                    device_index: index,
                    ai_utilization_pct: Some((ai * share).min(100.0) as f32),
                    memory_used_mib: Some(
                        (spec.memory_quota_mib as f64 * (0.4 + 0.4 * wave(t, 29.0, phase))) as u64,
                    ),
                    memory_quota_mib: spec.memory_quota_mib,
                });
            }
        }
        Ok(Metrics { cards, instances })
    }

    fn create_partition(&mut self, spec: PartitionSpec) -> Result<Partition, DriverError> {
        self.check_device(spec.device_index)?;
        if spec.compute_share_pct == 0 || spec.compute_share_pct > 100 {
            return Err(DriverError::InvalidArgument(format!(
                "compute-share-pct {} is not within 1-100",
                spec.compute_share_pct
            )));
        }
        if spec.memory_quota_mib == 0 {
            return Err(DriverError::InvalidArgument(
                "memory-quota-mib must be positive".into(),
            ));
        }
        if spec.isolation == Isolation::Hard && spec.slicing == Slicing::Time {
            return Err(DriverError::Unsupported(
                "hard isolation needs space slicing: a hard partition owns a slice of the card"
                    .into(),
            ));
        }
        let existing: Vec<&PartitionSpec> =
            self.on_device(spec.device_index).map(|(_, s)| s).collect();
        if let Some(other) = existing.iter().find(|s| s.slicing != spec.slicing) {
            return Err(DriverError::Unsupported(format!(
                "device {} already runs {:?} slicing; one slicing mode per card",
                spec.device_index, other.slicing
            )));
        }
        if existing.len() >= self.max_partitions_per_card {
            return Err(DriverError::InsufficientResources(format!(
                "device {} already has {} partitions (maximum)",
                spec.device_index,
                existing.len()
            )));
        }
        let memory_left =
            self.memory_mib - existing.iter().map(|s| s.memory_quota_mib).sum::<u64>();
        if spec.memory_quota_mib > memory_left {
            return Err(DriverError::InsufficientResources(format!(
                "device {}: {} MiB asked, {memory_left} MiB left",
                spec.device_index, spec.memory_quota_mib
            )));
        }
        let compute_left = 100
            - existing
                .iter()
                .map(|s| u32::from(s.compute_share_pct))
                .sum::<u32>();
        if u32::from(spec.compute_share_pct) > compute_left {
            return Err(DriverError::InsufficientResources(format!(
                "device {}: {}% compute asked, {compute_left}% left",
                spec.device_index, spec.compute_share_pct
            )));
        }
        let id = format!("sim{}-p{}", spec.device_index, self.next_partition);
        self.next_partition += 1;
        self.partitions.insert(id.clone(), spec);
        Ok(Partition { id, spec })
    }

    fn destroy_partition(&mut self, id: String) -> Result<(), DriverError> {
        match self.partitions.remove(&id) {
            Some(_) => Ok(()),
            None => Err(DriverError::NotFound(format!("no partition {id}"))),
        }
    }

    fn partitions(&mut self) -> Result<Vec<Partition>, DriverError> {
        Ok(self
            .partitions
            .iter()
            .map(|(id, spec)| Partition {
                id: id.clone(),
                spec: *spec,
            })
            .collect())
    }

    fn labels(&mut self) -> Result<Vec<Label>, DriverError> {
        let mut labels = standard_labels(&self.devices()?);
        labels.push(Label {
            key: "xpu.simulated".into(),
            value: "true".into(),
        });
        labels.push(Label {
            key: "xpu.sharing".into(),
            value: "soft-quota.hard-partition".into(),
        });
        Ok(labels)
    }
}
