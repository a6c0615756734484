//! The NVIDIA driver over NVML: cards, their figures, MIG or time-sliced partitions.

use std::collections::BTreeMap;

use xpud_sdk::driver::nvml::{DeviceInfo, MigInstance, NvmlError, ProcessUsage};
use xpud_sdk::driver::*;

use crate::bridge::{Nvml, Sample};
use crate::{mig, models};

pub struct Nvidia<N> {
    nvml: N,
    /// The cards as the last discovery found them.
    cards: Vec<Card>,
    /// Time-sliced partitions on cards not in MIG mode: quotas the host's ledger
    /// admits replicas against. The hardware knows nothing of them, so after a
    /// restart the host makes them again.
    shared: BTreeMap<String, TimeSlice>,
    next_shared: u32,
    /// Changes whenever `devices` would answer differently (a discovery, a card's
    /// health): the host asks for the devices only then.
    devices_version: u64,
}

/// A time-sliced partition: its quotas, and the process the host runs its work
/// in (`bind_process`), whose usage NVML measures.
struct TimeSlice {
    spec: PartitionSpec,
    pid: Option<u32>,
}

struct Card {
    index: u32,
    info: DeviceInfo,
    accelerator_type: String,
    memory_total_mib: Option<u64>,
    /// MIG mode is on: partitions are MIG instances.
    mig: bool,
    health: Health,
}

/// NVML's error in words.
pub fn describe(e: &NvmlError) -> String {
    match e {
        // The host says what is unavailable and why.
        NvmlError::Unavailable(m) => m.clone(),
        NvmlError::NoPermission(m) => format!("no permission: {m}"),
        NvmlError::NotFound(m) => format!("not found: {m}"),
        NvmlError::NotSupported(m) => format!("not supported: {m}"),
        NvmlError::InsufficientResources(m) => format!("insufficient resources: {m}"),
        NvmlError::GpuLost(m) => format!("GPU lost: {m}"),
        NvmlError::Failed(m) => format!("NVML failed: {m}"),
    }
}

fn driver_error(e: NvmlError) -> DriverError {
    let text = describe(&e);
    match e {
        NvmlError::NotFound(_) => DriverError::NotFound(text),
        NvmlError::NotSupported(_) | NvmlError::NoPermission(_) => DriverError::Unsupported(text),
        NvmlError::InsufficientResources(_) => DriverError::InsufficientResources(text),
        NvmlError::Unavailable(_) | NvmlError::GpuLost(_) | NvmlError::Failed(_) => {
            DriverError::DeviceFailure(text)
        }
    }
}

const MIB: u64 = 1 << 20;

/// A card's health from its last reading: it answered with its core figures, it
/// answered without some of them, it is gone from the bus. In MIG mode NVML has no
/// whole-card utilisation (its instances have theirs), so memory alone is core.
fn health_of(sample: &Result<Sample, NvmlError>, mig: bool) -> Health {
    match sample {
        Ok(s) if s.memory_used_bytes.is_some() && (mig || s.gpu_utilization_pct.is_some()) => {
            Health::Healthy
        }
        Ok(_) => Health::Degraded,
        Err(NvmlError::GpuLost(_)) => Health::Unhealthy,
        Err(_) => Health::Unknown,
    }
}

impl<N: Nvml> Nvidia<N> {
    pub fn new(nvml: N) -> Nvidia<N> {
        Nvidia {
            nvml,
            cards: Vec::new(),
            shared: BTreeMap::new(),
            next_shared: 0,
            devices_version: 0,
        }
    }

    /// Finds the cards again. A card that stops answering keeps its place, as
    /// unhealthy, so that what runs on it can be moved.
    pub fn discover(&mut self) -> Result<(), NvmlError> {
        let count = self.nvml.device_count()?;
        let mut cards = Vec::with_capacity(count as usize);
        let mut answering = Vec::with_capacity(count as usize);
        for index in 0..count {
            match self.nvml.info(index) {
                Ok(info) => answering.push((index, info)),
                Err(e) => {
                    if let Some(mut known) = self.take_card(index) {
                        xpud_sdk::warn!("card {index} stopped answering: {}", describe(&e));
                        known.health = Health::Unhealthy;
                        cards.push(known);
                    }
                }
            }
        }
        let indices: Vec<u32> = answering.iter().map(|(index, _)| *index).collect();
        let samples = self.read(&indices);
        for ((index, info), sample) in answering.into_iter().zip(samples) {
            let mig = match self.nvml.mig_mode(index) {
                Ok(mode) => mode.current,
                Err(_) => false,
            };
            cards.push(Card {
                index,
                accelerator_type: models::accelerator_type(info.pci_device_id, &info.name),
                memory_total_mib: sample
                    .as_ref()
                    .ok()
                    .and_then(|s| s.memory_total_bytes)
                    .map(|b| b / MIB),
                mig,
                health: health_of(&sample, mig),
                info,
            });
        }
        cards.sort_by_key(|c| c.index);
        self.cards = cards;
        self.devices_version = self.devices_version.wrapping_add(1);
        Ok(())
    }

    /// A reading of each of `indices`, in that order, from one call into NVML's
    /// bridge (each call crosses the sandbox's boundary): where the call as a whole
    /// failed, each card has its error.
    fn read(&self, indices: &[u32]) -> Vec<Result<Sample, NvmlError>> {
        if indices.is_empty() {
            return Vec::new();
        }
        let mut samples = match self.nvml.sample(indices) {
            Ok(samples) => samples,
            Err(e) => vec![Err(e); indices.len()],
        };
        samples.resize_with(indices.len(), || {
            Err(NvmlError::Failed(
                "the bridge answered for fewer devices than asked".into(),
            ))
        });
        samples
    }

