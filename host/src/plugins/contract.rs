//! A driver's answers, checked against the contract before the host uses them.
//!
//! The WIT types say what shape an answer has; this says which values make sense:
//! bounded counts and string lengths (`[plugin-limits]`), finite figures in their
//! ranges, unique device indices, memory used within the total, a partition that
//! is the one asked for on a device that exists. An answer that breaks it is
//! refused whole: its figures are never mixed with good ones, and the driver is
//! shown degraded with the reason.

use std::collections::HashSet;

use crate::runtime::bindings::driver_types::{
    Device, DriverInfo, Isolation, Label, Metrics, Partition, PartitionSpec, Slicing,
};
use crate::runtime::PluginLimits;

/// No accelerator has more memory than this (16 TiB, in MiB).
const MAX_MEMORY_MIB: u64 = 16 << 20;
const CELSIUS: std::ops::RangeInclusive<f32> = -60.0..=250.0;
const WATTS: std::ops::RangeInclusive<f32> = 0.0..=10_000.0;

pub type Violation = String;

/// Where in an answer a value is: said only when the value is wrong, so that a
/// good answer (every sample, every round) is checked without formatting a thing.
#[derive(Clone, Copy)]
enum At<'a> {
    Answer,
    Device(u32),
    Card(u32),
    Instance(&'a str),
}

impl std::fmt::Display for At<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            At::Answer => Ok(()),
            At::Device(i) => write!(f, "device {i}"),
            At::Card(i) => write!(f, "card {i}"),
            At::Instance(id) => write!(f, "instance {id:?}"),
        }
    }
}

/// `field` of the value at `at`, for a message.
fn name(at: At<'_>, field: &str) -> String {
    match at {
        At::Answer => field.to_string(),
        _ => format!("{at} {field}"),
    }
}

fn text(at: At<'_>, field: &str, value: &str, limits: &PluginLimits) -> Result<(), Violation> {
    let max = limits.max_string_bytes as usize;
    if value.len() > max {
        return Err(format!(
            "{} is {} bytes, above {max} ([plugin-limits] max-string-bytes)",
            name(at, field),
            value.len()
        ));
    }
    // Printable ASCII (ids, type names, bus ids) is checked a byte at a time; only
    // other text is decoded to find control characters (C0, DEL, C1).
    let printable_ascii = value.bytes().all(|b| (0x20..0x7f).contains(&b));
    if !printable_ascii && value.chars().any(char::is_control) {
        return Err(format!("{} contains control characters", name(at, field)));
    }
    Ok(())
}

fn count(field: &str, n: usize, max: u32, key: &str) -> Result<(), Violation> {
    if n > max as usize {
        return Err(format!("{n} {field}, above {max} ([plugin-limits] {key})"));
    }
    Ok(())
}

fn percent(at: At<'_>, field: &str, value: Option<f32>) -> Result<(), Violation> {
    match value {
        Some(v) if !(0.0..=100.0).contains(&v) => {
            Err(format!("{} is {v}, outside 0-100 percent", name(at, field)))
        }
        _ => Ok(()),
    }
}

fn within(
    at: At<'_>,
    field: &str,
    value: Option<f32>,
    range: std::ops::RangeInclusive<f32>,
) -> Result<(), Violation> {
    match value {
        Some(v) if !range.contains(&v) => Err(format!(
            "{} is {v}, outside {}-{}",
            name(at, field),
            range.start(),
            range.end()
        )),
        _ => Ok(()),
    }
}

fn memory(at: At<'_>, field: &str, value: Option<u64>) -> Result<(), Violation> {
    match value {
        Some(v) if v > MAX_MEMORY_MIB => Err(format!(
            "{} is {v} MiB, more than any accelerator has ({MAX_MEMORY_MIB})",
            name(at, field)
        )),
        _ => Ok(()),
    }
}

pub fn info(info: &DriverInfo, limits: &PluginLimits) -> Result<(), Violation> {
    text(At::Answer, "vendor", &info.vendor, limits)?;
    text(At::Answer, "version", &info.version, limits)?;
    count(
        "accelerator types",
        info.accelerator_types.len(),
        limits.max_devices,
        "max-devices",
    )?;
    for t in &info.accelerator_types {
        text(At::Answer, "accelerator type", t, limits)?;
    }
    Ok(())
}

