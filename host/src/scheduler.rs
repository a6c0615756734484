//! Placement of algorithm replicas on this machine's accelerators, for services
//! (Appendix F) and workloads (Appendix B) alike, from one ledger so that the two
//! never over-commit a card between them.
//!
//! A replica asks for a share of a card of one type (`quota`, 0-1, or a whole number
//! of cards) and device memory (asked for, else the same share of the card's).
//! Cards that are already partly used fill up first; neither the shares nor the
//! memory held on a card ever exceed it. Where the driver can partition, the
//! replica gets a real partition (soft isolation, time slicing, the share as
//! compute share, its memory as quota; a driver may make it bigger, e.g. a MIG
//! profile, and the ledger then holds what was made); where it cannot, this
//! ledger's accounting still holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::machine::XpuSample;
use crate::plugins::driver::{Driver, DriverFailure};
use crate::plugins::Registry;
use crate::runtime::bindings::driver_types::{
    DriverError, Health as DeviceHealth, Isolation, PartitionSpec, Slicing,
};
use crate::runtime::inference::{Device, PartitionDevice};

/// Where one replica runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Placement {
    /// The driver plugin and the card's index in it; none for a CPU-only replica.
    pub card: Option<(String, u32)>,
    /// Share of the card (1.0 = all of it).
    pub quota: f64,
    /// The driver's partition, where it could make one.
    pub partition: Option<String>,
    /// Device memory held on the card (MiB), where the card's memory is known or
    /// the replica asked for some.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// The partition is a device of its own (hard isolation: a MIG instance), not
    /// a quota on the card.
    #[serde(default)]
    pub isolated: bool,
    /// The partition's device as a process is given it to see it alone (a MIG
    /// instance's uuid, a time slice's card's), where the driver said.
    #[serde(default)]
    pub partition_device: Option<String>,
}

impl Placement {
    /// Its card as `driver/index` (how monitors and details name cards), or "CPU".
    pub fn card_name(&self) -> String {
        self.card
            .as_ref()
            .map_or_else(|| "CPU".to_string(), |(d, i)| format!("{d}/{i}"))
    }

    /// Where the replica's models run. On a partition whose driver names its
    /// device: in a worker process that sees only it, measured apart from the
    /// others. A partition that is a device of its own (a MIG instance) the driver
    /// did not name is one xpud's process cannot use (CUDA lets a process use a
    /// single MIG device, and no other GPU beside it): the CPU, and the log says
    /// so. Otherwise its card's CUDA device, else the CPU.
    pub fn device(&self, xpu_type: &str) -> Device {
        let card = self.card.as_ref().map(|(d, i)| (d.as_str(), *i));
        let shared = || match Device::for_card(card, xpu_type) {
            Device::Card(ordinal) if !self.isolated => Some(ordinal),
            _ => None,
        };
        match (card, &self.partition, &self.partition_device) {
            (Some((driver, _)), Some(partition), Some(visible)) if Device::drives(xpu_type) => {
                Device::Partition(Arc::new(PartitionDevice {
                    driver: driver.to_string(),
                    partition: partition.clone(),
                    visible: visible.clone(),
                    card_ordinal: shared(),
                    memory_quota_mib: self.memory_mib,
                }))
            }
            _ if self.isolated => {
                if Device::drives(xpu_type) {
                    tracing::warn!(
                        card = %self.card_name(),
                        partition = self.partition.as_deref().unwrap_or_default(),
                        "the replica's partition is a device of its own (a MIG \
                         instance) its driver did not name: its models run on the CPU"
                    );
                }
                Device::Cpu
            }
            _ => Device::for_card(card, xpu_type),
        }
    }
}

/// What an owner asks for: `count` replicas, each `quota` of a card of `xpu_type`
/// (or whole cards), with `memory_mib` of its memory (`None`: the same share of the
/// card's), on cards whose drivers' labels hold every pair of `selector`.
#[derive(Clone, Debug)]
pub struct Ask<'a> {
    pub count: u32,
    pub quota: f64,
    pub memory_mib: Option<u64>,
    pub xpu_type: &'a str,
    pub selector: &'a BTreeMap<String, String>,
}

