//! The NVIDIA bridge (`xpu:plugin/nvml@0.2.0`) and the `nvidia` driver over it:
//! grants, the machine without NVML, and, where `libnvidia-ml.so.1` exists, the
//! real cards.

use crate::support::*;
use xpud::plugins::driver::DriverFailure;
use xpud::runtime::bindings::driver_types::{DriverError, Isolation, PartitionSpec, Slicing};

fn no_grants() -> std::path::PathBuf {
    fixture("empty-sysfs")
}

/// A registry whose NVML bridge finds no library (so that the tests mean the same
/// on a machine with a GPU), the operator allowing `allowed`.
fn without_nvml(plugins: &PluginDir, allowed: &[&str]) -> xpud::plugins::registry::Registry {
    registry_nvml(
        plugins,
        &no_grants(),
        Default::default(),
        Some("/nonexistent/libnvidia-ml.so.1".into()),
        allowed,
    )
}

/// The stand-in library, or `None` (the reason printed) where it cannot be built.
fn stand_in(built: Result<std::path::PathBuf, String>) -> Option<std::path::PathBuf> {
    built
        .map_err(|why| eprintln!("skipped: the stand-in NVML library cannot be built: {why}"))
        .ok()
}

/// The stand-in library, loaded through the host's bridge.
fn stand_in_loaded() -> Option<std::sync::Arc<nvml_wrapper::Nvml>> {
    let library = stand_in(fake_nvml())?;
    Some(
        xpud::runtime::nvml::NvmlBridge::new(Some(library))
            .get()
            .unwrap()
            .clone(),
    )
}

/// A registry whose NVML bridge loads `library`, the operator allowing the default
/// grants.
fn over(plugins: &PluginDir, library: std::path::PathBuf) -> xpud::plugins::registry::Registry {
    registry_nvml(
        plugins,
        &no_grants(),
        Default::default(),
        Some(library),
        &DEFAULT_GRANTS,
    )
}

/// The nvidia driver loaded over the stand-in library, beside the plugin
/// directory it was installed in; `None` where the stand-in cannot be built.
fn nvidia_over_stand_in() -> Option<(PluginDir, xpud::plugins::registry::Registry)> {
    let library = stand_in(fake_nvml())?;
    let plugins = PluginDir::new();
    plugins.install("nvidia");
    let registry = over(&plugins, library);
    registry.scan();
    Some((plugins, registry))
}

/// A machine without NVML: the driver loads, reports no cards, and nothing fails.
#[test]
fn without_nvml_the_driver_loads_and_reports_no_cards() {
    let plugins = PluginDir::new();
    plugins.install("nvidia");
    let registry = without_nvml(&plugins, &DEFAULT_GRANTS);
    let report = registry.scan();
    assert_eq!(report.loaded, vec!["nvidia"], "{report:?}");
    let nvidia = driver(&registry, "nvidia");
    let info = nvidia.info().unwrap();
    assert_eq!(info.vendor, "NVIDIA");
    assert!(!info.simulated);
    assert!(nvidia.devices().unwrap().is_empty());
    let sample = nvidia.sample().unwrap().metrics;
    assert!(sample.cards.is_empty() && sample.instances.is_empty());
    let labels = nvidia.labels().unwrap();
    assert!(labels
        .iter()
        .any(|l| l.key == "xpu.present" && l.value == "false"));
    let view = view(&registry, "nvidia");
    assert_eq!(view.state, "loaded");
    assert_eq!(view.grants, vec!["nvml:manage"]);
}

/// NVML is granted by the manifest and allowed by the operator: a driver without
/// the grant is told so by the bridge, and a grant the operator does not allow
/// refuses the plugin with the reason.
#[test]
fn nvml_needs_the_manifest_s_grant_and_the_operator_s_leave() {
    let plugins = PluginDir::new();
    plugins.install_as("nvidia", "ungranted", |mut m| {
        m.remove("grants");
        m
    });
    plugins.install("nvidia");
    let registry = without_nvml(&plugins, &["/sys", "nvml"]);
    let report = registry.scan();
    assert!(report.loaded.is_empty(), "{report:?}");
    let reason = |name: &str| view(&registry, name).refused.unwrap_or_default();
    assert!(
        reason("ungranted").contains("[grants] nvml"),
        "{}",
        reason("ungranted")
    );
    assert!(
        reason("nvidia").contains("grants.nvml") && reason("nvidia").contains("nvml:manage"),
        "{}",
        reason("nvidia")
    );
}

