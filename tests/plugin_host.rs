//! The plugin host against the real built plugins: loading, verification, hot
//! reload, containment of misbehaving plugins, grants, and both worlds end to end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use xpud::plugins::driver::DriverFailure;
use xpud::plugins::supervisor::{CallError, Health};
use xpud::runtime::bindings::driver_types::{DriverError, Isolation, PartitionSpec, Slicing};

fn no_grants() -> std::path::PathBuf {
    fixture("empty-sysfs")
}

#[test]
fn reference_plugins_load_from_the_directory() {
    let plugins = PluginDir::new();
    for name in ["sim-xpu", "linux-sysfs", "passthrough"] {
        plugins.install(name);
    }
    let registry = registry(&plugins, &no_grants());
    let report = registry.scan();
    assert_eq!(report.loaded, vec!["linux-sysfs", "passthrough", "sim-xpu"]);
    assert!(report.refused.is_empty(), "{report:?}");

    let sim = registry.get("sim-xpu").unwrap();
    let driver = sim.driver().unwrap();
    let info = driver.info().unwrap();
    assert!(info.simulated);
    assert_eq!(info.accelerator_types, vec!["SIMULATED_XPU16"]);
    let devices = driver.devices().unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[1].memory_total_mib, Some(16384));
    let sample = driver.sample().unwrap().metrics;
    assert_eq!(sample.cards.len(), 2);
    for card in &sample.cards {
        let ai = card.ai_utilization_pct.unwrap();
        assert!((0.0..=100.0).contains(&ai), "{ai}");
        assert!(card.memory_used_mib.unwrap() <= 16384);
        assert!(card.temperature_celsius.is_some() && card.power_watts.is_some());
    }
    let labels = driver.labels().unwrap();
    assert!(labels
        .iter()
        .any(|l| l.key == "xpu.model" && l.value == "SIMULATED_XPU16"));
    assert!(labels
        .iter()
        .any(|l| l.key == "xpu.simulated" && l.value == "true"));

    assert!(registry.get("passthrough").unwrap().algorithm().is_some());
    let views = registry.views();
    assert!(views.iter().all(|v| v.state == "loaded"));
}

/// Plugins built against `xpu:plugin@0.1.0` (wit-bindgen on wit/v0.1.0, no SDK)
/// keep loading and running beside 0.2 ones: a driver with its partitions, and an
/// algorithm (wobbly, which the video tests run end to end).
#[test]
fn plugins_built_against_0_1_keep_running_beside_0_2() {
    let plugins = PluginDir::new();
    for name in ["legacy-driver", "sim-xpu", "wobbly"] {
        plugins.install(name);
    }
    let registry = registry(&plugins, &no_grants());
    let report = registry.scan();
    assert_eq!(report.loaded, vec!["legacy-driver", "sim-xpu", "wobbly"]);
    let api = |name: &str| {
        registry
            .views()
            .into_iter()
            .find(|v| v.name == name)
            .and_then(|v| v.api)
            .unwrap()
    };
    assert_eq!(api("legacy-driver"), "0.1.0");
    assert_eq!(api("wobbly"), "0.1.0");
    assert_eq!(api("sim-xpu"), "0.2.0");

    let legacy = registry.get("legacy-driver").unwrap();
    let driver = legacy.driver().unwrap();
    assert_eq!(driver.info().unwrap().accelerator_types, vec!["LEGACY_X1"]);
    assert_eq!(driver.devices().unwrap()[0].memory_total_mib, Some(8192));
    let spec = PartitionSpec {
        device_index: 0,
        isolation: Isolation::Soft,
        slicing: Slicing::Time,
        memory_quota_mib: 2048,
        compute_share_pct: 25,
    };
    let partition = driver.create_partition(spec).unwrap();
    let sample = driver.sample().unwrap().metrics;
    assert_eq!(sample.cards[0].ai_utilization_pct, Some(25.0));
    assert_eq!(sample.instances.len(), 1);
    assert_eq!(sample.instances[0].memory_used_mib, Some(1024));
    driver.destroy_partition(&partition.id).unwrap();
    assert!(driver.sample().unwrap().metrics.instances.is_empty());

    let wobbly = registry.get("wobbly").unwrap();
    let worker = wobbly.algorithm().unwrap().spawn_worker();
    let session = worker
        .open_session(vec![xpud::runtime::bindings::analyzer::Rule {
            event_type: "INTRUSION".into(),
            areas: vec![],
            masks: vec![],
            extend_params: "{}".into(),
        }])
        .unwrap();
    let frame = xpud::runtime::frames::Frame::new(
        8,
        8,
        0,
        xpud::runtime::bindings::wit_frames::PixelFormat::Gray8,
        vec![0u8; 64].into(),
    )
    .unwrap();
    let events = worker.process(session, &frame).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].label, "INTRUSION");
}

/// A sampling round asks for a driver's devices only when the version its sample
/// gives changed: once for sim-xpu, whose cards never change; every round for a
/// 0.1 driver, which has no version; and at each change for chaos's `versioned`
/// mode, whose health changes come with a new version and are noted as changes.
#[test]
fn devices_are_asked_for_only_when_their_version_changes() {
    let plugins = PluginDir::new();
    plugins.install("sim-xpu");
    plugins.install("legacy-driver");
    plugins.install_as("chaos", "chaos", |t| {
        set(t, "config", "mode", "versioned".into())
    });
    let registry = registry(&plugins, &no_grants());
    registry.scan();
    let cache = xpud::sampler::SampleCache::new(Duration::from_secs(3600));
    let mut healths = Vec::new();
    for _ in 0..6 {
        for name in ["sim-xpu", "legacy-driver", "chaos"] {
            let snapshot =
                xpud::sampler::sample_one(name, driver(&registry, name).as_ref(), &cache).unwrap();
            if name == "chaos" {
                healths.push(xpud::sampler::health_name(snapshot.devices[0].health));
            }
            cache.put(name, snapshot);
        }
    }
    let devices_calls = |name: &str| calls_of(&registry, name, "devices");
    assert_eq!(devices_calls("sim-xpu"), 1);
    assert_eq!(devices_calls("legacy-driver"), 6);
    // Samples 1 to 6 give versions 0, 1, 1, 2, 2, 3.
    assert_eq!(devices_calls("chaos"), 4);
    assert_eq!(
        healths,
        [
            "healthy",
            "degraded",
            "degraded",
            "unhealthy",
            "unhealthy",
            "healthy"
        ]
    );
    let changes: Vec<_> = cache
        .health_changes("chaos")
        .into_iter()
        .map(|c| (c.from, c.to))
        .collect();
    assert_eq!(
        changes,
        [
            ("healthy", "degraded"),
            ("degraded", "unhealthy"),
            ("unhealthy", "healthy")
        ]
    );
}

