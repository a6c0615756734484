//! MIG bookkeeping: which GPU instance profile serves a partition spec, and the
//! spec a MIG instance stands for.
//!
//! A partition is one GPU instance with one compute instance over all of it, so its
//! compute share is its slices of the card's and its memory the profile's. The spec
//! is computed from the profile alone, so that the same instance reads the same
//! after a plugin restart (the host reconciles its ledger by it).

use xpud_sdk::driver::nvml::{MigInstance, MigProfile};
use xpud_sdk::driver::{DriverError, Isolation, PartitionSpec, Slicing};

/// The card's compute slices: the widest profile's (7 on A100/H100, 4 on A30).
pub fn total_slices(profiles: &[MigProfile]) -> u32 {
    profiles.iter().map(|p| p.slice_count).max().unwrap_or(0)
}

/// Whether `profile` gives at least what `spec` asks: its share of the compute and
/// its memory.
fn covers(profile: &MigProfile, spec: &PartitionSpec, total: u32) -> bool {
    profile.slice_count * 100 >= u32::from(spec.compute_share_pct) * total
        && profile.memory_mib >= spec.memory_quota_mib
}

/// The smallest profile (fewest slices, then least memory) that covers `spec` and
/// has room on the card now.
pub fn choose<'p>(
    profiles: &'p [MigProfile],
    spec: &PartitionSpec,
) -> Result<&'p MigProfile, DriverError> {
    let total = total_slices(profiles);
    let mut fitting: Vec<&MigProfile> =
        profiles.iter().filter(|p| covers(p, spec, total)).collect();
    if fitting.is_empty() {
        return Err(DriverError::InsufficientResources(format!(
            "no MIG profile of device {} holds {} % of the compute and {} MiB",
            spec.device_index, spec.compute_share_pct, spec.memory_quota_mib
        )));
    }
    fitting.sort_by_key(|p| (p.slice_count, p.memory_mib, p.id));
    fitting
        .into_iter()
        .find(|p| p.free_count > 0)
        .ok_or_else(|| {
            DriverError::InsufficientResources(format!(
                "device {}: no room left for a MIG instance of {} % and {} MiB",
                spec.device_index, spec.compute_share_pct, spec.memory_quota_mib
            ))
        })
}

/// The spec an instance of `profile` stands for on a card of `total` slices.
pub fn spec_of(device_index: u32, profile: &MigProfile, total: u32) -> PartitionSpec {
    let share = (profile.slice_count * 100).checked_div(total).unwrap_or(0);
    PartitionSpec {
        device_index,
        isolation: Isolation::Hard,
        slicing: Slicing::Space,
        memory_quota_mib: profile.memory_mib,
        compute_share_pct: share.clamp(1, 100) as u8,
    }
}

/// The partition id of GPU instance `gpu_instance` on `device`.
pub fn partition_id(device: u32, gpu_instance: u32) -> String {
    format!("mig-{device}-{gpu_instance}")
}

/// (device, GPU instance) of a MIG partition id.
pub fn parse_partition_id(id: &str) -> Option<(u32, u32)> {
    let (device, instance) = id.strip_prefix("mig-")?.split_once('-')?;
    Some((device.parse().ok()?, instance.parse().ok()?))
}