/// The real library, where it exists: the cards NVML sees are the driver's, with
/// figures. Elsewhere the test says why it did not run.
#[test]
fn where_nvml_exists_its_cards_are_reported_with_figures() {
    let plugins = PluginDir::new();
    plugins.install("nvidia");
    let registry = registry(&plugins, &no_grants());
    registry.scan();
    let nvidia = driver(&registry, "nvidia");
    let devices = nvidia.devices().unwrap();
    if devices.is_empty() {
        eprintln!(
            "skipped: no NVIDIA card through NVML here (libnvidia-ml.so.1 absent or no GPU); \
             scripts/device-check-nvidia runs this on a GPU machine"
        );
        return;
    }
    let sample = nvidia.sample().unwrap().metrics;
    for device in devices.iter() {
        assert!(device.accelerator_type.starts_with("NVIDIA_"), "{device:?}");
        assert!(device.memory_total_mib.unwrap_or(0) > 0, "{device:?}");
        let card = sample
            .cards
            .iter()
            .find(|c| c.device_index == device.index)
            .expect("a sample for every card");
        assert!(card.memory_used_mib.is_some() && card.memory_total_mib.is_some());
        eprintln!("{device:?}\n{card:?}");
    }
}

/// Drivers from 510 on have NVML's v2 memory call, which leaves reserved memory out
/// of the used: the bridge takes it where the library has it.
#[test]
fn memory_comes_from_the_v2_call_where_the_library_has_it() {
    let Some(library) = stand_in(fake_nvml_built(
        "libnvidia-ml-v2.so.1",
        &["FAKE_NVML_MEMORY_V2"],
    )) else {
        return;
    };
    let plugins = PluginDir::new();
    plugins.install("nvidia");
    let registry = over(&plugins, library);
    registry.scan();
    let nvidia = driver(&registry, "nvidia");
    assert_eq!(nvidia.devices().unwrap()[0].memory_total_mib, Some(15360));
    // 345 MiB in use, of which 69 reserved (v1 says 345).
    let sample = nvidia.sample().unwrap().metrics;
    assert_eq!(sample.cards[0].memory_used_mib, Some(276));
}