/// A restarted driver counts its devices versions from the start again: its
/// devices are asked for at the new incarnation's first sample, even where that
/// sample's version is the one the host kept.
#[test]
fn a_restarted_driver_is_asked_for_its_devices_again() {
    let (_plugins, registry) = chaos_beside_sim(|m| {
        let m = set(m, "config", "mode", "versioned".into());
        set(m, "config", "trap-at", 2.into())
    });
    let chaos = driver(&registry, "chaos");
    chaos.sample().unwrap();
    assert!(chaos.sample().is_err(), "the second sample traps");
    if let Err(e) = sample_past_restarts(&chaos) {
        panic!("{e}");
    }
    assert_eq!(chaos.status().restarts, 1);
    // Both incarnations' first samples give version 0.
    assert_eq!(calls_of(&registry, "chaos", "devices"), 2);
}

/// A restarted plugin gets its predecessor's pool slot back, whose memory the
/// engine resets partly by `memset` (the pages it keeps resident) and partly by
/// giving pages back: nothing the last instance wrote, in static memory or heap,
/// is seen by the next.
#[test]
fn a_new_instance_sees_nothing_of_the_last_one_s_memory() {
    let (_plugins, registry) = chaos_beside_sim(|m| {
        let m = set(m, "config", "mode", "remember".into());
        set(m, "config", "trap-at", 2.into())
    });
    let chaos = driver(&registry, "chaos");
    for incarnation in 0..3 {
        if let Err(e) = sample_past_restarts(&chaos) {
            panic!("incarnation {incarnation}: {e}");
        }
        assert!(chaos.sample().is_err(), "the second sample traps");
    }
    assert_eq!(chaos.status().restarts, 2);
}

#[test]
fn sim_xpu_accounts_partitions_and_refuses_over_commit() {
    let plugins = PluginDir::new();
    plugins.install_as("sim-xpu", "sim-xpu", |m| {
        let m = set(m, "config", "cards", 8.into());
        set(m, "config", "memory-mib", 8192.into())
    });
    let registry = registry(&plugins, &no_grants());
    registry.scan();
    let driver = driver(&registry, "sim-xpu");
    assert_eq!(driver.devices().unwrap().len(), 8);

    let spec =
        |device_index, memory_quota_mib, compute_share_pct, isolation, slicing| PartitionSpec {
            device_index,
            isolation,
            slicing,
            memory_quota_mib,
            compute_share_pct,
        };
    let a = driver
        .create_partition(spec(3, 4096, 50, Isolation::Hard, Slicing::Space))
        .unwrap();
    let b = driver
        .create_partition(spec(3, 2048, 25, Isolation::Soft, Slicing::Space))
        .unwrap();
    // 8192 - 6144 = 2048 MiB left on card 3.
    match driver.create_partition(spec(3, 4096, 10, Isolation::Soft, Slicing::Space)) {
        Err(DriverFailure::Driver(DriverError::InsufficientResources(m))) => {
            assert!(m.contains("2048 MiB left"), "{m}")
        }
        other => panic!("over-commit accepted: {other:?}"),
    }
    match driver.create_partition(spec(3, 1024, 30, Isolation::Soft, Slicing::Space)) {
        Err(DriverFailure::Driver(DriverError::InsufficientResources(m))) => {
            assert!(m.contains("25% left"), "{m}")
        }
        other => panic!("compute over-commit accepted: {other:?}"),
    }
    assert!(matches!(
        driver.create_partition(spec(0, 1024, 10, Isolation::Hard, Slicing::Time)),
        Err(DriverFailure::Driver(DriverError::Unsupported(_)))
    ));
    assert!(matches!(
        driver.create_partition(spec(8, 1024, 10, Isolation::Soft, Slicing::Space)),
        Err(DriverFailure::Driver(DriverError::NotFound(_)))
    ));
    let sample = driver.sample().unwrap().metrics;
    assert_eq!(sample.instances.len(), 2);
    assert!(sample
        .instances
        .iter()
        .all(|i| i.device_index == 3 && i.memory_used_mib.unwrap() <= i.memory_quota_mib));
    driver.destroy_partition(&a.id).unwrap();
    let left: Vec<String> = driver
        .partitions()
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(left, vec![b.id.clone()]);
    // Freed quota is usable again.
    driver
        .create_partition(spec(3, 4096, 50, Isolation::Hard, Slicing::Space))
        .unwrap();
    assert!(matches!(
        driver.destroy_partition("nope"),
        Err(DriverFailure::Driver(DriverError::NotFound(_)))
    ));
}

#[test]
fn tampered_wasm_is_refused_and_others_load() {
    let plugins = PluginDir::new();
    plugins.install("sim-xpu");
    plugins.install("passthrough");
    let mut wasm = std::fs::read(plugins.path().join("passthrough.wasm")).unwrap();
    let last = wasm.len() - 1;
    wasm[last] ^= 0xff;
    std::fs::write(plugins.path().join("passthrough.wasm"), wasm).unwrap();
    let registry = registry(&plugins, &no_grants());
    let report = registry.scan();
    assert_eq!(report.loaded, vec!["sim-xpu"]);
    assert_eq!(report.refused, vec!["passthrough"]);
    let view = view(&registry, "passthrough");
    assert_eq!(view.state, "refused");
    assert!(view.refused.unwrap().contains("sha256 mismatch"));
}