/// The first item whose key an earlier one has: a scan for the few cards a driver
/// has (no allocation on every sample), a set beyond.
fn first_repeat<'a, T, K: Eq + std::hash::Hash>(
    items: &'a [T],
    key: impl Fn(&'a T) -> K,
) -> Option<&'a T> {
    if items.len() <= 64 {
        items
            .iter()
            .enumerate()
            .find(|(i, item)| items[..*i].iter().any(|p| key(p) == key(item)))
            .map(|(_, item)| item)
    } else {
        let mut seen = HashSet::with_capacity(items.len());
        items.iter().find(|item| !seen.insert(key(item)))
    }
}

pub fn devices(devices: &[Device], limits: &PluginLimits) -> Result<(), Violation> {
    count("devices", devices.len(), limits.max_devices, "max-devices")?;
    if let Some(d) = first_repeat(devices, |d| d.index) {
        return Err(format!("{}: index reported twice", At::Device(d.index)));
    }
    if let Some(d) = first_repeat(devices, |d| d.id.as_str()) {
        return Err(format!(
            "{}: id {:?} reported twice",
            At::Device(d.index),
            d.id
        ));
    }
    for d in devices {
        let at = At::Device(d.index);
        text(at, "id", &d.id, limits)?;
        text(at, "accelerator-type", &d.accelerator_type, limits)?;
        for (field, value) in [("uuid", &d.uuid), ("pci-bus-id", &d.pci_bus_id)] {
            if let Some(value) = value {
                text(at, field, value, limits)?;
            }
        }
        memory(at, "memory-total-mib", d.memory_total_mib)?;
    }
    Ok(())
}

pub fn metrics(
    metrics: &Metrics,
    devices: &[Device],
    limits: &PluginLimits,
) -> Result<(), Violation> {
    count(
        "cards",
        metrics.cards.len(),
        limits.max_devices,
        "max-devices",
    )?;
    count(
        "instances",
        metrics.instances.len(),
        limits.max_partitions,
        "max-partitions",
    )?;
    if let Some(card) = first_repeat(&metrics.cards, |c| c.device_index) {
        return Err(format!("{}: sampled twice", At::Card(card.device_index)));
    }
    for card in &metrics.cards {
        let at = At::Card(card.device_index);
        let Some(device) = devices.iter().find(|d| d.index == card.device_index) else {
            return Err(format!("{at}: no such device"));
        };
        percent(at, "ai-utilization-pct", card.ai_utilization_pct)?;
        percent(
            at,
            "video-decode-utilization-pct",
            card.video_decode_utilization_pct,
        )?;
        percent(
            at,
            "picture-decode-utilization-pct",
            card.picture_decode_utilization_pct,
        )?;
        within(at, "temperature-celsius", card.temperature_celsius, CELSIUS)?;
        within(at, "power-watts", card.power_watts, WATTS)?;
        memory(at, "memory-used-mib", card.memory_used_mib)?;
        memory(at, "memory-total-mib", card.memory_total_mib)?;
        let total = card.memory_total_mib.or(device.memory_total_mib);
        if let (Some(used), Some(total)) = (card.memory_used_mib, total) {
            if used > total {
                return Err(format!(
                    "{at}: memory-used-mib {used} is above its total {total}"
                ));
            }
        }
    }
    let mut partitions = HashSet::new();
    for instance in &metrics.instances {
        text(
            At::Answer,
            "instance partition-id",
            &instance.partition_id,
            limits,
        )?;
        let at = At::Instance(&instance.partition_id);
        if !partitions.insert(instance.partition_id.as_str()) {
            return Err(format!("{at}: sampled twice"));
        }
        if !devices.iter().any(|d| d.index == instance.device_index) {
            return Err(format!(
                "{at}: on device {}, which does not exist",
                instance.device_index
            ));
        }
        percent(at, "ai-utilization-pct", instance.ai_utilization_pct)?;
        memory(at, "memory-used-mib", instance.memory_used_mib)?;
        memory(at, "memory-quota-mib", Some(instance.memory_quota_mib))?;
    }
    Ok(())
}

pub fn partitions(partitions: &[Partition], limits: &PluginLimits) -> Result<(), Violation> {
    count(
        "partitions",
        partitions.len(),
        limits.max_partitions,
        "max-partitions",
    )?;
    let mut ids = HashSet::new();
    for p in partitions {
        text(At::Answer, "partition id", &p.id, limits)?;
        if !ids.insert(p.id.as_str()) {
            return Err(format!("partition {:?} reported twice", p.id));
        }
    }
    Ok(())
}