/// The whole path on a machine without a GPU: the nvidia driver, through the host's
/// bridge and its unsafe calls, against a stand-in library with recorded answers (a
/// T4, and an A100-40GB in MIG mode whose GPU instances it really keeps).
#[test]
fn the_bridge_reads_cards_and_makes_mig_instances_through_the_library() {
    let Some(library) = stand_in(fake_nvml()) else {
        return;
    };
    let plugins = PluginDir::new();
    plugins.install("nvidia");
    plugins.install_as("nvidia", "reader", |m| {
        set(m, "grants", "nvml", "read".into())
    });
    let registry = over(&plugins, library);
    let report = registry.scan();
    assert_eq!(report.loaded, vec!["nvidia", "reader"], "{report:?}");
    let nvidia = driver(&registry, "nvidia");
    let info = nvidia.info().unwrap();
    assert_eq!(
        info.accelerator_types,
        vec!["NVIDIA_A100_40GB", "NVIDIA_T4"]
    );

    let devices = nvidia.devices().unwrap();
    assert_eq!(devices.len(), 2);
    let t4 = &devices[0];
    assert_eq!(t4.accelerator_type, "NVIDIA_T4");
    assert_eq!(t4.id, "GPU-8a8b7d6e-3a0f-4c2b-9e1d-5f4a3b2c1d0e");
    assert_eq!(t4.pci_bus_id.as_deref(), Some("00000000:3B:00.0"));
    // Memory through the v1 call: the library has no v2.
    assert_eq!(t4.memory_total_mib, Some(15360));
    assert_eq!(devices[1].memory_total_mib, Some(40960));

    let sample = nvidia.sample().unwrap().metrics;
    let card = &sample.cards[0];
    assert_eq!(card.ai_utilization_pct, Some(37.0));
    assert_eq!(card.memory_used_mib, Some(345));
    assert_eq!(card.video_decode_utilization_pct, Some(18.0));
    assert_eq!(card.temperature_celsius, Some(48.0));
    // The T4 has no JPEG engine; the A100's is read.
    assert_eq!(card.picture_decode_utilization_pct, None);
    assert_eq!(sample.cards[1].picture_decode_utilization_pct, Some(4.0));
    assert!((card.power_watts.unwrap() - 27.512).abs() < 1e-3);
    // An A100 in MIG mode has no whole-card utilisation: absent, not 0.
    assert_eq!(sample.cards[1].ai_utilization_pct, None);
    assert_eq!(sample.cards[1].temperature_celsius, Some(33.0));
    // Nothing changed on the cards: later samples keep the devices they have (asked
    // for twice so far: above, and at the first sample after that).
    for _ in 0..3 {
        nvidia.sample().unwrap();
    }
    assert_eq!(calls_of(&registry, "nvidia", "devices"), 2);

    // A seventh of the A100: a 1g.5gb MIG instance, which covers the ask.
    let asked = PartitionSpec {
        device_index: 1,
        isolation: Isolation::Soft,
        slicing: Slicing::Time,
        memory_quota_mib: 4096,
        compute_share_pct: 14,
    };
    let mig = nvidia.create_partition(asked).unwrap();
    assert_eq!(mig.spec.isolation, Isolation::Hard);
    assert_eq!(mig.spec.slicing, Slicing::Space);
    assert_eq!(mig.spec.memory_quota_mib, 4864);
    assert_eq!(mig.spec.compute_share_pct, 14);
    let instance = nvidia
        .sample()
        .unwrap()
        .metrics
        .instances
        .into_iter()
        .find(|i| i.partition_id == "mig-1-1")
        .expect("the MIG instance's figures");
    assert_eq!(instance.memory_used_mib, Some(13));
    assert_eq!(instance.memory_quota_mib, 4864);
    // The whole card no longer fits beside it.
    let whole = PartitionSpec {
        memory_quota_mib: 40192,
        compute_share_pct: 100,
        ..asked
    };
    assert!(matches!(
        nvidia.create_partition(whole),
        Err(DriverFailure::Driver(DriverError::InsufficientResources(_)))
    ));
    // A time-sliced share of the T4.
    let shared = nvidia
        .create_partition(PartitionSpec {
            device_index: 0,
            ..asked
        })
        .unwrap();
    assert_eq!(shared.spec.isolation, Isolation::Soft);

    // A plugin granted only reading cannot change MIG instances.
    let reader = driver(&registry, "reader");
    match reader.create_partition(asked) {
        Err(DriverFailure::Driver(DriverError::Unsupported(why))) => {
            assert!(why.contains("manage"), "{why}")
        }
        other => panic!("{other:?}"),
    }

    // A new version of the driver takes over: the MIG instance the hardware kept
    // reads as the same partition (its spec comes from its profile), so it is kept
    // under the id callers hold, not made twice; the time-sliced share, which only
    // the old incarnation knew, is made again.
    plugins.install_as("nvidia", "nvidia", |m| set_top(m, "version", "0.1.1"));
    let report = registry.scan();
    assert_eq!(report.replaced, vec!["nvidia"], "{report:?}");
    let upgraded = driver(&registry, "nvidia");
    let mut ids: Vec<String> = upgraded
        .partitions()
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    ids.sort();
    let mut held = vec![mig.id.clone(), shared.id.clone()];
    held.sort();
    assert_eq!(ids, held);
    let mig_instances = upgraded
        .sample()
        .unwrap()
        .metrics
        .instances
        .iter()
        .filter(|i| i.partition_id.starts_with("mig-"))
        .count();
    assert_eq!(mig_instances, 1, "one MIG instance, not two");

    upgraded.destroy_partition(&mig.id).unwrap();
    upgraded.destroy_partition(&shared.id).unwrap();
    let whole = upgraded.create_partition(whole).unwrap();
    assert_eq!(whole.spec.compute_share_pct, 100);
    upgraded.destroy_partition(&whole.id).unwrap();
    assert!(upgraded.partitions().unwrap().is_empty());
}

/// Sets a top-level key of a manifest table.
fn set_top(mut table: toml::Table, key: &str, value: &str) -> toml::Table {
    table.insert(key.to_string(), value.into());
    table
}