/// Accelerator type names compare without case or punctuation: "NVidia A2" is NVIDIA_A2.
pub fn same_type(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    norm(a) == norm(b)
}

pub struct Scheduler {
    registry: Arc<Registry>,
    /// Placements by owner (`service:<id>`, `workload:<key>`).
    ledger: Mutex<HashMap<String, Vec<Placement>>>,
}

struct Card<'a> {
    driver: &'a str,
    index: u32,
    /// Memory not held by anyone, where the card's total is known.
    memory_free_mib: Option<u64>,
    memory_total_mib: Option<u64>,
    free: f64,
}

/// What the ledger holds on each card: (share, memory MiB).
fn held_on_cards(ledger: &HashMap<String, Vec<Placement>>) -> HashMap<(String, u32), (f64, u64)> {
    let mut held: HashMap<(String, u32), (f64, u64)> = HashMap::new();
    for placement in ledger.values().flatten() {
        if let Some(card) = &placement.card {
            let entry = held.entry(card.clone()).or_default();
            entry.0 += placement.quota.min(1.0);
            entry.1 += placement.memory_mib.unwrap_or(0);
        }
    }
    held
}

impl Scheduler {
    pub fn new(registry: Arc<Registry>) -> Scheduler {
        Scheduler {
            registry,
            ledger: Mutex::new(HashMap::new()),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Placement>>> {
        crate::sync::lock(&self.ledger)
    }

    fn driver(&self, name: &str) -> Option<Arc<Driver>> {
        self.registry
            .drivers()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d)
    }

    /// Who holds each driver partition: ((driver, partition), owner).
    pub fn partition_owners(&self) -> HashMap<(String, String), String> {
        let mut owners = HashMap::new();
        for (owner, held) in self.ledger().iter() {
            for placement in held {
                if let (Some((driver, _)), Some(partition)) =
                    (&placement.card, &placement.partition)
                {
                    owners.insert((driver.clone(), partition.clone()), owner.clone());
                }
            }
        }
        owners
    }

    /// What `owner` holds.
    pub fn held_by(&self, owner: &str) -> Vec<Placement> {
        self.ledger().get(owner).cloned().unwrap_or_default()
    }

    /// Places what `ask` asks for, for `owner`, with partitions where drivers can.
    /// All of it, or none (and nothing kept).
    pub fn reserve(
        &self,
        owner: &str,
        ask: &Ask<'_>,
        xpus: &[XpuSample],
    ) -> Result<Vec<Placement>> {
        let quota = ask.quota;
        if !(quota == 0.0 || (quota > 0.0 && quota <= 1.0) || quota.fract() == 0.0) {
            return Err(Error::Invalid(format!(
                "accelerator share {quota}: up to 1 card, or a whole number of cards"
            )));
        }
        // The ledger stays locked from choice to record: nobody takes the same share.
        let mut ledger = self.ledger();
        let chosen = if quota == 0.0 {
            (0..ask.count)
                .map(|_| Placement {
                    card: None,
                    quota: 0.0,
                    partition: None,
                    memory_mib: None,
                    isolated: false,
                    partition_device: None,
                })
                .collect()
        } else {
            choose(&ledger, ask, xpus)?
        };
        let mut made: Vec<Placement> = Vec::new();
        for placement in chosen {
            match self.partition(placement, owner) {
                Ok(placement) => made.push(placement),
                Err(e) => {
                    self.destroy(&made);
                    return Err(e);
                }
            }
        }
        ledger
            .entry(owner.to_string())
            .or_default()
            .extend(made.clone());
        Ok(made)
    }

    /// The placements on the cards `cards` names ((driver, index)): (owner, the
    /// placement's position among the owner's, the placement).
    pub fn placed_on(&self, cards: &[(String, u32)]) -> Vec<(String, usize, Placement)> {
        let mut found = Vec::new();
        for (owner, held) in self.ledger().iter() {
            for (index, placement) in held.iter().enumerate() {
                if placement.card.as_ref().is_some_and(|c| cards.contains(c)) {
                    found.push((owner.clone(), index, placement.clone()));
                }
            }
        }
        found.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        found
    }

    /// Moves `owner`'s placement at `index`, which must still be `expected`, to
    /// another card that has room for `ask` (one replica's worth): the new partition
    /// is made first, then the old one is destroyed. Returns (old, new). A refusal,
    /// or a placement changed meanwhile (scaled away, moved), changes nothing.
    pub fn move_placement(
        &self,
        owner: &str,
        index: usize,
        expected: &Placement,
        ask: &Ask<'_>,
        xpus: &[XpuSample],
    ) -> Result<(Placement, Placement)> {
        let mut ledger = self.ledger();
        let Some(old) = ledger.get(owner).and_then(|held| held.get(index)).cloned() else {
            return Err(Error::NotFound(format!(
                "{owner} holds no placement {index}"
            )));
        };
        if old != *expected {
            return Err(Error::Conflict(format!(
                "{owner}'s placement {index} changed meanwhile"
            )));
        }
        // The old card stays counted (and is passed over: it is unhealthy) until
        // the new one is made.
        let others: Vec<XpuSample> = xpus
            .iter()
            .filter(|x| {
                old.card
                    .as_ref()
                    .is_none_or(|(driver, i)| x.key.as_ref() != format!("{driver}/{i}"))
            })
            .cloned()
            .collect();
        let one = Ask {
            count: 1,
            ..ask.clone()
        };
        let chosen = choose(&ledger, &one, &others)?;
        let Some(placement) = chosen.into_iter().next() else {
            return Err(Error::Conflict("no card chosen".into()));
        };
        let new = self.partition(placement, owner)?;
        if let Some(slot) = ledger.get_mut(owner).and_then(|held| held.get_mut(index)) {
            *slot = new.clone();
        }
        drop(ledger);
        self.destroy(std::slice::from_ref(&old));
        Ok((old, new))
    }

    /// Releases the last `count` placements of `owner` (scaling down).
    pub fn release_last(&self, owner: &str, count: usize) {
        let released: Vec<Placement> = {
            let mut ledger = self.ledger();
            let Some(held) = ledger.get_mut(owner) else {
                return;
            };
            let keep = held.len().saturating_sub(count);
            held.split_off(keep)
        };
        self.destroy(&released);
    }

    /// Releases everything `owner` holds.
    pub fn release(&self, owner: &str) {
        let released = self.ledger().remove(owner).unwrap_or_default();
        self.destroy(&released);
    }

    fn partition(&self, mut placement: Placement, owner: &str) -> Result<Placement> {
        let Some((driver_name, index)) = placement.card.clone() else {
            return Ok(placement);
        };
        let Some(driver) = self.driver(&driver_name) else {
            return Err(Error::Conflict(format!("driver {driver_name} is gone")));
        };
        let share = placement.quota.min(1.0);
        let spec = PartitionSpec {
            device_index: index,
            isolation: Isolation::Soft,
            slicing: Slicing::Time,
            memory_quota_mib: placement.memory_mib.unwrap_or(1).max(1),
            compute_share_pct: ((share * 100.0).round() as u8).clamp(1, 100),
        };
        match driver.create_partition(spec) {
            Ok(partition) => {
                // A partition bigger than asked (a MIG profile) holds all of it.
                let made = f64::from(partition.spec.compute_share_pct) / 100.0;
                if placement.quota < 1.0 && made > placement.quota {
                    placement.quota = made;
                }
                let memory = partition.spec.memory_quota_mib;
                if placement.memory_mib.is_some_and(|m| memory > m) {
                    placement.memory_mib = Some(memory);
                }
                placement.isolated = partition.spec.isolation == Isolation::Hard;
                placement.partition_device = driver
                    .partition_device(&partition.id)
                    .map_err(|e| {
                        tracing::warn!(%owner, partition = %partition.id, "the driver does not name the partition's device: {e}");
                    })
                    .ok()
                    .flatten();
                placement.partition = Some(partition.id)
            }
            // A whole card needs no partition; a share the driver cannot enforce
            // is not offered as one.
            Err(DriverFailure::Driver(DriverError::Unsupported(why))) if placement.quota >= 1.0 => {
                tracing::debug!(%owner, driver = %driver_name, "no partition ({why}); the whole card is held");
            }
            Err(DriverFailure::Driver(DriverError::Unsupported(why))) => {
                return Err(Error::Conflict(format!(
                    "driver {driver_name} cannot share card {index} ({why}): a share of {:.1} \
                     cannot be enforced; ask for whole cards",
                    placement.quota
                )))
            }
            Err(e) => {
                return Err(Error::Conflict(format!(
                    "driver {driver_name} refused a partition on card {index}: {e}"
                )))
            }
        }
        Ok(placement)
    }

    fn destroy(&self, placements: &[Placement]) {
        for placement in placements {
            if let (Some((driver, _)), Some(partition)) = (&placement.card, &placement.partition) {
                if let Some(driver) = self.driver(driver) {
                    if let Err(e) = driver.destroy_partition(partition) {
                        tracing::warn!(%partition, "cannot destroy partition: {e}");
                    }
                }
            }
        }
    }
}

/// Chooses a card for each replica: the fullest card that still has room (share
/// and memory) first. A replica of more than one card takes that many whole free
/// cards.
fn choose(
    ledger: &HashMap<String, Vec<Placement>>,
    ask: &Ask<'_>,
    xpus: &[XpuSample],
) -> Result<Vec<Placement>> {
    let (count, quota, xpu_type, selector) = (ask.count, ask.quota, ask.xpu_type, ask.selector);
    let held = held_on_cards(ledger);
    let of_type: Vec<&XpuSample> = xpus
        .iter()
        .filter(|x| same_type(&x.xpu_type, xpu_type))
        .collect();
    let mut cards: Vec<Card<'_>> = of_type
        .iter()
        .filter(|x| x.health != DeviceHealth::Unhealthy && lacks(x, selector).is_none())
        .filter_map(|x| {
            let (driver, index) = x.card()?;
            let (share_held, memory_held) = held
                .get(&(driver.to_string(), index))
                .copied()
                .unwrap_or_default();
            let memory_total_mib = x.memory_total_gb.map(|g| (g * 1024.0).round() as u64);
            Some(Card {
                driver,
                index,
                memory_free_mib: memory_total_mib.map(|t| t.saturating_sub(memory_held)),
                memory_total_mib,
                free: 1.0 - share_held,
            })
        })
        .collect();
    if cards.is_empty() && of_type.iter().any(|x| x.health != DeviceHealth::Unhealthy) {
        return Err(Error::Conflict(format!(
            "no {xpu_type} accelerator has the labels asked for: considered {}",
            considered(xpus, xpu_type, selector, &held)
        )));
    }
    if cards.is_empty() && !of_type.is_empty() {
        return Err(Error::Conflict(format!(
            "every {xpu_type} accelerator on this machine is unhealthy ({})",
            of_type
                .iter()
                .map(|x| &*x.key)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if cards.is_empty() {
        let present: Vec<&str> = xpus.iter().map(|x| &*x.xpu_type).collect();
        return Err(Error::Conflict(format!(
            "no {xpu_type} accelerator on this machine (present: {})",
            if present.is_empty() {
                "none".into()
            } else {
                present.join(", ")
            }
        )));
    }
    let (per_card, cards_each) = if quota > 1.0 {
        (1.0, quota as u32)
    } else {
        (quota, 1)
    };
    // The memory a replica needs on `card`: what was asked for (per card), else
    // its share of the card's; a whole card holds all of it.
    let needs = |card: &Card<'_>| -> Option<u64> {
        match (ask.memory_mib, card.memory_total_mib) {
            (_, Some(total)) if per_card >= 1.0 => Some(total),
            (Some(asked), _) => Some(asked.div_ceil(u64::from(cards_each))),
            (None, Some(total)) => Some(((total as f64) * per_card).floor() as u64),
            (None, None) => None,
        }
    };
    let fits = |card: &Card<'_>| {
        card.free + 1e-9 >= per_card
            && match (needs(card), card.memory_free_mib) {
                (Some(need), Some(free)) => need <= free,
                _ => true,
            }
    };
    let mut chosen = Vec::new();
    for _ in 0..count {
        for _ in 0..cards_each {
            cards.sort_by(|a, b| a.free.total_cmp(&b.free));
            let Some(card) = cards.iter_mut().find(|c| fits(c)) else {
                let memory = ask
                    .memory_mib
                    .map(|m| format!(" and {m} MiB"))
                    .unwrap_or_default();
                return Err(Error::Conflict(format!(
                    "not enough {xpu_type} capacity for {count} replica(s) x {quota}: \
                     each needs {per_card:.2} of a card{memory}; considered {}",
                    considered(xpus, xpu_type, selector, &held)
                )));
            };
            let memory_mib = needs(card);
            card.free -= per_card;
            if let (Some(free), Some(need)) = (card.memory_free_mib.as_mut(), memory_mib) {
                *free = free.saturating_sub(need);
            }
            chosen.push(Placement {
                card: Some((card.driver.to_string(), card.index)),
                quota: per_card,
                partition: None,
                memory_mib,
                isolated: false,
                partition_device: None,
            });
        }
    }
    Ok(chosen)
}

/// The first pair of `selector` the card's driver's labels do not hold.
fn lacks<'s>(
    card: &XpuSample,
    selector: &'s BTreeMap<String, String>,
) -> Option<(&'s String, &'s String)> {
    selector
        .iter()
        .find(|(key, value)| !card.labels.iter().any(|(k, v)| k == *key && v == *value))
}

/// Every card of the machine and what it had, or lacked, for a request of
/// `xpu_type`: what a refusal says so that the operator sees why each was passed
/// over.
fn considered(
    xpus: &[XpuSample],
    xpu_type: &str,
    selector: &BTreeMap<String, String>,
    held: &HashMap<(String, u32), (f64, u64)>,
) -> String {
    if xpus.is_empty() {
        return "no card at all".into();
    }
    xpus.iter()
        .map(|x| {
            let what = if !same_type(&x.xpu_type, xpu_type) {
                format!("is {}", x.xpu_type)
            } else if x.health == DeviceHealth::Unhealthy {
                "is unhealthy".to_string()
            } else if let Some((key, value)) = lacks(x, selector) {
                let has = x.labels.iter().find(|(k, _)| k == key);
                match has {
                    Some((_, other)) => format!("lacks {key}={value} (has {other})"),
                    None => format!("lacks {key}={value}"),
                }
            } else {
                let (used, memory_used) = x
                    .card()
                    .and_then(|(driver, index)| held.get(&(driver.to_string(), index)))
                    .copied()
                    .unwrap_or_default();
                let memory = x
                    .memory_total_gb
                    .map(|g| {
                        let total = (g * 1024.0).round() as u64;
                        format!(" and {} MiB", total.saturating_sub(memory_used))
                    })
                    .unwrap_or_default();
                format!("has {:.2}{memory} free", (1.0 - used).max(0.0))
            };
            format!("{} {what}", x.key)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn ask<'a>(
        count: u32,
        quota: f64,
        xpu_type: &'a str,
        selector: &'a BTreeMap<String, String>,
    ) -> Ask<'a> {
        Ask {
            count,
            quota,
            memory_mib: None,
            xpu_type,
            selector,
        }
    }

    fn card(key: &str) -> XpuSample {
        XpuSample {
            key: key.into(),
            xpu_type: "SIM_X".into(),
            memory_total_gb: Some(16.0),
            memory_used_gb: None,
            utilization: None,
            decode_utilization: None,
            picture_decode_utilization: None,
            health: DeviceHealth::Healthy,
            simulated: false,
            labels: Arc::from([("xpu.model".to_string(), "SIM_X".to_string())]),
        }
    }

    #[test]
    fn fills_used_cards_first_and_refuses_over_commit() {
        let xpus = [card("sim/0"), card("sim/1")];
        let mut ledger = HashMap::new();
        let first = choose(&ledger, &ask(1, 0.5, "sim x", &none()), &xpus).unwrap();
        ledger.insert("a".to_string(), first.clone());
        // The half-used card takes the next half.
        let second = choose(&ledger, &ask(1, 0.5, "SIM_X", &none()), &xpus).unwrap();
        assert_eq!(second[0].card, first[0].card);
        ledger.insert("b".to_string(), second.clone());
        // One card left: two whole cards do not fit.
        assert!(choose(&ledger, &ask(1, 2.0, "SIM_X", &none()), &xpus).is_err());
        assert_eq!(
            choose(&ledger, &ask(1, 1.0, "SIM_X", &none()), &xpus)
                .unwrap()
                .len(),
            1
        );
        assert!(choose(&ledger, &ask(1, 0.5, "OTHER", &none()), &xpus)
            .unwrap_err()
            .to_string()
            .contains("present: SIM_X"));
    }

    #[test]
    fn unhealthy_cards_are_not_placed_on() {
        let mut sick = card("sim/0");
        sick.health = DeviceHealth::Unhealthy;
        let xpus = [sick.clone(), card("sim/1")];
        let ledger = HashMap::new();
        let chosen = choose(&ledger, &ask(1, 1.0, "SIM_X", &none()), &xpus).unwrap();
        assert_eq!(chosen[0].card, Some(("sim".to_string(), 1)));
        assert!(choose(&ledger, &ask(2, 1.0, "SIM_X", &none()), &xpus).is_err());
        let error = choose(&ledger, &ask(1, 0.5, "SIM_X", &none()), &[sick]).unwrap_err();
        assert!(error.to_string().contains("unhealthy (sim/0)"), "{error}");
    }

    /// A refusal for capacity names every card and what it lacked.
    #[test]
    fn a_refusal_says_what_each_card_lacked() {
        let mut sick = card("sim/2");
        sick.health = DeviceHealth::Unhealthy;
        let mut other = card("npu/0");
        other.xpu_type = "NPU_Y".into();
        let xpus = [card("sim/0"), card("sim/1"), sick, other];
        let mut ledger = HashMap::new();
        let held = choose(&ledger, &ask(2, 0.75, "SIM_X", &none()), &xpus).unwrap();
        ledger.insert("a".to_string(), held);
        let error = choose(&ledger, &ask(1, 0.5, "SIM_X", &none()), &xpus)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(
                "considered sim/0 has 0.25 and 4096 MiB free, sim/1 has 0.25 and 4096 MiB free, sim/2 is unhealthy, npu/0 is NPU_Y"
            ),
            "{error}"
        );
    }

    /// Cards are chosen by their drivers' labels, and a refusal says which label
    /// each card lacked.
    #[test]
    fn labels_select_cards() {
        let mut other = card("gen2/0");
        other.labels = Arc::from([("xpu.model".to_string(), "SIM_X2".to_string())]);
        let xpus = [card("sim/0"), other];
        let ledger = HashMap::new();
        let wants = |value: &str| BTreeMap::from([("xpu.model".to_string(), value.to_string())]);
        let chosen = choose(&ledger, &ask(1, 0.5, "SIM_X", &wants("SIM_X2")), &xpus).unwrap();
        assert_eq!(chosen[0].card, Some(("gen2".to_string(), 0)));
        let error = choose(&ledger, &ask(1, 0.5, "SIM_X", &wants("SIM_X3")), &xpus)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("sim/0 lacks xpu.model=SIM_X3 (has SIM_X), gen2/0 lacks xpu.model=SIM_X3 (has SIM_X2)"),
            "{error}"
        );
    }