#[test]
fn bad_plugins_are_refused_with_the_reason() {
    let plugins = PluginDir::new();
    plugins.install("sim-xpu");
    // Unknown kind.
    plugins.install_as("sim-xpu", "bad-kind", |mut m| {
        m.insert("kind".into(), "gpu".into());
        m
    });
    // An API version this host does not implement.
    plugins.install_as("sim-xpu", "future-api", |mut m| {
        m.insert("api".into(), "0.3.0".into());
        m
    });
    // An algorithm declared as a driver: the driver export is missing.
    plugins.install_as("passthrough", "wrong-world", |mut m| {
        m.insert("kind".into(), "driver".into());
        m
    });
    // Bytes that are no component at all, hash pinned correctly.
    let junk = b"\0asm\x01\0\0\0not really".to_vec();
    std::fs::write(plugins.path().join("junk.wasm"), &junk).unwrap();
    let (_, manifest) = built("sim-xpu");
    let mut table: toml::Table =
        toml::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    table.insert("name".into(), "junk".into());
    use sha2::Digest;
    table.insert(
        "sha256".into(),
        hex::encode(sha2::Sha256::digest(&junk)).into(),
    );
    plugins.write_manifest("junk", &table);
    // A wasm without a manifest is not a plugin; a manifest without a wasm is refused.
    std::fs::write(
        plugins.path().join("lonely.toml"),
        toml::to_string(&table).unwrap(),
    )
    .unwrap();

    let registry = registry(&plugins, &no_grants());
    let report = registry.scan();
    assert_eq!(report.loaded, vec!["sim-xpu"]);
    let reason = |name: &str| {
        registry
            .views()
            .into_iter()
            .find(|v| v.name == name)
            .and_then(|v| v.refused)
            .unwrap_or_default()
    };
    assert!(
        reason("bad-kind").contains("kind"),
        "{}",
        reason("bad-kind")
    );
    assert!(
        reason("future-api").contains("0.3.0"),
        "{}",
        reason("future-api")
    );
    assert!(
        reason("wrong-world").contains("Algorithm"),
        "{}",
        reason("wrong-world")
    );
    assert!(reason("junk").contains("compile"), "{}", reason("junk"));
    assert!(reason("lonely").contains("name"), "{}", reason("lonely"));
    // The good one is untouched.
    assert!(driver(&registry, "sim-xpu").sample().is_ok());
}

/// The driver's next sample once a restart in progress is over (waiting at most
/// 10 s for it).
fn sample_past_restarts(
    driver: &xpud::plugins::driver::Driver,
) -> Result<xpud::plugins::driver::Reading, DriverFailure> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match driver.sample() {
            Err(DriverFailure::Plugin(CallError::Restarting(wait)))
                if Instant::now() < deadline =>
            {
                std::thread::sleep(wait)
            }
            answer => return answer,
        }
    }
}

/// sim-xpu and a chaos plugin whose manifest `edit` sets up, both loaded.
fn chaos_beside_sim(
    edit: impl FnOnce(toml::Table) -> toml::Table,
) -> (PluginDir, xpud::plugins::Registry) {
    let plugins = PluginDir::new();
    plugins.install("sim-xpu");
    plugins.install_as("chaos", "chaos", edit);
    let registry = registry(&plugins, &no_grants());
    registry.scan();
    (plugins, registry)
}

#[test]
fn trap_is_contained_restarted_then_marked_unhealthy() {
    let (_plugins, registry) = chaos_beside_sim(|m| set(m, "config", "mode", "trap".into()));
    let chaos = driver(&registry, "chaos");
    let sim = driver(&registry, "sim-xpu");

    // quick_restarts: 2 restarts tolerated, the third crash is one too many.
    let mut errors = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match chaos.sample() {
            Err(DriverFailure::Plugin(CallError::Restarting(wait))) => std::thread::sleep(wait),
            Err(DriverFailure::Plugin(CallError::Unhealthy(reason))) => {
                errors.push(format!("unhealthy: {reason}"));
                break;
            }
            Err(e) => errors.push(e.to_string()),
            Ok(_) => panic!("the trap did not trap"),
        }
        // Every crash leaves the neighbour untouched.
        assert_eq!(sim.sample().unwrap().metrics.cards.len(), 2);
    }
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert!(errors[0].contains("trapped"), "{}", errors[0]);
    // The whole reason: the trap's cause and where it happened, not a first line
    // that ends in "wasm backtrace:".
    assert!(
        errors[0].contains("unreachable") && errors[0].contains("backtrace"),
        "{}",
        errors[0]
    );
    assert!(
        errors[3].starts_with("unhealthy: 3 crashes"),
        "{}",
        errors[3]
    );
    let status = chaos.status();
    assert_eq!(status.restarts, 2);
    assert_eq!(status.crashes, 3);
    assert!(matches!(status.health, Health::Unhealthy { .. }));
    // Once unhealthy it is not called again.
    assert!(matches!(
        chaos.devices(),
        Err(DriverFailure::Plugin(CallError::Unhealthy(_)))
    ));
}