/// A replica placed on a card in MIG mode gets a MIG instance: the ledger marks it
/// a device of its own, which xpud's process cannot run models on, and keeps the
/// device's uuid the driver names, so its models run in a worker that sees only
/// it. On the T4 beside it, a time slice: its models run in a worker shown the
/// card alone, measured apart (or on the card, where no worker can start).
#[test]
fn a_replica_on_a_partition_runs_its_models_in_that_partition_s_worker() {
    use std::sync::Arc;
    use xpud::runtime::inference::{Device, PartitionDevice};
    use xpud::scheduler::{Ask, Scheduler};
    let Some((_plugins, registry)) = nvidia_over_stand_in() else {
        return;
    };
    let registry = Arc::new(registry);
    let samples = xpud::sampler::SampleCache::new(std::time::Duration::from_secs(60));
    xpud::sampler::sample_all_now(&registry, &samples);
    let xpus = xpud::machine::xpus(&samples, &["nvidia".to_string()]);
    let scheduler = Scheduler::new(registry.clone());
    let labels = std::collections::BTreeMap::new();
    let ask = |xpu_type| Ask {
        count: 1,
        quota: 0.5,
        memory_mib: None,
        xpu_type,
        selector: &labels,
    };
    let mig = scheduler
        .reserve("workload:mig", &ask("NVIDIA_A100_40GB"), &xpus)
        .unwrap();
    assert!(mig[0].isolated, "{mig:?}");
    let Device::Partition(instance) = mig[0].device("NVIDIA_A100_40GB") else {
        panic!("{mig:?}");
    };
    assert!(instance.visible.starts_with("MIG-"), "{instance:?}");
    assert_eq!(
        instance.card_ordinal, None,
        "no CUDA device in this process"
    );
    let t4 = scheduler
        .reserve("workload:t4", &ask("NVIDIA_T4"), &xpus)
        .unwrap();
    assert!(!t4[0].isolated, "{t4:?}");
    assert_eq!(
        t4[0].device("NVIDIA_T4"),
        Device::Partition(Arc::new(PartitionDevice {
            driver: "nvidia".into(),
            partition: t4[0].partition.clone().unwrap(),
            visible: "GPU-8a8b7d6e-3a0f-4c2b-9e1d-5f4a3b2c1d0e".into(),
            card_ordinal: Some(0),
            memory_quota_mib: t4[0].memory_mib,
        }))
    );

    // A model placed on the slice: its worker is shown the card alone, and the
    // next sampling round tells the driver the worker's pid.
    let bytes = std::fs::read(repo().join("target/test-models/conv_grid.onnx"))
        .expect("scripts/test builds the models");
    let model = registry
        .runtime()
        .inference()
        .load_native_on(
            t4[0].device("NVIDIA_T4"),
            "conv_grid.onnx",
            bytes,
            std::time::Duration::from_secs(60),
        )
        .unwrap();
    let pid = model.worker_pid().expect("the model runs in a worker");
    let environment = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(environment
        .split(|b| *b == 0)
        .any(|var| var == b"CUDA_VISIBLE_DEVICES=GPU-8a8b7d6e-3a0f-4c2b-9e1d-5f4a3b2c1d0e"));
    let nvidia = driver(&registry, "nvidia");
    let slice = t4[0].partition.as_deref().unwrap();
    assert_eq!(nvidia.bound_process(slice), None);
    xpud::sampler::sample_all_now(&registry, &samples);
    assert_eq!(nvidia.bound_process(slice), Some(pid));
    drop(model);
    scheduler.release("workload:mig");
    scheduler.release("workload:t4");
}

/// A time slice is measured by the process the host names for it: the stand-in
/// lists pid 4242 on the T4, and once a slice is bound to it the slice's figures
/// are that process's; a slice bound to a pid NVML does not list has none.
#[test]
fn a_time_slice_is_measured_by_the_process_the_host_names_for_it() {
    let Some((_plugins, registry)) = nvidia_over_stand_in() else {
        return;
    };
    let nvidia = driver(&registry, "nvidia");
    nvidia.devices().unwrap();
    let slice = |share| PartitionSpec {
        device_index: 0,
        isolation: Isolation::Soft,
        slicing: Slicing::Time,
        memory_quota_mib: 2048,
        compute_share_pct: share,
    };
    let measured = nvidia.create_partition(slice(50)).unwrap();
    let elsewhere = nvidia.create_partition(slice(25)).unwrap();
    let instance = |id: &str| {
        let metrics = nvidia.sample().unwrap().metrics;
        let found = metrics.instances.iter().find(|i| i.partition_id == id);
        found
            .cloned()
            .expect("every partition has its instance figures")
    };
    let before = instance(&measured.id);
    assert_eq!(
        (before.memory_used_mib, before.ai_utilization_pct),
        (None, None)
    );

    nvidia.bind_process(&measured.id, 4242).unwrap();
    nvidia.bind_process(&elsewhere.id, 4343).unwrap();
    let after = instance(&measured.id);
    assert_eq!(after.memory_used_mib, Some(512));
    assert_eq!(after.ai_utilization_pct, Some(33.0));
    assert_eq!(after.memory_quota_mib, 2048);
    let unlisted = instance(&elsewhere.id);
    assert_eq!(
        (unlisted.memory_used_mib, unlisted.ai_utilization_pct),
        (None, None)
    );
    nvidia.destroy_partition(&measured.id).unwrap();
    nvidia.destroy_partition(&elsewhere.id).unwrap();
}