    /// Memory is held like the share: asked for, or the share of the card's; a card
    /// whose memory is given out takes nobody more, whatever share is left.
    #[test]
    fn memory_is_held_and_never_exceeds_the_card() {
        let xpus = [card("sim/0")];
        let nothing = none();
        let mut ledger = HashMap::new();
        let share = choose(&ledger, &ask(1, 0.25, "SIM_X", &nothing), &xpus).unwrap();
        assert_eq!(share[0].memory_mib, Some(4096));
        ledger.insert("a".to_string(), share);
        let big = Ask {
            memory_mib: Some(12 * 1024),
            ..ask(1, 0.25, "SIM_X", &nothing)
        };
        let held = choose(&ledger, &big, &xpus).unwrap();
        assert_eq!(held[0].memory_mib, Some(12 * 1024));
        ledger.insert("b".to_string(), held);
        // Half the compute is free, no memory is.
        let error = choose(&ledger, &ask(1, 0.1, "SIM_X", &nothing), &xpus)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("considered sim/0 has 0.50 and 0 MiB free"),
            "{error}"
        );
        let too_big = Ask {
            memory_mib: Some(17 * 1024),
            ..ask(1, 0.1, "SIM_X", &nothing)
        };
        assert!(choose(&HashMap::new(), &too_big, &xpus)
            .unwrap_err()
            .to_string()
            .contains("and 17408 MiB"));
        // A whole card holds all of its memory.
        let whole = choose(&HashMap::new(), &ask(1, 1.0, "SIM_X", &nothing), &xpus).unwrap();
        assert_eq!(whole[0].memory_mib, Some(16384));
    }

    #[test]
    fn models_run_on_the_card_or_in_the_worker_of_a_partition_s_own_device() {
        let mut placement = Placement {
            card: Some(("nvidia".into(), 1)),
            quota: 0.5,
            partition: Some("ts-1-1".into()),
            memory_mib: Some(4096),
            isolated: false,
            partition_device: None,
        };
        assert_eq!(placement.device("NVIDIA_T4"), Device::Card(1));
        // Not a card an execution provider here drives.
        assert_eq!(placement.device("SIM_X"), Device::Cpu);
        // A time slice whose driver names its card: in a worker of its own, on
        // the card in this process where no worker can start.
        placement.partition_device = Some("GPU-1".into());
        let partition = |visible: &str, card_ordinal| {
            Device::Partition(Arc::new(PartitionDevice {
                driver: "nvidia".into(),
                partition: "ts-1-1".into(),
                visible: visible.into(),
                card_ordinal,
                memory_quota_mib: Some(4096),
            }))
        };
        assert_eq!(placement.device("NVIDIA_T4"), partition("GPU-1", Some(1)));
        assert_eq!(placement.device("NVIDIA_T4").to_string(), "nvidia/ts-1-1");
        assert_eq!(placement.device("SIM_X"), Device::Cpu);
        // A MIG instance: not runnable from this process; in a worker that sees it
        // alone where the driver named it, else on the CPU.
        placement.isolated = true;
        placement.partition_device = None;
        assert_eq!(placement.device("NVIDIA_A100_40GB"), Device::Cpu);
        placement.partition_device = Some("MIG-1".into());
        assert_eq!(
            placement.device("NVIDIA_A100_40GB"),
            partition("MIG-1", None)
        );
    }

    #[test]
    fn type_names_compare_loosely() {
        assert!(same_type("NVidia A2", "NVIDIA_A2"));
        assert!(!same_type("NVIDIA_T4", "NVIDIA_A2"));
    }
}