/// A partition the driver says it made for `asked`: on the device asked for, one it
/// reported, within that device's memory, and covering the spec. A driver may give
/// more than asked where the hardware comes in fixed sizes (a MIG profile): at least
/// the memory and compute share, isolation as strong, and space slicing for space
/// (space slicing also serves a time-sliced ask: the slice is the replica's alone).
pub fn created(
    asked: &PartitionSpec,
    made: &Partition,
    devices: Option<&[Device]>,
    limits: &PluginLimits,
) -> Result<(), Violation> {
    text(At::Answer, "partition id", &made.id, limits)?;
    let s = &made.spec;
    let covers = s.device_index == asked.device_index
        && (s.isolation == asked.isolation || s.isolation == Isolation::Hard)
        && (s.slicing == asked.slicing || s.slicing == Slicing::Space)
        && s.memory_quota_mib >= asked.memory_quota_mib
        && s.compute_share_pct >= asked.compute_share_pct
        && (1..=100).contains(&s.compute_share_pct);
    if !covers {
        return Err(format!(
            "partition {:?} does not cover the spec asked for (device {}, {} MiB, {} %): \
             device {}, {} MiB, {} %",
            made.id,
            asked.device_index,
            asked.memory_quota_mib,
            asked.compute_share_pct,
            s.device_index,
            s.memory_quota_mib,
            s.compute_share_pct
        ));
    }
    if let Some(devices) = devices {
        let Some(device) = devices.iter().find(|d| d.index == s.device_index) else {
            return Err(format!(
                "partition {:?} was made on device {}, which the driver does not report",
                made.id, s.device_index
            ));
        };
        if let Some(total) = device.memory_total_mib {
            if s.memory_quota_mib > total {
                return Err(format!(
                    "partition {:?} has {} MiB on a device of {total} MiB",
                    made.id, s.memory_quota_mib
                ));
            }
        }
    }
    Ok(())
}

pub fn labels(labels: &[Label], limits: &PluginLimits) -> Result<(), Violation> {
    count("labels", labels.len(), limits.max_devices, "max-devices")?;
    for label in labels {
        text(At::Answer, "label key", &label.key, limits)?;
        text(At::Answer, "label value", &label.value, limits)?;
    }
    Ok(())
}