/// The spec of a MIG instance the card reports, through its profile.
pub fn instance_spec(
    device_index: u32,
    instance: &MigInstance,
    profiles: &[MigProfile],
) -> Option<PartitionSpec> {
    let profile = profiles.iter().find(|p| p.id == instance.profile_id)?;
    Some(spec_of(device_index, profile, total_slices(profiles)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `nvidia-smi mig -lgip` on an A100-SXM4-40GB with nothing created: profile id,
    /// slices, memory (MiB), free, max.
    pub fn a100_40gb() -> Vec<MigProfile> {
        [
            (19, 1, 4864, 7, 7), // 1g.5gb
            (20, 1, 4864, 1, 1), // 1g.5gb+me
            (15, 1, 9856, 4, 4), // 1g.10gb
            (14, 2, 9856, 3, 3), // 2g.10gb
            (9, 3, 19968, 2, 2), // 3g.20gb
            (5, 4, 19968, 1, 1), // 4g.20gb
            (0, 7, 40192, 1, 1), // 7g.40gb
        ]
        .into_iter()
        .map(
            |(id, slice_count, memory_mib, free_count, max_count)| MigProfile {
                id,
                slice_count,
                memory_mib,
                free_count,
                max_count,
            },
        )
        .collect()
    }

    fn spec(share: u8, memory_mib: u64) -> PartitionSpec {
        PartitionSpec {
            device_index: 0,
            isolation: Isolation::Soft,
            slicing: Slicing::Time,
            memory_quota_mib: memory_mib,
            compute_share_pct: share,
        }
    }

    #[test]
    fn the_smallest_profile_that_covers_the_spec_is_chosen() {
        let profiles = a100_40gb();
        assert_eq!(total_slices(&profiles), 7);
        // A seventh of the compute in 4 GiB: one slice.
        assert_eq!(choose(&profiles, &spec(14, 4096)).unwrap().id, 19);
        // A seventh of the compute but 8 GiB: the one-slice profile with more memory.
        assert_eq!(choose(&profiles, &spec(14, 8192)).unwrap().id, 15);
        // 15 % is more than one slice (14.28 %).
        assert_eq!(choose(&profiles, &spec(15, 4096)).unwrap().id, 14);
        // Half the card: 4 slices (3 are 42 %).
        assert_eq!(choose(&profiles, &spec(50, 16384)).unwrap().id, 5);
        assert_eq!(choose(&profiles, &spec(100, 40192)).unwrap().id, 0);
    }

    #[test]
    fn a_spec_no_profile_holds_or_a_full_card_is_refused() {
        let mut profiles = a100_40gb();
        let err = choose(&profiles, &spec(10, 60_000)).unwrap_err();
        assert!(
            matches!(err, DriverError::InsufficientResources(m) if m.contains("no MIG profile"))
        );
        for p in profiles.iter_mut().filter(|p| p.slice_count == 1) {
            p.free_count = 0;
        }
        // One-slice instances are all taken: the next size up serves.
        assert_eq!(choose(&profiles, &spec(14, 4096)).unwrap().id, 14);
        for p in &mut profiles {
            p.free_count = 0;
        }
        let err = choose(&profiles, &spec(14, 4096)).unwrap_err();
        assert!(matches!(err, DriverError::InsufficientResources(m) if m.contains("no room")));
    }

    #[test]
    fn an_instance_stands_for_its_profile_s_spec() {
        let profiles = a100_40gb();
        let instance = MigInstance {
            gpu_instance_id: 3,
            profile_id: 14,
            placement_start: 4,
            placement_size: 2,
            uuid: Some("MIG-5c8e1c6a-1f4e-5d87-a4a6-2a0a6ad2a1f7".into()),
            memory_total_bytes: Some(9856 << 20),
            memory_used_bytes: Some(13 << 20),
        };
        let spec = instance_spec(1, &instance, &profiles).unwrap();
        assert_eq!(spec.device_index, 1);
        assert_eq!(spec.isolation, Isolation::Hard);
        assert_eq!(spec.slicing, Slicing::Space);
        assert_eq!(spec.memory_quota_mib, 9856);
        assert_eq!(spec.compute_share_pct, 28);
        // The chosen profile's spec covers what was asked.
        let asked = self::spec(15, 4096);
        let made = spec_of(0, choose(&profiles, &asked).unwrap(), 7);
        assert!(made.compute_share_pct >= asked.compute_share_pct);
        assert!(made.memory_quota_mib >= asked.memory_quota_mib);
        let unknown = MigInstance {
            profile_id: 99,
            ..instance
        };
        assert!(instance_spec(1, &unknown, &profiles).is_none());
    }

    #[test]
    fn partition_ids_round_trip() {
        assert_eq!(partition_id(2, 11), "mig-2-11");
        assert_eq!(parse_partition_id("mig-2-11"), Some((2, 11)));
        assert_eq!(parse_partition_id("ts-2-11"), None);
        assert_eq!(parse_partition_id("mig-2"), None);
        assert_eq!(parse_partition_id("mig-x-1"), None);
    }
}
