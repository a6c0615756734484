//! Placement of algorithm replicas on this machine's accelerators, for services
//! (Appendix F) and workloads (Appendix B) alike, from one ledger so that the two
//! never over-commit a card between them.
//!
//! A replica asks for a share of a card of one type (`quota`, 0-1, or a whole number
//! of cards). Cards that are already partly used fill up first. Where the driver can
//! partition, the replica gets a real partition (soft isolation, time slicing, the
//! share as compute share and memory); where it cannot, this ledger's accounting
//! still holds.

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

/// Where one replica runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Placement {
    /// The driver plugin and the card's index in it; none for a CPU-only replica.
    pub card: Option<(String, u32)>,
    /// Share of the card (1.0 = all of it).
    pub quota: f64,
    /// The driver's partition, where it could make one.
    pub partition: Option<String>,
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
    memory_mib: Option<u64>,
    free: f64,
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

    /// Places `count` more replicas of `quota` on cards of `xpu_type` whose
    /// drivers' labels hold every pair of `selector`, for `owner`, with partitions
    /// where drivers can. All of them, or none (and nothing kept).
    pub fn reserve(
        &self,
        owner: &str,
        count: u32,
        quota: f64,
        xpu_type: &str,
        selector: &BTreeMap<String, String>,
        xpus: &[XpuSample],
    ) -> Result<Vec<Placement>> {
        if !(quota == 0.0 || (quota > 0.0 && quota <= 1.0) || quota.fract() == 0.0) {
            return Err(Error::Invalid(format!(
                "accelerator share {quota}: up to 1 card, or a whole number of cards"
            )));
        }
        // The ledger stays locked from choice to record: nobody takes the same share.
        let mut ledger = self.ledger();
        let chosen = if quota == 0.0 {
            (0..count)
                .map(|_| {
                    (
                        Placement {
                            card: None,
                            quota: 0.0,
                            partition: None,
                        },
                        None,
                    )
                })
                .collect()
        } else {
            choose(&ledger, count, quota, xpu_type, selector, xpus)?
        };
        let mut made: Vec<Placement> = Vec::new();
        for (placement, memory_mib) in chosen {
            match self.partition(placement, memory_mib, owner) {
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

    fn partition(
        &self,
        mut placement: Placement,
        memory_mib: Option<u64>,
        owner: &str,
    ) -> Result<Placement> {
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
            memory_quota_mib: memory_mib.map_or(1, |m| ((m as f64 * share) as u64).max(1)),
            compute_share_pct: ((share * 100.0).round() as u8).clamp(1, 100),
        };
        match driver.create_partition(spec) {
            Ok(partition) => {
                // A partition bigger than asked (a MIG profile) holds its whole share.
                let made = f64::from(partition.spec.compute_share_pct) / 100.0;
                if placement.quota < 1.0 && made > placement.quota {
                    placement.quota = made;
                }
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

/// Chooses a card for each replica: the fullest card that still has room first. A
/// replica of more than one card takes that many whole free cards.
fn choose(
    ledger: &HashMap<String, Vec<Placement>>,
    count: u32,
    quota: f64,
    xpu_type: &str,
    selector: &BTreeMap<String, String>,
    xpus: &[XpuSample],
) -> Result<Vec<(Placement, Option<u64>)>> {
    let mut held: HashMap<(String, u32), f64> = HashMap::new();
    for placement in ledger.values().flatten() {
        if let Some(card) = &placement.card {
            *held.entry(card.clone()).or_default() += placement.quota.min(1.0);
        }
    }
    let of_type: Vec<&XpuSample> = xpus
        .iter()
        .filter(|x| same_type(&x.xpu_type, xpu_type))
        .collect();
    let mut cards: Vec<Card<'_>> = of_type
        .iter()
        .filter(|x| x.health != DeviceHealth::Unhealthy && lacks(x, selector).is_none())
        .filter_map(|x| {
            let (driver, index) = x.key.rsplit_once('/')?;
            let index: u32 = index.parse().ok()?;
            Some(Card {
                driver,
                index,
                memory_mib: x.memory_total_gb.map(|g| (g * 1024.0) as u64),
                free: 1.0
                    - held
                        .get(&(driver.to_string(), index))
                        .copied()
                        .unwrap_or(0.0),
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
    let mut chosen = Vec::new();
    for _ in 0..count {
        for _ in 0..cards_each {
            cards.sort_by(|a, b| a.free.total_cmp(&b.free));
            let Some(card) = cards.iter_mut().find(|c| c.free + 1e-9 >= per_card) else {
                return Err(Error::Conflict(format!(
                    "not enough {xpu_type} capacity for {count} replica(s) x {quota}: \
                     each needs {per_card:.2} of a card; considered {}",
                    considered(xpus, xpu_type, selector, &held)
                )));
            };
            card.free -= per_card;
            chosen.push((
                Placement {
                    card: Some((card.driver.to_string(), card.index)),
                    quota: per_card,
                    partition: None,
                },
                card.memory_mib,
            ));
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
    held: &HashMap<(String, u32), f64>,
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
                let used = x
                    .key
                    .rsplit_once('/')
                    .and_then(|(driver, index)| {
                        held.get(&(driver.to_string(), index.parse().ok()?))
                    })
                    .copied()
                    .unwrap_or(0.0);
                format!("has {:.2} free", (1.0 - used).max(0.0))
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

    fn card(key: &str) -> XpuSample {
        XpuSample {
            key: key.into(),
            xpu_type: "SIM_X".into(),
            memory_total_gb: Some(16.0),
            memory_used_gb: None,
            utilization: None,
            decode_utilization: None,
            health: DeviceHealth::Healthy,
            simulated: false,
            labels: Arc::from([("xpu.model".to_string(), "SIM_X".to_string())]),
        }
    }

    #[test]
    fn fills_used_cards_first_and_refuses_over_commit() {
        let xpus = [card("sim/0"), card("sim/1")];
        let mut ledger = HashMap::new();
        let first = choose(&ledger, 1, 0.5, "sim x", &none(), &xpus).unwrap();
        ledger.insert(
            "a".to_string(),
            first.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        );
        // The half-used card takes the next half.
        let second = choose(&ledger, 1, 0.5, "SIM_X", &none(), &xpus).unwrap();
        assert_eq!(second[0].0.card, first[0].0.card);
        ledger.insert(
            "b".to_string(),
            second.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        );
        // One card left: two whole cards do not fit.
        assert!(choose(&ledger, 1, 2.0, "SIM_X", &none(), &xpus).is_err());
        assert_eq!(
            choose(&ledger, 1, 1.0, "SIM_X", &none(), &xpus)
                .unwrap()
                .len(),
            1
        );
        assert!(choose(&ledger, 1, 0.5, "OTHER", &none(), &xpus)
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
        let chosen = choose(&ledger, 1, 1.0, "SIM_X", &none(), &xpus).unwrap();
        assert_eq!(chosen[0].0.card, Some(("sim".to_string(), 1)));
        assert!(choose(&ledger, 2, 1.0, "SIM_X", &none(), &xpus).is_err());
        let error = choose(&ledger, 1, 0.5, "SIM_X", &none(), &[sick]).unwrap_err();
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
        let held = choose(&ledger, 2, 0.75, "SIM_X", &none(), &xpus).unwrap();
        ledger.insert(
            "a".to_string(),
            held.into_iter().map(|(p, _)| p).collect::<Vec<_>>(),
        );
        let error = choose(&ledger, 1, 0.5, "SIM_X", &none(), &xpus)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(
                "considered sim/0 has 0.25 free, sim/1 has 0.25 free, sim/2 is unhealthy, npu/0 is NPU_Y"
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
        let chosen = choose(&ledger, 1, 0.5, "SIM_X", &wants("SIM_X2"), &xpus).unwrap();
        assert_eq!(chosen[0].0.card, Some(("gen2".to_string(), 0)));
        let error = choose(&ledger, 1, 0.5, "SIM_X", &wants("SIM_X3"), &xpus)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("sim/0 lacks xpu.model=SIM_X3 (has SIM_X), gen2/0 lacks xpu.model=SIM_X3 (has SIM_X2)"),
            "{error}"
        );
    }

    #[test]
    fn type_names_compare_loosely() {
        assert!(same_type("NVidia A2", "NVIDIA_A2"));
        assert!(!same_type("NVIDIA_T4", "NVIDIA_A2"));
    }
}