    /// Discovers the cards again when their number changed or one stopped
    /// answering (it may be back, or replaced).
    fn rediscover_if_changed(&mut self) -> Result<(), DriverError> {
        let changed = match self.nvml.device_count() {
            Ok(count) => count as usize != self.cards.len(),
            Err(_) => !self.cards.is_empty(),
        };
        if changed || self.cards.iter().any(|c| c.health == Health::Unhealthy) {
            if let Err(e) = self.discover() {
                if matches!(e, NvmlError::Unavailable(_)) {
                    self.cards.clear();
                    self.devices_version = self.devices_version.wrapping_add(1);
                } else {
                    return Err(driver_error(e));
                }
            }
        }
        Ok(())
    }

    fn take_card(&mut self, index: u32) -> Option<Card> {
        let at = self.cards.iter().position(|c| c.index == index)?;
        Some(self.cards.remove(at))
    }

    fn card(&self, index: u32) -> Result<&Card, DriverError> {
        self.cards
            .iter()
            .find(|c| c.index == index)
            .ok_or_else(|| DriverError::NotFound(format!("no NVIDIA card {index}")))
    }

    fn accelerator_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self
            .cards
            .iter()
            .map(|c| c.accelerator_type.clone())
            .collect();
        types.sort();
        types.dedup();
        types
    }

    /// The MIG instance partition `id` names, where it names one.
    fn mig_instance(&self, id: &str) -> Option<Result<MigInstance, DriverError>> {
        let (device, gpu_instance) = mig::parse_partition_id(id)?;
        let instances = match self.nvml.mig_instances(device) {
            Ok(instances) => instances,
            Err(e) => return Some(Err(driver_error(e))),
        };
        Some(
            instances
                .into_iter()
                .find(|i| i.gpu_instance_id == gpu_instance)
                .ok_or_else(|| DriverError::NotFound(format!("no partition {id}"))),
        )
    }

    fn time_slice(&self, id: &str) -> Result<&TimeSlice, DriverError> {
        self.shared
            .get(id)
            .ok_or_else(|| DriverError::NotFound(format!("no partition {id}")))
    }

    /// Instance figures of the time-sliced partitions: those of the process each
    /// runs in, where the host named one and NVML measured it (a process without
    /// a CUDA context, or NVML seeing another pid namespace, leaves them absent).
    /// NVML lists a card's processes in one call, asked only of cards with such a
    /// process.
    fn time_slice_metrics(&self, out: &mut Vec<InstanceMetrics>) {
        let mut processes: BTreeMap<u32, Vec<ProcessUsage>> = BTreeMap::new();
        for (id, slice) in &self.shared {
            let index = slice.spec.device_index;
            let process = slice.pid.and_then(|pid| {
                processes
                    .entry(index)
                    .or_insert_with(|| self.nvml.processes(index).unwrap_or_default())
                    .iter()
                    .find(|p| p.pid == pid)
            });
            out.push(InstanceMetrics {
                partition_id: id.clone(),
                device_index: index,
                ai_utilization_pct: process
                    .and_then(|p| p.sm_utilization_pct)
                    .map(|u| u.min(100) as f32),
                memory_used_mib: process.and_then(|p| p.used_memory_bytes).map(|b| b / MIB),
                memory_quota_mib: slice.spec.memory_quota_mib,
            });
        }
    }

    /// Instance figures of the MIG instances on `card`: memory from the MIG device,
    /// utilisation from the processes NVML places in the instance.
    fn mig_metrics(&self, card: &Card, out: &mut Vec<InstanceMetrics>) {
        let instances = match self.nvml.mig_instances(card.index) {
            Ok(instances) => instances,
            Err(e) => {
                xpud_sdk::warn!(
                    "card {}: cannot list MIG instances: {}",
                    card.index,
                    describe(&e)
                );
                return;
            }
        };
        if instances.is_empty() {
            // Nothing to attribute processes to: NVML is not asked for them.
            return;
        }
        let processes = self.nvml.processes(card.index).unwrap_or_default();
        // Profiles only for an instance whose MIG device does not say its memory.
        let mut profiles = None;
        for instance in instances {
            let inside: Vec<u32> = processes
                .iter()
                .filter(|p| p.gpu_instance_id == Some(instance.gpu_instance_id))
                .filter_map(|p| p.sm_utilization_pct)
                .collect();
            // No process measured: unknown, not idle (NVML has no per-instance
            // utilisation without processes to sample).
            let ai = (!inside.is_empty()).then(|| inside.iter().sum::<u32>().min(100) as f32);
            let quota = match instance.memory_total_bytes {
                Some(bytes) => bytes / MIB,
                None => {
                    let profiles = profiles.get_or_insert_with(|| {
                        self.nvml.mig_profiles(card.index).unwrap_or_default()
                    });
                    mig::instance_spec(card.index, &instance, profiles)
                        .map_or(0, |s| s.memory_quota_mib)
                }
            };
            out.push(InstanceMetrics {
                partition_id: mig::partition_id(card.index, instance.gpu_instance_id),
                device_index: card.index,
                ai_utilization_pct: ai,
                memory_used_mib: instance.memory_used_bytes.map(|b| b / MIB),
                memory_quota_mib: quota,
            });
        }
    }
}