/// CUDA sees a MIG instance and then no other GPU, so where a card is in MIG mode
/// xpud shows CUDA the others only: the stand-in's T4 is CUDA device 0, and the
/// A100 in MIG mode has none.
#[test]
fn cuda_is_shown_the_cards_outside_mig_mode() {
    use xpud::runtime::cuda;
    let Some(nvml) = stand_in_loaded() else {
        return;
    };
    let cards = cuda::cards(&nvml).unwrap();
    assert_eq!(cards.len(), 2);
    let plan = cuda::plan(&cards);
    assert_eq!(
        plan.visible.as_deref(),
        Some("GPU-8a8b7d6e-3a0f-4c2b-9e1d-5f4a3b2c1d0e")
    );
    assert_eq!(plan.ordinals, [Some(0), None]);
}

/// A round's cards are read in one bridge call, each with the fields asked (blank
/// where NVML has no figure) or its error; NVML is asked for nothing else; lists
/// longer than any machine's cards, or than the fields there are, are refused
/// before NVML is asked anything.
#[test]
fn the_bridge_reads_the_fields_asked_of_many_devices_in_one_call_and_bounds_the_lists() {
    use xpud::runtime::bindings::v0_2::driver::xpu::plugin::nvml::{Field, NvmlError};
    use xpud::runtime::nvml::{samples, BLANK, MAX_DEVICES, MAX_FIELDS};
    let Some(nvml) = stand_in_loaded() else {
        return;
    };
    let fields = [
        Field::MemoryTotalBytes,
        Field::JpegUtilizationPct,
        Field::TemperatureCelsius,
    ];
    let readings = samples(&nvml, &[1, 7, 0], &fields).unwrap();
    // The A100, the missing device, the T4 (which has no JPEG engine).
    assert_eq!(
        readings.values,
        [
            40960 << 20,
            4,
            33,
            BLANK,
            BLANK,
            BLANK,
            15360 << 20,
            BLANK,
            48
        ]
    );
    assert_eq!(readings.failed.len(), 1);
    assert!(
        matches!(readings.failed[0], (1, NvmlError::NotFound(_))),
        "{:?}",
        readings.failed
    );

    // What each answer cost in NVML calls (the stand-in counts this thread's).
    // SAFETY: the stand-in built above; the symbol is `unsigned long long (void)`.
    let library = stand_in(fake_nvml()).unwrap();
    let calls = unsafe { libloading::Library::new(&library).unwrap() };
    let count = unsafe {
        *calls
            .get::<unsafe extern "C" fn() -> u64>(b"fake_nvml_calls")
            .unwrap()
    };
    let cost = |fields: &[Field]| {
        let before = unsafe { count() };
        samples(&nvml, &[0], fields).unwrap();
        unsafe { count() - before }
    };
    let one = cost(&[Field::MemoryUsedBytes]);
    // Memory is read once for both of its fields.
    assert_eq!(
        cost(&[Field::MemoryUsedBytes, Field::MemoryTotalBytes]),
        one
    );
    assert_eq!(
        cost(&[Field::MemoryUsedBytes, Field::PowerDrawMilliwatts]),
        one + 1
    );

    let too_many = vec![Field::MemoryUsedBytes; MAX_FIELDS + 1];
    match samples(&nvml, &[0], &too_many) {
        Err(NvmlError::NotFound(why)) => assert!(why.contains("at most 32"), "{why}"),
        other => panic!("{other:?}"),
    }
    let too_many = vec![0; MAX_DEVICES as usize + 1];
    match samples(&nvml, &too_many, &fields) {
        Err(NvmlError::NotFound(why)) => assert!(why.contains("at most 64"), "{why}"),
        other => panic!("{other:?}"),
    }
}