#[test]
fn endless_loop_is_stopped_by_the_deadline() {
    let (_plugins, registry) = chaos_beside_sim(|m| {
        let m = set(m, "config", "mode", "loop".into());
        set(m, "limits", "call-timeout-ms", 200.into())
    });
    let chaos = driver(&registry, "chaos");
    let sim = driver(&registry, "sim-xpu");

    // The loop runs on another thread while the neighbour keeps answering.
    let started = Instant::now();
    let looping = std::thread::spawn(move || chaos.sample());
    while !looping.is_finished() {
        assert!(sim.sample().is_ok());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "deadline never fired"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let result = looping.join().unwrap();
    assert!(
        matches!(result, Err(DriverFailure::Plugin(CallError::Timeout(t))) if t == Duration::from_millis(200)),
        "{result:?}"
    );
    let status = registry.get("chaos").unwrap().status().unwrap();
    assert!(
        matches!(status.health, Health::Restarting { .. }),
        "{status:?}"
    );
}

#[test]
fn unbounded_allocation_hits_the_memory_cap() {
    let (_plugins, registry) = chaos_beside_sim(|m| {
        let m = set(m, "config", "mode", "oom".into());
        set(m, "limits", "memory-mib", 16.into())
    });
    let chaos = driver(&registry, "chaos");
    let result = chaos.sample();
    assert!(
        matches!(result, Err(DriverFailure::Plugin(CallError::OutOfMemory))),
        "{result:?}"
    );
    assert!(driver(&registry, "sim-xpu").sample().is_ok());
}

/// The chaos plugin in `read` mode reports the first line of the file it was told
/// to read as its device type, or the error.
fn read_through_chaos(path: &str) -> Result<String, String> {
    let plugins = PluginDir::new();
    plugins.install_as("chaos", "chaos", |mut m| {
        m = set(m, "config", "mode", "read".into());
        m = set(m, "config", "path", path.into());
        set(m, "grants", "read", toml::Value::Array(vec!["/sys".into()]))
    });
    let registry = registry(&plugins, &fixture("sysfs"));
    registry.scan();
    let chaos = registry
        .get("chaos")
        .expect("chaos loads")
        .driver()
        .unwrap()
        .clone();
    match chaos.devices() {
        Ok(devices) => Ok(devices[0].accelerator_type.clone()),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn reads_inside_grants_work_and_outside_fail() {
    assert_eq!(
        read_through_chaos("/sys/bus/pci/devices/0000:01:00.0/vendor").unwrap(),
        "0x10de"
    );
    // Not granted (the fixture has it, but only /sys was asked for).
    let err = read_through_chaos("/proc/driver/nvidia/gpus/0000:01:00.0/information").unwrap_err();
    assert!(err.contains("read /proc"), "{err}");
    // Escaping the preopen with `..` (the host file exists).
    assert!(fixture("outside-grants.txt").exists());
    let err = read_through_chaos("/sys/../../outside-grants.txt").unwrap_err();
    assert!(err.contains("not permitted"), "{err}");
    // A host path that exists: to the plugin there is no such file.
    let err = read_through_chaos("/etc/hostname").unwrap_err();
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn grants_outside_the_operator_policy_are_refused() {
    let plugins = PluginDir::new();
    plugins.install_as("chaos", "chaos", |m| {
        set(m, "grants", "read", toml::Value::Array(vec!["/etc".into()]))
    });
    let registry = registry(&plugins, &fixture("sysfs"));
    let report = registry.scan();
    assert_eq!(report.refused, vec!["chaos"]);
    let reason = registry.views()[0].refused.clone().unwrap();
    assert!(reason.contains("\"/etc\" is not allowed"), "{reason}");
}

#[test]
fn linux_sysfs_discovers_the_fixture_cards() {
    let plugins = PluginDir::new();
    plugins.install("linux-sysfs");
    let registry = registry(&plugins, &fixture("sysfs"));
    registry.scan();
    let driver = driver(&registry, "linux-sysfs");
    let info = driver.info().unwrap();
    assert!(!info.simulated);
    assert_eq!(info.vendor, "NVIDIA+AMD");
    let devices = driver.devices().unwrap();
    assert_eq!(
        devices.len(),
        2,
        "ASPEED VGA and the NIC are no accelerators: {devices:#?}"
    );
    let t4 = &devices[0];
    assert_eq!(t4.accelerator_type, "NVIDIA_T4");
    assert_eq!(
        t4.uuid.as_deref(),
        Some("GPU-5e1c2d3a-0b4f-4c3e-9a1b-7f2e8d9c0a11")
    );
    assert_eq!(t4.id, "GPU-5e1c2d3a-0b4f-4c3e-9a1b-7f2e8d9c0a11");
    assert_eq!(t4.pci_bus_id.as_deref(), Some("0000:01:00.0"));
    let amd = &devices[1];
    assert_eq!(amd.accelerator_type, "AMD_INSTINCT_MI210");
    assert_eq!(amd.id, "amd:0000:03:00.0");
    assert_eq!(amd.memory_total_mib, Some(65520));

    let sample = driver.sample().unwrap().metrics;
    let (nv, am) = (&sample.cards[0], &sample.cards[1]);
    // Without NVML nothing about the T4's load is readable: absent, not zero.
    assert_eq!(nv.ai_utilization_pct, None);
    assert_eq!(nv.memory_used_mib, None);
    assert_eq!(nv.temperature_celsius, None);
    assert_eq!(am.ai_utilization_pct, Some(37.0));
    assert_eq!(am.memory_used_mib, Some(4096));
    assert_eq!(am.temperature_celsius, Some(45.0));
    assert_eq!(am.power_watts, Some(35.0));
    assert!(matches!(
        driver.create_partition(PartitionSpec {
            device_index: 0,
            isolation: Isolation::Soft,
            slicing: Slicing::Time,
            memory_quota_mib: 1024,
            compute_share_pct: 50,
        }),
        Err(DriverFailure::Driver(DriverError::Unsupported(_)))
    ));
}

#[test]
fn linux_sysfs_reports_nothing_on_a_machine_without_accelerators() {
    let plugins = PluginDir::new();
    plugins.install("linux-sysfs");
    for root in [fixture("empty-sysfs"), fixture("does-not-exist")] {
        let registry = registry(&plugins, &root);
        registry.scan();
        let driver = driver(&registry, "linux-sysfs");
        assert!(driver.devices().unwrap().is_empty());
        assert!(driver.sample().unwrap().metrics.cards.is_empty());
    }
}

#[test]
fn plugins_are_added_replaced_and_removed_while_serving() {
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let plugins = PluginDir::new();
    plugins.install("sim-xpu");
    let registry = Arc::new(registry(&plugins, &no_grants()));
    let watcher = tokio
        .block_on(xpud::plugins::watcher::watch(registry.clone()))
        .unwrap();
    assert!(registry.get("sim-xpu").is_some());

    // Added.
    plugins.install("passthrough");
    assert!(wait_for(Duration::from_secs(10), || registry
        .get("passthrough")
        .is_some()));

    // Replaced: a new config is a new plugin version, and the new instance serves.
    let before = registry.get("sim-xpu").unwrap();
    let partition = before
        .driver()
        .unwrap()
        .create_partition(PartitionSpec {
            device_index: 1,
            isolation: Isolation::Hard,
            slicing: Slicing::Space,
            memory_quota_mib: 4096,
            compute_share_pct: 25,
        })
        .unwrap();
    plugins.install_as("sim-xpu", "sim-xpu", |m| {
        let m = set(m, "config", "cards", 5.into());
        let mut m = m;
        m.insert("version".into(), "0.1.1".into());
        m
    });
    assert!(wait_for(Duration::from_secs(10), || {
        registry
            .get("sim-xpu")
            .is_some_and(|p| p.manifest.version.to_string() == "0.1.1")
    }));
    let after = registry.get("sim-xpu").unwrap();
    assert_eq!(after.driver().unwrap().devices().unwrap().len(), 5);
    // The upgrade kept the partition, under the same id.
    let kept = after.driver().unwrap().partitions().unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].id, partition.id);
    assert_eq!(kept[0].spec.memory_quota_mib, 4096);
    // The old version keeps working for whoever still holds it.
    assert_eq!(before.driver().unwrap().devices().unwrap().len(), 2);

    // A broken replacement is refused and the loaded version keeps serving.
    std::fs::write(plugins.path().join("sim-xpu.wasm"), b"garbage").unwrap();
    assert!(wait_for(Duration::from_secs(10), || {
        registry.views().iter().any(|v| {
            v.name == "sim-xpu" && v.refused.as_deref().is_some_and(|r| r.contains("sha256"))
        })
    }));
    assert_eq!(
        registry
            .get("sim-xpu")
            .unwrap()
            .manifest
            .version
            .to_string(),
        "0.1.1"
    );

    // Removed.
    plugins.remove("passthrough");
    assert!(wait_for(Duration::from_secs(10), || registry
        .get("passthrough")
        .is_none()));
    watcher.abort();
}

#[test]
fn algorithm_world_frames_in_events_out() {
    use xpud::plugins::algorithm::AlgorithmFailure;
    use xpud::runtime::bindings::analyzer::{AnalyzerError, Area, AreaType, Point, Rule};
    use xpud::runtime::bindings::wit_frames::PixelFormat;
    use xpud::runtime::frames::Frame;

    let plugins = PluginDir::new();
    plugins.install("passthrough");
    let registry = registry(&plugins, &no_grants());
    registry.scan();
    let algorithm = registry
        .get("passthrough")
        .unwrap()
        .algorithm()
        .unwrap()
        .clone();
    let worker = algorithm.spawn_worker();

    let square = |id| Area {
        id,
        area_type: AreaType::Polygon,
        points: vec![
            Point { x: 0.0, y: 1.0 },
            Point { x: 1.0, y: 1.0 },
            Point { x: 1.0, y: 0.0 },
            Point { x: 0.0, y: 0.0 },
        ],
    };
    let rules = vec![Rule {
        event_type: "ILLEGAL_ADV".into(),
        areas: vec![square(7)],
        masks: vec![],
        extend_params: r#"{"sensitivity":"high"}"#.into(),
    }];
    let session = worker.open_session(rules).unwrap();

    // 64x48 grey frame, black but for a bright 16x16 patch at the centre.
    let (w, h) = (64u32, 48u32);
    let mut pixels = vec![0u8; (w * h) as usize];
    for y in 16..32 {
        for x in 24..40 {
            pixels[(y * w + x) as usize] = 200;
        }
    }
    let frame = Frame::new(w, h, 1_700_000_000_123, PixelFormat::Gray8, pixels.into()).unwrap();
    for n in 1..=2 {
        let events = worker.process(session, &frame).unwrap();
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert_eq!(event.event_type, "FRAME_SEEN");
        assert_eq!(event.label, "ILLEGAL_ADV");
        assert_eq!(event.area_id, Some(7));
        let attributes: serde_json::Value = serde_json::from_str(&event.attributes).unwrap();
        assert_eq!(attributes["width"], 64);
        assert_eq!(attributes["height"], 48);
        assert_eq!(attributes["timestampMs"], 1_700_000_000_123u64);
        assert_eq!(attributes["frame"], n, "sessions keep state between frames");
        assert_eq!(attributes["centreBrightness"], 200.0);
    }

    // The plugin validates rules.
    let mut bad = square(3);
    bad.points.truncate(2);
    let err = worker
        .open_session(vec![Rule {
            event_type: "X".into(),
            areas: vec![bad],
            masks: vec![],
            extend_params: "{}".into(),
        }])
        .unwrap_err();
    assert!(
        matches!(&err, AlgorithmFailure::Analyzer(AnalyzerError::InvalidRules(m)) if m.contains("area 3")),
        "{err:?}"
    );

    // A 1080p RGB frame is lent, not copied: the plugin reads its 16x16 patch only.
    let big = Frame::new(
        1920,
        1080,
        0,
        PixelFormat::Rgb8,
        vec![90u8; 1920 * 1080 * 3].into(),
    )
    .unwrap();
    let events = worker.process(session, &big).unwrap();
    let attributes: serde_json::Value = serde_json::from_str(&events[0].attributes).unwrap();
    assert_eq!(attributes["centreBrightness"], 90.0);

    worker.close_session(session).unwrap();
    assert!(matches!(
        worker.process(session, &frame),
        Err(AlgorithmFailure::NoSession(_))
    ));
    assert!(matches!(
        worker.status().health,
        xpud::plugins::supervisor::Health::Running
    ));
}

#[test]
fn algorithms_run_models_natively_through_onnx_runtime() {
    use xpud::plugins::algorithm::AlgorithmFailure;
    use xpud::runtime::bindings::analyzer::{AnalyzerError, Rule};
    use xpud::runtime::bindings::wit_frames::PixelFormat;
    use xpud::runtime::frames::Frame;

    let (plugins, package) = passthrough_with_models(&["channel_mean.onnx"], |m| m);
    std::fs::write(package.join("garbage.onnx"), b"not a model").unwrap();
    std::fs::write(plugins.path().join("outside.onnx"), b"outside the package").unwrap();

    let registry = registry(&plugins, &no_grants());
    registry.scan();
    let worker = registry
        .get("passthrough")
        .unwrap()
        .algorithm()
        .unwrap()
        .spawn_worker();
    let rule = |params: &str| Rule {
        event_type: "MEAN".into(),
        areas: vec![],
        masks: vec![],
        extend_params: params.into(),
    };

    let session = worker
        .open_session(vec![rule(
            r#"{"model": "channel_mean.onnx", "inputWidth": 8, "inputHeight": 8}"#,
        )])
        .unwrap();
    // Every pixel (255, 0, 51): channel means 1.0, 0.0, 0.2 after /255.
    let pixels: Vec<u8> = std::iter::repeat_n([255u8, 0, 51], 32 * 16)
        .flatten()
        .collect();
    let frame = Frame::new(32, 16, 5, PixelFormat::Rgb8, pixels.into()).unwrap();
    let events = worker.process(session, &frame).unwrap();
    let attributes: serde_json::Value = serde_json::from_str(&events[0].attributes).unwrap();
    let model = &attributes["model"];
    let provider = model["provider"].as_str().unwrap();
    assert!(provider == "cpu" || provider == "cuda", "{provider}");
    let mean = &model["outputs"]["mean"];
    assert_eq!(mean["shape"], serde_json::json!([1, 3]));
    let values: Vec<f64> = mean["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (got, want) in values.iter().zip([1.0, 0.0, 0.2]) {
        assert!((got - want).abs() < 1e-5, "{values:?}");
    }

    let refused = |params: &str| match worker.open_session(vec![rule(params)]) {
        Err(AlgorithmFailure::Analyzer(AnalyzerError::InvalidRules(m))) => m,
        other => panic!("{params}: {other:?}"),
    };
    assert!(refused(r#"{"model": "missing.onnx"}"#).contains("ModelNotFound"));
    assert!(refused(r#"{"model": "../outside.onnx"}"#).contains("ModelNotFound"));
    assert!(refused(r#"{"model": "garbage.onnx"}"#).contains("InvalidModel"));
}

#[test]
fn partitions_survive_a_driver_restart_under_the_ids_callers_hold() {
    let plugins = PluginDir::new();
    plugins.install_as("chaos", "chaos", |m| {
        set(m, "config", "mode", "flaky".into())
    });
    let registry = registry(&plugins, &no_grants());
    registry.scan();
    let driver = driver(&registry, "chaos");
    let spec = |memory_quota_mib| PartitionSpec {
        device_index: 0,
        isolation: Isolation::Soft,
        slicing: Slicing::Space,
        memory_quota_mib,
        compute_share_pct: 10,
    };
    let ids = |partitions: Vec<xpud::runtime::bindings::driver_types::Partition>| {
        partitions.into_iter().map(|p| p.id).collect::<Vec<_>>()
    };
    let c0 = driver.create_partition(spec(100)).unwrap();
    let c1 = driver.create_partition(spec(200)).unwrap();
    assert_eq!((c0.id.as_str(), c1.id.as_str()), ("c0", "c1"));
    driver.destroy_partition("c0").unwrap();
    // The process that does c1's work (chaos echoes it as the memory used).
    driver.bind_process("c1", 77).unwrap();
    assert_eq!(driver.bound_process("c1"), Some(77));
    assert!(matches!(
        driver.bind_process("c0", 77),
        Err(DriverFailure::Driver(DriverError::NotFound(_)))
    ));

    // First sample answers, the second traps: the incarnation and its partitions are gone.
    let first = driver.sample().unwrap().metrics;
    assert_eq!(first.instances[0].partition_id, "c1");
    assert_eq!(first.instances[0].memory_used_mib, Some(77));
    assert!(matches!(
        driver.sample(),
        Err(DriverFailure::Plugin(CallError::Trap(_)))
    ));
    assert!(wait_for(Duration::from_secs(5), || driver
        .partitions()
        .is_ok()));
    assert_eq!(driver.status().restarts, 1);

    // Restored: the new incarnation calls it c0, callers still say c1, and it was
    // told c1's process again.
    assert_eq!(ids(driver.partitions().unwrap()), vec!["c1"]);
    let sample = driver.sample().unwrap().metrics;
    assert_eq!(sample.instances[0].partition_id, "c1");
    assert_eq!(sample.instances[0].memory_quota_mib, 200);
    assert_eq!(sample.instances[0].memory_used_mib, Some(77));

    // A new partition gets the incarnation's next id, c1, which a caller holds: it is
    // told apart.
    let fresh = driver.create_partition(spec(300)).unwrap();
    assert_eq!(fresh.id, "c1.1");
    let mut all = ids(driver.partitions().unwrap());
    all.sort();
    assert_eq!(all, vec!["c1", "c1.1"]);
    driver.destroy_partition("c1").unwrap();
    assert_eq!(ids(driver.partitions().unwrap()), vec!["c1.1"]);
    driver.destroy_partition("c1.1").unwrap();
    assert!(driver.partitions().unwrap().is_empty());
}

/// A driver that cannot list its partitions after a restart has not started: the
/// host does not create the ledger's partitions again (hardware may have kept them),
/// says why, and tries again after the backoff.
#[test]
fn partitions_are_not_made_twice_when_the_driver_cannot_list_them() {
    let plugins = PluginDir::new();
    plugins.install_as("chaos", "chaos", |m| {
        set(m, "config", "mode", "unlisted".into())
    });
    let registry = registry(&plugins, &no_grants());
    registry.scan();
    let driver = driver(&registry, "chaos");
    let held = driver
        .create_partition(PartitionSpec {
            device_index: 0,
            isolation: Isolation::Soft,
            slicing: Slicing::Space,
            memory_quota_mib: 100,
            compute_share_pct: 10,
        })
        .unwrap();
    driver.sample().unwrap();
    assert!(matches!(
        driver.sample(),
        Err(DriverFailure::Plugin(CallError::Trap(_)))
    ));
    std::thread::sleep(Duration::from_millis(300));
    let result = driver.sample();
    match &result {
        Err(DriverFailure::Plugin(CallError::Start(why))) => {
            assert!(why.contains("cannot list partitions"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        driver.status().health,
        xpud::plugins::supervisor::Health::StartFailed { .. }
    ));
    assert_eq!(held.id, "c0");
}

#[test]
fn a_plugin_sleeping_in_a_host_call_is_stopped_at_its_deadline() {
    let (_plugins, registry) = chaos_beside_sim(|m| {
        let m = set(m, "config", "mode", "sleep".into());
        set(m, "limits", "call-timeout-ms", 300.into())
    });
    let chaos = driver(&registry, "chaos");
    let started = Instant::now();
    let result = chaos.sample();
    assert!(
        matches!(result, Err(DriverFailure::Plugin(CallError::Timeout(_)))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The plugin is not wedged: after the backoff a new incarnation answers devices().
    assert!(wait_for(Duration::from_secs(5), || chaos.devices().is_ok()));
    assert!(driver(&registry, "sim-xpu").sample().is_ok());
}

/// chaos, with a 300 ms deadline, whose devices() reads a FIFO under its grant:
/// the read blocks in the host until something writes to the FIFO (returned).
fn chaos_reading_a_fifo() -> (
    tempfile::TempDir,
    PluginDir,
    xpud::plugins::Registry,
    std::path::PathBuf,
) {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("sys")).unwrap();
    let fifo = root.path().join("sys/fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let plugins = PluginDir::new();
    plugins.install_as("chaos", "chaos", |mut m| {
        m = set(m, "config", "mode", "read".into());
        m = set(m, "config", "path", "/sys/fifo".into());
        m = set(m, "limits", "call-timeout-ms", 300.into());
        set(m, "grants", "read", toml::Value::Array(vec!["/sys".into()]))
    });
    let registry = registry(&plugins, root.path());
    registry.scan();
    (root, plugins, registry, fifo)
}

#[test]
fn callers_do_not_queue_forever_behind_a_call_blocked_in_the_host() {
    // A FIFO: opening it for reading blocks in the host until a writer comes.
    let (_root, _plugins, registry, fifo) = chaos_reading_a_fifo();
    let chaos = driver(&registry, "chaos");

    let blocked = {
        let chaos = chaos.clone();
        std::thread::spawn(move || chaos.devices())
    };
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let result = chaos.sample();
    assert!(
        matches!(result, Err(DriverFailure::Plugin(CallError::Busy(_)))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A writer unblocks the host call; the plugin answers again.
    drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
    let _ = blocked.join().unwrap();
    assert!(wait_for(Duration::from_secs(5), || chaos
        .partitions()
        .is_ok()));
}

#[test]
fn a_call_stuck_in_the_host_is_abandoned_and_the_instance_replaced() {
    // A FIFO nobody writes to: reading it blocks in the host, where no deadline
    // reaches. Past twice the deadline and a second, the instance is given up on.
    let (_root, _plugins, registry, fifo) = chaos_reading_a_fifo();
    let chaos = driver(&registry, "chaos");
    let stuck = {
        let chaos = chaos.clone();
        std::thread::spawn(move || chaos.devices())
    };
    std::thread::sleep(Duration::from_millis(1800));
    // The next caller takes the turn from the stuck call; after the backoff a fresh
    // instance answers (partitions do not read the FIFO).
    let started = Instant::now();
    assert!(wait_for(Duration::from_secs(5), || chaos
        .partitions()
        .is_ok()));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let status = chaos.status();
    assert_eq!(status.crashes, 1, "{status:?}");
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("abandoned"),
        "{status:?}"
    );
    // The stuck call comes back when a writer comes; its instance is dropped and
    // the fresh one goes on answering.
    drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
    let _ = stuck.join().unwrap();
    assert!(chaos.partitions().is_ok());
    assert_eq!(chaos.status().crashes, 1);
}

#[test]
fn a_panic_is_reported_with_its_message_however_much_was_written_before() {
    let (_plugins, registry) = chaos_beside_sim(|m| set(m, "config", "mode", "panic".into()));
    match driver(&registry, "chaos").sample() {
        Err(DriverFailure::Plugin(CallError::Trap(message))) => {
            assert!(message.contains("chaos panicked on purpose"), "{message}");
            assert!(message.contains("chatty line 1999"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_sandbox_has_no_network_no_environment_no_arguments() {
    // A listener on loopback that the plugin is told to reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let plugins = PluginDir::new();
    plugins.install_as("chaos", "chaos", |mut m| {
        m = set(m, "config", "mode", "probe".into());
        set(m, "config", "path", address.as_str().into())
    });
    let registry = registry(&plugins, &no_grants());
    registry.scan();
    let seen = driver(&registry, "chaos").devices().unwrap()[0]
        .accelerator_type
        .clone();
    assert!(
        std::env::vars().count() > 0,
        "the host itself has an environment"
    );
    assert!(seen.starts_with("env=0 args=0 connect=refused"), "{seen}");
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "a connection reached the host");
}

/// The conv_grid test model (three convolutions over a 512x288 RGB input), with
/// the process's inference backend.
fn conv_grid() -> (Arc<xpud::runtime::inference::Inference>, Vec<u8>) {
    assert!(
        onnxruntime().is_some(),
        "XPUD_ONNXRUNTIME is not set: scripts/test sets it"
    );
    let bytes = std::fs::read(repo().join("target/test-models/conv_grid.onnx"))
        .expect("scripts/test builds the models");
    (runtime().inference().clone(), bytes)
}

/// conv_grid's input: a 512x288 frame of stream `stream`'s pixels, as is.
fn conv_grid_input(
    stream: usize,
) -> (
    xpud::runtime::frames::Frame,
    xpud::runtime::bindings::wit_inference::Preprocess,
) {
    use xpud::runtime::bindings::wit_frames::PixelFormat;
    use xpud::runtime::bindings::wit_inference::{ChannelOrder, Layout, Preprocess};
    let pixels: Vec<u8> = (0..512 * 288 * 3)
        .map(|i| ((i / 3 * (stream + 1)) % 251) as u8)
        .collect();
    let frame =
        xpud::runtime::frames::Frame::new(512, 288, 0, PixelFormat::Rgb8, pixels.into()).unwrap();
    let pre = Preprocess {
        crop: None,
        width: 512,
        height: 288,
        layout: Layout::Nchw,
        channel_order: ChannelOrder::Rgb,
        mean: (0.0, 0.0, 0.0),
        std: (1.0, 1.0, 1.0),
    };
    (frame, pre)
}

/// A model placed on a device of its own (a MIG instance) runs in a worker process
/// started for that device, which CUDA lets see only it; its outputs are the same
/// as in xpud's own process. A worker that dies is started again after a backoff,
/// and its models are loaded into it again.
#[test]
fn a_model_on_a_device_of_its_own_runs_in_a_worker_process_that_comes_back() {
    use xpud::runtime::batching::Batching;
    use xpud::runtime::inference::{Device, PartitionDevice};

    let (inference, bytes) = conv_grid();
    let here = inference
        .load_native(
            "conv_grid.onnx",
            bytes.clone(),
            Batching {
                max: 1,
                on_cpu: false,
            },
        )
        .unwrap();
    // A name no other test uses: each partition has its own worker.
    let device = format!("MIG-test-{}", std::process::id());
    let partition = std::sync::Arc::new(PartitionDevice {
        driver: "nvidia".into(),
        partition: format!("mig-test-{}", std::process::id()),
        visible: device.clone(),
        card_ordinal: None,
        memory_quota_mib: Some(512),
    });
    let there = inference
        .load_native_on(
            Device::Partition(partition.clone()),
            "conv_grid.onnx",
            bytes,
            Duration::from_secs(60),
        )
        .unwrap();
    let pid = there.worker_pid().expect("the model runs in a worker");
    assert_ne!(pid, std::process::id());
    let environment = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environment
            .split(|b| *b == 0)
            .any(|var| var == format!("CUDA_VISIBLE_DEVICES={device}").as_bytes()),
        "the worker sees the device alone"
    );
    // Its sessions' device arenas are held to the partition's quota.
    let command = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(command.contains("--memory-quota-mib\x00512"), "{command:?}");
    // Should memory run out, the worker goes before xpud.
    let score = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    assert_eq!(score.trim(), "500");
    let (frame, pre) = conv_grid_input(0);
    let soon = || Instant::now() + Duration::from_secs(30);
    let expected = here.run(&frame, &pre, soon()).unwrap();
    let same = |outputs: Vec<xpud::runtime::bindings::wit_inference::Tensor>| {
        assert_eq!(outputs.len(), expected.len());
        for (got, want) in outputs.iter().zip(&expected) {
            assert_eq!((&got.name, &got.shape), (&want.name, &want.shape));
            let worst = got
                .data
                .iter()
                .zip(&want.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "{}: off by {worst}", got.name);
        }
    };
    same(there.run(&frame, &pre, soon()).unwrap());
    assert_eq!(there.runs(), (1, 1));

    // The worker dies: the run in flight (or the next) fails and says so, the
    // worker is started again after its backoff, with the model loaded again.
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let failed = there.run(&frame, &pre, soon()).unwrap_err();
    assert!(
        format!("{failed:?}").contains(&partition.to_string()),
        "{failed:?}"
    );
    let give_up = Instant::now() + Duration::from_secs(10);
    let outputs = loop {
        match there.run(&frame, &pre, soon()) {
            Ok(outputs) => break outputs,
            Err(e) if Instant::now() < give_up => {
                assert!(format!("{e:?}").contains("starts again"), "{e:?}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("the worker did not come back: {e:?}"),
        }
    };
    same(outputs);
    let again = there.worker_pid().unwrap();
    assert_ne!(again, pid, "a new worker process");
    // What the sampler tells the partition's driver.
    assert!(inference
        .worker_processes()
        .contains(&(partition.clone(), again)));
    // What /metrics tells of it.
    let figures = inference.worker_figures();
    let ours = figures.iter().find(|w| w.device == device).unwrap();
    assert_eq!(ours.partition, partition.to_string());
    assert!(ours.up);
    assert_eq!(ours.starts, 2);
    assert!(ours.failures >= 1, "{ours:?}");
}

/// Runs of one batchable model from several streams at once (batched when they
/// queue behind each other: how often depends on timing, which the unit tests of
/// `batching` pin down) each get the outputs of their own frame: the same as
/// unbatched.
#[test]
fn runs_from_several_streams_are_batched_and_each_gets_its_own_outputs() {
    use xpud::runtime::batching::Batching;

    // Three convolutions: a run long enough that the others queue behind it.
    let (inference, bytes) = conv_grid();
    let load = |max| {
        inference
            .load_native(
                "conv_grid.onnx",
                bytes.clone(),
                // Batched on the CPU too: this machine may have no accelerator.
                Batching { max, on_cpu: true },
            )
            .unwrap()
    };
    let (alone, batched) = (load(1), load(8));
    let pre = conv_grid_input(0).1;
    let frame = |stream: usize| conv_grid_input(stream).0;
    let soon = || Instant::now() + Duration::from_secs(30);
    let expected: Vec<Vec<f32>> = (0..4)
        .map(|stream| {
            alone.run(&frame(stream), &pre, soon()).unwrap()[0]
                .data
                .clone()
        })
        .collect();
    // The streams ask at the same instants: while one run holds the session, the
    // others queue behind it.
    let together = Arc::new(std::sync::Barrier::new(4));
    let streams: Vec<_> = expected
        .into_iter()
        .enumerate()
        .map(|(stream, expected)| {
            let (model, pre, together) = (batched.clone(), pre, together.clone());
            let frame = frame(stream);
            std::thread::spawn(move || {
                for _ in 0..8 {
                    together.wait();
                    let outputs = model.run(&frame, &pre, soon()).unwrap();
                    assert_eq!(outputs[0].shape, [1, 1, 36, 64]);
                    let same = outputs[0]
                        .data
                        .iter()
                        .zip(&expected)
                        .all(|(a, b)| (a - b).abs() <= 1e-4 * b.abs().max(1.0));
                    assert!(same, "stream {stream} did not get its own outputs");
                }
            })
        })
        .collect();
    for stream in streams {
        stream.join().unwrap();
    }
    let (runs, requests) = batched.runs();
    assert_eq!(requests, 32);
    assert!(runs <= 32);
}