impl<N: Nvml + Default + 'static> Driver for Nvidia<N> {
    fn init(_config: Config) -> Result<(Self, DriverInfo), DriverError> {
        let mut driver = Nvidia::new(N::default());
        match driver.discover() {
            Ok(()) => {
                let mig = driver.cards.iter().filter(|c| c.mig).count();
                xpud_sdk::info!(
                    "{} NVIDIA card(s): {} ({mig} in MIG mode)",
                    driver.cards.len(),
                    driver.accelerator_types().join(", ")
                );
            }
            Err(NvmlError::NoPermission(why)) => return Err(DriverError::Unsupported(why)),
            // No library or no driver here: no cards, which is the truth; the
            // host tries the library again, and so does every discovery.
            Err(e) => xpud_sdk::warn!("{}; no NVIDIA cards reported", describe(&e)),
        }
        let info = DriverInfo {
            vendor: "NVIDIA".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            accelerator_types: driver.accelerator_types(),
            simulated: false,
        };
        Ok((driver, info))
    }

    /// The cards as the last sample left them: discovery and health are kept up
    /// to date by `sample`, which the host calls every round.
    fn devices(&mut self) -> Result<Vec<Device>, DriverError> {
        Ok(self
            .cards
            .iter()
            .map(|c| Device {
                id: c
                    .info
                    .uuid
                    .clone()
                    .or_else(|| c.info.pci_bus_id.as_ref().map(|b| format!("nvidia:{b}")))
                    .unwrap_or_else(|| format!("nvidia:{}", c.index)),
                uuid: c.info.uuid.clone(),
                index: c.index,
                accelerator_type: c.accelerator_type.clone(),
                memory_total_mib: c.memory_total_mib,
                // NVML does not count a board's NVDEC/NVENC engines.
                decoder_units: None,
                encoder_units: None,
                pci_bus_id: c.info.pci_bus_id.clone(),
                health: c.health,
            })
            .collect())
    }

    fn sample(&mut self) -> Result<Metrics, DriverError> {
        self.rediscover_if_changed()?;
        let indices: Vec<u32> = self.cards.iter().map(|c| c.index).collect();
        let samples = self.read(&indices);
        let mut cards = Vec::with_capacity(self.cards.len());
        let mut instances = Vec::new();
        for (at, sample) in samples.into_iter().enumerate() {
            let index = self.cards[at].index;
            let health = health_of(&sample, self.cards[at].mig);
            if health != self.cards[at].health {
                self.cards[at].health = health;
                self.devices_version = self.devices_version.wrapping_add(1);
            }
            // A card that did not answer has no figures this round: it is left
            // out, not reported as idle.
            let Ok(s) = sample else { continue };
            cards.push(CardMetrics {
                device_index: index,
                ai_utilization_pct: s.gpu_utilization_pct.map(|u| u as f32),
                memory_used_mib: s.memory_used_bytes.map(|b| b / MIB),
                memory_total_mib: s.memory_total_bytes.map(|b| b / MIB),
                video_decode_utilization_pct: s.decoder_utilization_pct.map(|u| u as f32),
                picture_decode_utilization_pct: s.jpeg_utilization_pct.map(|u| u as f32),
                temperature_celsius: s.temperature_celsius.map(|t| t as f32),
                power_watts: s.power_draw_milliwatts.map(|mw| mw as f32 / 1000.0),
            });
            if self.cards[at].mig {
                self.mig_metrics(&self.cards[at], &mut instances);
            }
        }
        self.time_slice_metrics(&mut instances);
        Ok(Metrics { cards, instances })
    }

    fn devices_version(&self) -> Option<u64> {
        Some(self.devices_version)
    }

    fn create_partition(&mut self, spec: PartitionSpec) -> Result<Partition, DriverError> {
        let card = self.card(spec.device_index)?;
        let index = card.index;
        if card.mig {
            let profiles = self.nvml.mig_profiles(index).map_err(driver_error)?;
            let profile = mig::choose(&profiles, &spec)?;
            let made_spec = mig::spec_of(index, profile, mig::total_slices(&profiles));
            let instance = self
                .nvml
                .create_mig_instance(index, profile.id)
                .map_err(driver_error)?;
            xpud_sdk::info!(
                "card {index}: MIG instance {} of profile {} for {} % and {} MiB",
                instance.gpu_instance_id,
                profile.id,
                spec.compute_share_pct,
                spec.memory_quota_mib
            );
            return Ok(Partition {
                id: mig::partition_id(index, instance.gpu_instance_id),
                spec: made_spec,
            });
        }
        if spec.isolation == Isolation::Hard || spec.slicing == Slicing::Space {
            return Err(DriverError::Unsupported(format!(
                "card {index} is not in MIG mode: hard isolation and space slicing need MIG \
                 (nvidia-smi -i {index} -mig 1)"
            )));
        }
        let on_card = || {
            self.shared
                .values()
                .map(|s| &s.spec)
                .filter(|s| s.device_index == index)
        };
        let compute: u32 = on_card().map(|s| u32::from(s.compute_share_pct)).sum();
        let memory: u64 = on_card().map(|s| s.memory_quota_mib).sum();
        if compute + u32::from(spec.compute_share_pct) > 100 {
            return Err(DriverError::InsufficientResources(format!(
                "card {index}: {compute} % of the compute is given out, {} % more does not fit",
                spec.compute_share_pct
            )));
        }
        if let Some(total) = card.memory_total_mib {
            if memory + spec.memory_quota_mib > total {
                return Err(DriverError::InsufficientResources(format!(
                    "card {index}: {memory} of {total} MiB are given out, {} MiB more do not fit",
                    spec.memory_quota_mib
                )));
            }
        }
        self.next_shared += 1;
        let id = format!("ts-{index}-{}", self.next_shared);
        self.shared
            .insert(id.clone(), TimeSlice { spec, pid: None });
        Ok(Partition { id, spec })
    }

    fn destroy_partition(&mut self, id: String) -> Result<(), DriverError> {
        if let Some((device, instance)) = mig::parse_partition_id(&id) {
            return self
                .nvml
                .destroy_mig_instance(device, instance)
                .map_err(driver_error);
        }
        self.shared
            .remove(&id)
            .map(drop)
            .ok_or_else(|| DriverError::NotFound(format!("no partition {id}")))
    }

    fn partitions(&mut self) -> Result<Vec<Partition>, DriverError> {
        let mut out = Vec::new();
        for card in self.cards.iter().filter(|c| c.mig) {
            let profiles = self.nvml.mig_profiles(card.index).map_err(driver_error)?;
            for instance in self.nvml.mig_instances(card.index).map_err(driver_error)? {
                if let Some(spec) = mig::instance_spec(card.index, &instance, &profiles) {
                    out.push(Partition {
                        id: mig::partition_id(card.index, instance.gpu_instance_id),
                        spec,
                    });
                }
            }
        }
        out.extend(self.shared.iter().map(|(id, slice)| Partition {
            id: id.clone(),
            spec: slice.spec,
        }));
        Ok(out)
    }

    /// A MIG instance's device: its uuid, once NVML gave it a compute instance.
    /// A time slice's: its card's uuid, so that its work runs in a process of its
    /// own, which NVML measures apart from the others on the card.
    fn partition_device(&mut self, id: &str) -> Result<Option<String>, DriverError> {
        let Some(instance) = self.mig_instance(id) else {
            let slice = self.time_slice(id)?;
            return Ok(self.card(slice.spec.device_index)?.info.uuid.clone());
        };
        match instance?.uuid {
            Some(uuid) => Ok(Some(uuid)),
            None => Err(DriverError::DeviceFailure(format!(
                "partition {id}: NVML gives its MIG instance no device uuid (no compute \
                 instance in it)"
            ))),
        }
    }

    /// A MIG instance's processes are told apart by NVML itself (the instance
    /// each runs in); a time slice's process is the one the host names.
    fn bind_process(&mut self, id: &str, pid: u32) -> Result<(), DriverError> {
        if let Some(instance) = self.mig_instance(id) {
            return instance.map(drop);
        }
        let slice = self
            .shared
            .get_mut(id)
            .ok_or_else(|| DriverError::NotFound(format!("no partition {id}")))?;
        slice.pid = Some(pid);
        Ok(())
    }

    fn labels(&mut self) -> Result<Vec<Label>, DriverError> {
        let mut labels = standard_labels(&self.devices()?);
        let label = |key: &str, value: String| Label {
            key: key.into(),
            value,
        };
        let capable = self.cards.iter().any(|c| c.info.mig_capable);
        let enabled = self.cards.iter().any(|c| c.mig);
        // Cards in MIG mode share by hard partitions, the others by soft quotas: a
        // node with both offers both.
        let sharing = match (self.cards.iter().all(|c| c.mig), enabled) {
            (true, true) => "hard-partition",
            (false, true) => "soft-quota.hard-partition",
            _ => "soft-quota",
        };
        labels.push(label("xpu.vendor", "NVIDIA".into()));
        labels.push(label("xpu.mig-capable", capable.to_string()));
        labels.push(label("xpu.mig-enabled", enabled.to_string()));
        labels.push(label("xpu.sharing", sharing.into()));
        Ok(labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mig::tests::a100_40gb;
    use xpud_sdk::driver::nvml::{MigProfile, MigState};

    /// NVML's answers, recorded from a T4 and an A100-SXM4-40GB in MIG mode.
    struct Recorded {
        cards: Vec<RecordedCard>,
        next_instance: u32,
        /// What the whole `sample` call answers instead of the cards' readings.
        sample_refused: Option<NvmlError>,
        sample_calls: std::cell::Cell<u32>,
        process_calls: std::cell::Cell<u32>,
    }

    struct RecordedCard {
        info: DeviceInfo,
        sample: Result<Sample, NvmlError>,
        mig: Option<MigState>,
        profiles: Vec<MigProfile>,
        instances: Vec<MigInstance>,
        processes: Vec<ProcessUsage>,
    }

    fn t4() -> RecordedCard {
        RecordedCard {
            info: DeviceInfo {
                name: "Tesla T4".into(),
                uuid: Some("GPU-8a8b7d6e-3a0f-4c2b-9e1d-5f4a3b2c1d0e".into()),
                serial: Some("1322120012345".into()),
                pci_bus_id: Some("00000000:3B:00.0".into()),
                pci_device_id: Some(0x1eb8_10de),
                pci_subsystem_id: Some(0x12a2_10de),
                mig_capable: false,
            },
            sample: Ok(Sample {
                memory_total_bytes: Some(15360 * MIB),
                memory_used_bytes: Some(345 * MIB),
                gpu_utilization_pct: Some(37),
                decoder_utilization_pct: Some(18),
                // A T4 has no JPEG engine.
                jpeg_utilization_pct: None,
                temperature_celsius: Some(48),
                power_draw_milliwatts: Some(27_512),
            }),
            mig: None,
            profiles: vec![],
            instances: vec![],
            processes: vec![],
        }
    }

    fn a100_mig() -> RecordedCard {
        RecordedCard {
            info: DeviceInfo {
                name: "NVIDIA A100-SXM4-40GB".into(),
                uuid: Some("GPU-1d2c3b4a-5f6e-7d8c-9b0a-1f2e3d4c5b6a".into()),
                serial: Some("1564720004321".into()),
                pci_bus_id: Some("00000000:07:00.0".into()),
                pci_device_id: Some(0x20b0_10de),
                pci_subsystem_id: Some(0x134f_10de),
                mig_capable: true,
            },
            sample: Ok(Sample {
                memory_total_bytes: Some(40960 * MIB),
                memory_used_bytes: Some(38 * MIB),
                // In MIG mode NVML has no whole-card utilisation.
                gpu_utilization_pct: None,
                decoder_utilization_pct: None,
                jpeg_utilization_pct: Some(4),
                temperature_celsius: Some(33),
                power_draw_milliwatts: Some(54_221),
            }),
            mig: Some(MigState {
                current: true,
                pending: true,
            }),
            profiles: a100_40gb(),
            instances: vec![],
            processes: vec![],
        }
    }

    impl Default for Recorded {
        fn default() -> Self {
            Recorded {
                cards: vec![t4(), a100_mig()],
                next_instance: 1,
                sample_refused: None,
                sample_calls: Default::default(),
                process_calls: Default::default(),
            }
        }
    }

    impl Recorded {
        fn card(&self, device: u32) -> Result<&RecordedCard, NvmlError> {
            self.cards
                .get(device as usize)
                .ok_or_else(|| NvmlError::NotFound(format!("no device {device}")))
        }
    }

    fn not_supported() -> NvmlError {
        NvmlError::NotSupported("Not Supported".into())
    }

    impl Nvml for Recorded {
        fn device_count(&self) -> Result<u32, NvmlError> {
            Ok(self.cards.len() as u32)
        }
        fn info(&self, device: u32) -> Result<DeviceInfo, NvmlError> {
            let card = self.card(device)?;
            card.sample.as_ref().map_err(Clone::clone)?;
            Ok(card.info.clone())
        }
        fn sample(&self, devices: &[u32]) -> Result<Vec<Result<Sample, NvmlError>>, NvmlError> {
            self.sample_calls.set(self.sample_calls.get() + 1);
            if let Some(refused) = &self.sample_refused {
                return Err(refused.clone());
            }
            Ok(devices
                .iter()
                .map(|&device| self.card(device)?.sample.clone())
                .collect())
        }
        fn processes(&self, device: u32) -> Result<Vec<ProcessUsage>, NvmlError> {
            self.process_calls.set(self.process_calls.get() + 1);
            Ok(self.card(device)?.processes.clone())
        }
        fn mig_mode(&self, device: u32) -> Result<MigState, NvmlError> {
            self.card(device)?.mig.ok_or_else(not_supported)
        }
        /// Room left, as the card counts it: what the profile's own limit and the
        /// card's unused slices both allow.
        fn mig_profiles(&self, device: u32) -> Result<Vec<MigProfile>, NvmlError> {
            let card = self.card(device)?;
            let used: u32 = card.instances.iter().map(|i| i.placement_size).sum();
            let free_slices = 7u32.saturating_sub(used);
            Ok(card
                .profiles
                .iter()
                .map(|p| {
                    let made = card
                        .instances
                        .iter()
                        .filter(|i| i.profile_id == p.id)
                        .count() as u32;
                    MigProfile {
                        free_count: (p.max_count - made).min(free_slices / p.slice_count),
                        ..*p
                    }
                })
                .collect())
        }
        fn mig_instances(&self, device: u32) -> Result<Vec<MigInstance>, NvmlError> {
            Ok(self.card(device)?.instances.clone())
        }
        fn create_mig_instance(
            &mut self,
            device: u32,
            profile: u32,
        ) -> Result<MigInstance, NvmlError> {
            let id = self.next_instance;
            let room = self
                .mig_profiles(device)?
                .into_iter()
                .find(|p| p.id == profile)
                .map_or(0, |p| p.free_count);
            let card = self
                .cards
                .get_mut(device as usize)
                .ok_or_else(|| NvmlError::NotFound(format!("no device {device}")))?;
            let p = card
                .profiles
                .iter()
                .find(|p| p.id == profile)
                .ok_or_else(|| NvmlError::NotFound(format!("no profile {profile}")))?;
            if room == 0 {
                return Err(NvmlError::InsufficientResources("no room".into()));
            }
            let instance = MigInstance {
                gpu_instance_id: id,
                profile_id: profile,
                placement_start: 0,
                placement_size: p.slice_count,
                uuid: Some(format!("MIG-0000000{id}-aaaa-bbbb-cccc-dddddddddddd")),
                memory_total_bytes: Some(p.memory_mib * MIB),
                memory_used_bytes: Some(13 * MIB),
            };
            card.instances.push(instance.clone());
            self.next_instance += 1;
            Ok(instance)
        }
        fn destroy_mig_instance(
            &mut self,
            device: u32,
            gpu_instance: u32,
        ) -> Result<(), NvmlError> {
            let card = self
                .cards
                .get_mut(device as usize)
                .ok_or_else(|| NvmlError::NotFound(format!("no device {device}")))?;
            let at = card
                .instances
                .iter()
                .position(|i| i.gpu_instance_id == gpu_instance)
                .ok_or_else(|| NvmlError::NotFound(format!("no GPU instance {gpu_instance}")))?;
            card.instances.remove(at);
            Ok(())
        }
    }

    /// A partition as comparable text: id, device, isolation, slicing, memory, share.
    fn key(p: &Partition) -> Vec<String> {
        let s = &p.spec;
        vec![
            p.id.clone(),
            s.device_index.to_string(),
            format!("{:?}", s.isolation),
            format!("{:?}", s.slicing),
            s.memory_quota_mib.to_string(),
            s.compute_share_pct.to_string(),
        ]
    }

    fn keys(partitions: &[Partition]) -> Vec<Vec<String>> {
        partitions.iter().map(key).collect()
    }

    fn driver() -> Nvidia<Recorded> {
        let mut driver = Nvidia::new(Recorded::default());
        driver.discover().unwrap();
        driver
    }

    fn soft(device_index: u32, share: u8, memory_mib: u64) -> PartitionSpec {
        PartitionSpec {
            device_index,
            isolation: Isolation::Soft,
            slicing: Slicing::Time,
            memory_quota_mib: memory_mib,
            compute_share_pct: share,
        }
    }

    #[test]
    fn cards_are_named_and_read_from_nvml() {
        let mut driver = driver();
        let devices = driver.devices().unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].accelerator_type, "NVIDIA_T4");
        assert_eq!(devices[0].id, "GPU-8a8b7d6e-3a0f-4c2b-9e1d-5f4a3b2c1d0e");
        assert_eq!(devices[0].memory_total_mib, Some(15360));
        assert_eq!(devices[0].pci_bus_id.as_deref(), Some("00000000:3B:00.0"));
        assert_eq!(devices[0].health, Health::Healthy);
        assert_eq!(devices[1].accelerator_type, "NVIDIA_A100_40GB");
        // In MIG mode the card has no whole-card utilisation (its instances have
        // theirs): that figure is absent, and the card is healthy.
        assert_eq!(devices[1].health, Health::Healthy);

        let metrics = driver.sample().unwrap();
        let t4 = &metrics.cards[0];
        assert_eq!(t4.ai_utilization_pct, Some(37.0));
        assert_eq!(t4.memory_used_mib, Some(345));
        assert_eq!(t4.memory_total_mib, Some(15360));
        assert_eq!(t4.video_decode_utilization_pct, Some(18.0));
        assert_eq!(t4.picture_decode_utilization_pct, None);
        assert_eq!(t4.temperature_celsius, Some(48.0));
        assert!((t4.power_watts.unwrap() - 27.512).abs() < 1e-4);
        // What NVML could not read is absent, never 0.
        assert_eq!(metrics.cards[1].ai_utilization_pct, None);
        assert_eq!(metrics.cards[1].picture_decode_utilization_pct, Some(4.0));

        let labels = driver.labels().unwrap();
        let value = |key: &str| {
            labels
                .iter()
                .find(|l| l.key == key)
                .map(|l| l.value.clone())
        };
        assert_eq!(
            value("xpu.model").as_deref(),
            Some("NVIDIA_A100_40GB.NVIDIA_T4")
        );
        assert_eq!(value("xpu.count").as_deref(), Some("2"));
        assert_eq!(value("xpu.mig-capable").as_deref(), Some("true"));
        assert_eq!(value("xpu.mig-enabled").as_deref(), Some("true"));
        // The T4 shares by soft quotas, the A100 by MIG instances.
        assert_eq!(
            value("xpu.sharing").as_deref(),
            Some("soft-quota.hard-partition")
        );
    }

    #[test]
    fn time_sliced_partitions_fill_a_card_exactly_then_are_refused() {
        let mut driver = driver();
        let a = driver.create_partition(soft(0, 50, 7680)).unwrap();
        assert_eq!(a.id, "ts-0-1");
        assert_eq!(
            key(&a)[1..],
            key(&Partition {
                id: String::new(),
                spec: soft(0, 50, 7680)
            })[1..]
        );
        driver.create_partition(soft(0, 50, 7680)).unwrap();
        let err = driver.create_partition(soft(0, 10, 1)).unwrap_err();
        assert!(matches!(err, DriverError::InsufficientResources(m) if m.contains("100 %")));
        driver.destroy_partition(a.id.clone()).unwrap();
        let err = driver.create_partition(soft(0, 10, 8000)).unwrap_err();
        assert!(matches!(err, DriverError::InsufficientResources(m) if m.contains("MiB")));
        driver.create_partition(soft(0, 10, 7680)).unwrap();
        let hard = PartitionSpec {
            isolation: Isolation::Hard,
            slicing: Slicing::Space,
            ..soft(0, 10, 100)
        };
        let err = driver.create_partition(hard).unwrap_err();
        assert!(matches!(err, DriverError::Unsupported(m) if m.contains("MIG")));
        assert!(matches!(
            driver.destroy_partition("ts-0-99".into()),
            Err(DriverError::NotFound(_))
        ));
        // Without a process named for them, their usage is unknown: absent.
        let instances = driver.sample().unwrap().instances;
        assert_eq!(instances.len(), 2);
        assert!(instances
            .iter()
            .all(|i| i.memory_used_mib.is_none() && i.ai_utilization_pct.is_none()));
    }

    /// A time slice's figures are those NVML measures of the process the host
    /// names for it, and absent while NVML does not list that process.
    #[test]
    fn a_time_slice_is_measured_by_the_process_it_runs_in() {
        let mut driver = driver();
        driver.nvml.cards[0].processes = vec![
            ProcessUsage {
                pid: 4242,
                used_memory_bytes: Some(512 * MIB),
                sm_utilization_pct: Some(33),
                memory_utilization_pct: Some(10),
                decoder_utilization_pct: None,
                encoder_utilization_pct: None,
                gpu_instance_id: None,
                compute_instance_id: None,
            },
            ProcessUsage {
                pid: 5151,
                used_memory_bytes: Some(300 * MIB),
                sm_utilization_pct: None,
                memory_utilization_pct: None,
                decoder_utilization_pct: None,
                encoder_utilization_pct: None,
                gpu_instance_id: None,
                compute_instance_id: None,
            },
        ];
        let a = driver.create_partition(soft(0, 50, 4096)).unwrap();
        let b = driver.create_partition(soft(0, 25, 2048)).unwrap();
        let c = driver.create_partition(soft(0, 25, 2048)).unwrap();
        driver.bind_process(&a.id, 4242).unwrap();
        driver.bind_process(&b.id, 5151).unwrap();
        driver.bind_process(&c.id, 6000).unwrap();
        let instances = driver.sample().unwrap().instances;
        // One listing of the T4's processes serves its three slices (the A100 has
        // no MIG instance to list processes for).
        assert_eq!(driver.nvml.process_calls.get(), 1);
        let of = |id: &str| instances.iter().find(|i| i.partition_id == id).unwrap();
        assert_eq!(of(&a.id).memory_used_mib, Some(512));
        assert_eq!(of(&a.id).ai_utilization_pct, Some(33.0));
        assert_eq!(of(&a.id).memory_quota_mib, 4096);
        // Measured memory, no utilisation sample: that figure alone is absent.
        assert_eq!(of(&b.id).memory_used_mib, Some(300));
        assert_eq!(of(&b.id).ai_utilization_pct, None);
        // A process NVML does not list (no CUDA context yet, or another pid
        // namespace): unknown, not idle.
        assert_eq!(of(&c.id).memory_used_mib, None);
        assert_eq!(of(&c.id).ai_utilization_pct, None);

        // Another process takes over (a worker started again).
        driver.bind_process(&c.id, 4242).unwrap();
        let instances = driver.sample().unwrap().instances;
        let c = instances.iter().find(|i| i.partition_id == c.id).unwrap();
        assert_eq!(c.memory_used_mib, Some(512));
    }

    #[test]
    fn mig_partitions_are_instances_of_the_profile_that_covers_the_spec() {
        let mut driver = driver();
        let made = driver.create_partition(soft(1, 14, 4096)).unwrap();
        assert_eq!(made.id, "mig-1-1");
        assert_eq!(made.spec.isolation, Isolation::Hard);
        assert_eq!(made.spec.slicing, Slicing::Space);
        assert_eq!(made.spec.memory_quota_mib, 4864);
        assert_eq!(made.spec.compute_share_pct, 14);
        let bigger = driver.create_partition(soft(1, 40, 16384)).unwrap();
        assert_eq!(bigger.spec.compute_share_pct, 42);
        assert_eq!(bigger.spec.memory_quota_mib, 19968);

        // What the hardware lists reads the same as what was made: a restarted
        // plugin's partitions reconcile with the host's ledger.
        let listed = driver.partitions().unwrap();
        assert_eq!(keys(&listed), keys(&[made.clone(), bigger.clone()]));

        // Instance figures: memory from the MIG device, utilisation from the
        // processes NVML places in it.
        driver.nvml.cards[1].processes = vec![ProcessUsage {
            pid: 4242,
            used_memory_bytes: Some(900 * MIB),
            sm_utilization_pct: Some(61),
            memory_utilization_pct: Some(20),
            decoder_utilization_pct: None,
            encoder_utilization_pct: None,
            gpu_instance_id: Some(1),
            compute_instance_id: Some(0),
        }];
        let instances = driver.sample().unwrap().instances;
        let first = instances
            .iter()
            .find(|i| i.partition_id == "mig-1-1")
            .unwrap();
        assert_eq!(first.ai_utilization_pct, Some(61.0));
        assert_eq!(first.memory_used_mib, Some(13));
        assert_eq!(first.memory_quota_mib, 4864);
        let second = instances
            .iter()
            .find(|i| i.partition_id == "mig-1-2")
            .unwrap();
        assert_eq!(second.ai_utilization_pct, None);
        // A MIG device that does not say its memory: the quota is its profile's.
        driver.nvml.cards[1].instances[0].memory_total_bytes = None;
        let instances = driver.sample().unwrap().instances;
        let first = instances
            .iter()
            .find(|i| i.partition_id == "mig-1-1")
            .unwrap();
        assert_eq!(first.memory_quota_mib, 4864);

        driver.destroy_partition(made.id).unwrap();
        assert_eq!(keys(&driver.partitions().unwrap()), keys(&[bigger]));
        assert!(matches!(
            driver.destroy_partition("mig-1-77".into()),
            Err(DriverError::NotFound(_))
        ));
        // The whole card does not fit beside the 3g instance left on it.
        let err = driver.create_partition(soft(1, 100, 40192)).unwrap_err();
        assert!(
            matches!(err, DriverError::InsufficientResources(_)),
            "{err:?}"
        );
    }

    #[test]
    fn a_mig_partition_is_a_device_of_its_own_and_a_time_slice_is_its_card() {
        let mut driver = driver();
        let mig = driver.create_partition(soft(1, 14, 4096)).unwrap();
        assert_eq!(
            driver.partition_device(&mig.id).unwrap().as_deref(),
            Some("MIG-00000001-aaaa-bbbb-cccc-dddddddddddd")
        );
        let shared = driver.create_partition(soft(0, 50, 1024)).unwrap();
        assert_eq!(
            driver.partition_device(&shared.id).unwrap().as_deref(),
            Some("GPU-8a8b7d6e-3a0f-4c2b-9e1d-5f4a3b2c1d0e")
        );
        for unknown in ["mig-1-77", "ts-0-99", "anything"] {
            assert!(
                matches!(
                    driver.partition_device(unknown),
                    Err(DriverError::NotFound(_))
                ),
                "{unknown}"
            );
            assert!(
                matches!(
                    driver.bind_process(unknown, 7),
                    Err(DriverError::NotFound(_))
                ),
                "{unknown}"
            );
        }
        // A GPU instance without a compute instance has no CUDA device yet.
        driver.nvml.cards[1].instances[0].uuid = None;
        assert!(matches!(
            driver.partition_device(&mig.id),
            Err(DriverError::DeviceFailure(m)) if m.contains("no device uuid")
        ));
    }

    #[test]
    fn a_card_that_falls_off_the_bus_is_unhealthy_and_has_no_figures() {
        let mut driver = driver();
        driver.nvml.cards[0].sample = Err(NvmlError::GpuLost("GPU is lost".into()));
        let metrics = driver.sample().unwrap();
        assert_eq!(metrics.cards.len(), 1);
        assert_eq!(metrics.cards[0].device_index, 1);
        let lost = driver.devices_version();
        let devices = driver.devices().unwrap();
        assert_eq!(devices[0].health, Health::Unhealthy);
        assert_eq!(devices[0].accelerator_type, "NVIDIA_T4");
        // Back on the next sample, which says the devices changed again.
        driver.nvml.cards[0].sample = t4().sample;
        driver.sample().unwrap();
        assert_ne!(driver.devices_version(), lost);
        let devices = driver.devices().unwrap();
        assert_eq!(devices[0].health, Health::Healthy);
    }

    #[test]
    fn the_devices_version_changes_with_health_only() {
        let mut driver = driver();
        driver.sample().unwrap();
        let steady = driver.devices_version();
        driver.sample().unwrap();
        assert_eq!(driver.devices_version(), steady, "nothing changed");
        driver.nvml.cards[0].sample = Err(NvmlError::GpuLost("GPU is lost".into()));
        driver.sample().unwrap();
        assert_ne!(driver.devices_version(), steady, "a card became unhealthy");
    }

    #[test]
    fn a_round_reads_every_card_in_one_call() {
        let mut driver = driver();
        let before = driver.nvml.sample_calls.get();
        let metrics = driver.sample().unwrap();
        assert_eq!(metrics.cards.len(), 2);
        assert_eq!(driver.nvml.sample_calls.get() - before, 1);
        // The A100 is in MIG mode without instances: no processes to attribute.
        assert_eq!(driver.nvml.process_calls.get(), 0);
    }

    #[test]
    fn a_sample_call_that_fails_leaves_every_card_without_figures() {
        let mut driver = driver();
        driver.nvml.sample_refused = Some(NvmlError::Failed("Unknown Error".into()));
        let metrics = driver.sample().unwrap();
        assert!(metrics.cards.is_empty(), "{:?}", metrics.cards);
        let devices = driver.devices().unwrap();
        assert!(devices.iter().all(|d| d.health == Health::Unknown));
        driver.nvml.sample_refused = None;
        assert_eq!(driver.sample().unwrap().cards.len(), 2);
        assert_eq!(driver.devices().unwrap()[0].health, Health::Healthy);
    }

    #[test]
    fn a_card_outside_mig_mode_without_utilisation_is_degraded() {
        let mut driver = driver();
        if let Ok(s) = &mut driver.nvml.cards[0].sample {
            s.gpu_utilization_pct = None;
        }
        driver.sample().unwrap();
        assert_eq!(driver.devices().unwrap()[0].health, Health::Degraded);
    }

    #[test]
    fn without_nvml_there_are_no_cards_and_no_error() {
        #[derive(Default)]
        struct Absent;
        impl Nvml for Absent {
            fn device_count(&self) -> Result<u32, NvmlError> {
                Err(NvmlError::Unavailable(
                    "libnvidia-ml.so.1: cannot open shared object file".into(),
                ))
            }
            fn info(&self, _: u32) -> Result<DeviceInfo, NvmlError> {
                unreachable!()
            }
            fn sample(&self, _: &[u32]) -> Result<Vec<Result<Sample, NvmlError>>, NvmlError> {
                unreachable!()
            }
            fn processes(&self, _: u32) -> Result<Vec<ProcessUsage>, NvmlError> {
                unreachable!()
            }
            fn mig_mode(&self, _: u32) -> Result<MigState, NvmlError> {
                unreachable!()
            }
            fn mig_profiles(&self, _: u32) -> Result<Vec<MigProfile>, NvmlError> {
                unreachable!()
            }
            fn mig_instances(&self, _: u32) -> Result<Vec<MigInstance>, NvmlError> {
                unreachable!()
            }
            fn create_mig_instance(&mut self, _: u32, _: u32) -> Result<MigInstance, NvmlError> {
                unreachable!()
            }
            fn destroy_mig_instance(&mut self, _: u32, _: u32) -> Result<(), NvmlError> {
                unreachable!()
            }
        }
        let mut driver = Nvidia::new(Absent);
        assert!(matches!(driver.discover(), Err(NvmlError::Unavailable(_))));
        assert!(driver.devices().unwrap().is_empty());
        let metrics = driver.sample().unwrap();
        assert!(metrics.cards.is_empty() && metrics.instances.is_empty());
        assert!(matches!(
            driver.create_partition(soft(0, 10, 10)),
            Err(DriverError::NotFound(_))
        ));
    }
}