/// The device of partition `id`: one name a process is given to see it alone
/// (`CUDA_VISIBLE_DEVICES`), not a list of them.
pub fn partition_device(id: &str, device: &str, limits: &PluginLimits) -> Result<(), Violation> {
    let at = At::Instance(id);
    text(at, "device", device, limits)?;
    if device.is_empty() || device.contains(|c: char| c == ',' || c.is_whitespace()) {
        return Err(format!("{at}: device {device:?} is not one device's name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::bindings::driver_types::{CardMetrics, Health, InstanceMetrics};

    fn device(index: u32) -> Device {
        Device {
            id: format!("d{index}"),
            uuid: None,
            index,
            accelerator_type: "SIM_T4".into(),
            memory_total_mib: Some(16_384),
            decoder_units: None,
            encoder_units: None,
            pci_bus_id: None,
            health: Health::Healthy,
        }
    }

    fn card(index: u32) -> CardMetrics {
        CardMetrics {
            device_index: index,
            ai_utilization_pct: Some(10.0),
            memory_used_mib: Some(100),
            memory_total_mib: Some(16_384),
            video_decode_utilization_pct: None,
            picture_decode_utilization_pct: None,
            temperature_celsius: Some(40.0),
            power_watts: Some(70.0),
        }
    }

    fn sample(cards: Vec<CardMetrics>) -> Metrics {
        Metrics {
            cards,
            instances: vec![],
        }
    }

    #[test]
    fn figures_out_of_range_or_not_numbers_are_violations() {
        let limits = PluginLimits::default();
        let devices = [device(0)];
        assert!(metrics(&sample(vec![card(0)]), &devices, &limits).is_ok());
        type Spoil = fn(&mut CardMetrics);
        let cases: Vec<(Spoil, &str)> = vec![
            (
                |c| c.ai_utilization_pct = Some(f32::NAN),
                "ai-utilization-pct is NaN",
            ),
            (|c| c.ai_utilization_pct = Some(-1.0), "outside 0-100"),
            (
                |c| c.power_watts = Some(f32::INFINITY),
                "power-watts is inf",
            ),
            (|c| c.memory_used_mib = Some(20_000), "above its total"),
            (
                |c| c.memory_total_mib = Some(u64::MAX),
                "more than any accelerator",
            ),
            (|c| c.device_index = 7, "no such device"),
        ];
        for (spoil, expected) in cases {
            let mut c = card(0);
            spoil(&mut c);
            let err = metrics(&sample(vec![c]), &devices, &limits).unwrap_err();
            assert!(err.contains(expected), "{err} / {expected}");
        }
        let err = metrics(&sample(vec![card(0), card(0)]), &devices, &limits).unwrap_err();
        assert!(err.contains("sampled twice"), "{err}");
    }

    #[test]
    fn counts_strings_and_duplicates_are_bounded() {
        let limits = PluginLimits::default();
        let many: Vec<Device> = (0..200_000).map(device).collect();
        assert!(devices(&many, &limits).unwrap_err().contains("max-devices"));
        let mut long = device(0);
        long.accelerator_type = "X".repeat(20 << 20);
        assert!(devices(&[long], &limits)
            .unwrap_err()
            .contains("max-string-bytes"));
        assert!(devices(&[device(1), device(1)], &limits)
            .unwrap_err()
            .contains("index reported twice"));
        let mut forged = device(0);
        forged.id = "ok\nERROR forged".into();
        assert!(devices(&[forged], &limits).unwrap_err().contains("control"));
        let instance = InstanceMetrics {
            partition_id: "p".into(),
            device_index: 3,
            ai_utilization_pct: None,
            memory_used_mib: None,
            memory_quota_mib: 1,
        };
        let with_instance = Metrics {
            cards: vec![],
            instances: vec![instance],
        };
        assert!(metrics(&with_instance, &[device(0)], &limits)
            .unwrap_err()
            .contains("does not exist"));
    }

    /// Repeats are found by a scan for a few items and by a set for many: the
    /// same answer either way.
    #[test]
    fn repeats_are_found_among_few_and_many() {
        for n in [8u32, 64, 65, 300] {
            let mut items: Vec<u32> = (0..n).collect();
            assert_eq!(first_repeat(&items, |i| *i), None, "{n}");
            items.push(n / 2);
            assert_eq!(first_repeat(&items, |i| *i), Some(&(n / 2)), "{n}");
        }
    }

    #[test]
    fn a_partition_must_cover_the_one_asked_for_on_a_real_device() {
        use crate::runtime::bindings::driver_types::{Isolation, Slicing};
        let limits = PluginLimits::default();
        let asked = PartitionSpec {
            device_index: 0,
            isolation: Isolation::Soft,
            slicing: Slicing::Time,
            memory_quota_mib: 1024,
            compute_share_pct: 50,
        };
        let made = |spec| Partition {
            id: "p0".into(),
            spec,
        };
        let devices = [device(0)];
        assert!(created(&asked, &made(asked), Some(&devices), &limits).is_ok());
        let other = PartitionSpec {
            memory_quota_mib: 1 << 30,
            ..asked
        };
        assert!(created(&asked, &made(other), Some(&devices), &limits)
            .unwrap_err()
            .contains("on a device of"));
        // More than asked, in a stronger mode: a MIG instance for a soft share.
        let mig = PartitionSpec {
            isolation: Isolation::Hard,
            slicing: Slicing::Space,
            memory_quota_mib: 2048,
            compute_share_pct: 57,
            ..asked
        };
        assert!(created(&asked, &made(mig), Some(&devices), &limits).is_ok());
        // Less than asked, or weaker, is refused.
        for short in [
            PartitionSpec {
                memory_quota_mib: 512,
                ..asked
            },
            PartitionSpec {
                compute_share_pct: 40,
                ..asked
            },
            PartitionSpec {
                compute_share_pct: 101,
                ..asked
            },
        ] {
            assert!(created(&asked, &made(short), Some(&devices), &limits)
                .unwrap_err()
                .contains("does not cover"));
        }
        let hard = PartitionSpec {
            isolation: Isolation::Hard,
            ..asked
        };
        assert!(created(&hard, &made(asked), Some(&devices), &limits)
            .unwrap_err()
            .contains("does not cover"));
        let missing = PartitionSpec {
            device_index: 9,
            ..asked
        };
        assert!(created(&missing, &made(missing), Some(&devices), &limits)
            .unwrap_err()
            .contains("does not report"));
        let huge = PartitionSpec {
            memory_quota_mib: 99_999,
            ..asked
        };
        assert!(created(&huge, &made(huge), Some(&devices), &limits)
            .unwrap_err()
            .contains("on a device of"));
    }
}
