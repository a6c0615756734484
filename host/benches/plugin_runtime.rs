//! Plugin runtime costs, each beside a native Rust baseline doing the same work.
//!
//! `cargo bench --bench plugin_runtime` (after scripts/build-plugins). Prints a table:
//! - cold compile of sim-xpu.wasm, beside reading and hashing the file (the
//!   verification any loader does);
//! - cache-hit load of the compiled component, beside reading the cache file;
//! - instantiation from `InstancePre` (store and WASI context included), against
//!   its budget; instantiation plus `init`, beside building the same driver state
//!   natively (`SimXpu::from_config`, init's work);
//! - a metrics sample of 8 cards through the component export, beside the same
//!   sim-xpu code compiled natively; plus an empty call, to separate the fixed cost
//!   of crossing into the component from the work and the lifting of the result;
//! - a full sampling round of 8 cards (`sampler::sample_one` and the cache, as the
//!   server makes it) through the supervised plugin, beside the same sampler over
//!   the same driver code compiled natively: sim-xpu, and the nvidia driver over
//!   NVML, with its devices and sample calls apart (a round asks for the devices
//!   only when their version changed). NVML is the stand-in library of
//!   tests/fixtures/fake-nvml with 8 cards, built with `cc`: the cheapest NVML there
//!   can be, so the plugin's share of a round is at its largest. The last lines say
//!   how much slower each NVML call must be for the round to stay within 2x native,
//!   and, for scale, what the cheapest system call costs on the machine.
//!
//! `XPUD_BENCH_NVML=libnvidia-ml.so.1` measures the nvidia round over that library
//! instead (scripts/device-check-nvidia does, on a GPU machine), and
//! `XPUD_BENCH_PLUGINS` names the directory of the packed plugins.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use xpud::plugins::driver::Driver;
use xpud::plugins::supervisor::RestartPolicy;
use xpud::runtime::bindings::{Api, DriverPre};
use xpud::runtime::cache::CompileCache;
use xpud::runtime::inference::InferenceOptions;
use xpud::runtime::{Runtime, RuntimeOptions, Sandbox};
use xpud_sdk::driver::{Config, Driver as _};

/// sim-xpu's own code, compiled natively: the baseline does exactly the guest's work.
#[allow(dead_code)]
#[path = "../../plugins/sim-xpu/src/sim.rs"]
mod sim;

/// The nvidia driver's own code, compiled natively over the host's NVML calls.
#[allow(dead_code, unused_imports)]
#[path = "../../plugins/nvidia/src/bridge.rs"]
mod bridge;
#[allow(dead_code)]
#[path = "../../plugins/nvidia/src/driver.rs"]
mod driver;
#[allow(dead_code)]
#[path = "../../plugins/nvidia/src/mig.rs"]
mod mig;
#[allow(dead_code)]
#[path = "../../plugins/nvidia/src/models.rs"]
mod models;

/// The nvidia driver's NVML, natively: the host bridge's calls, their answers in
/// the guest's types (the copy a plugin's call makes too).
mod native_nvml {
    use std::sync::Arc;

    use xpud::runtime::bindings::v0_2::driver::xpu::plugin::nvml as host;
    use xpud::runtime::nvml as calls;
    use xpud_sdk::driver::nvml::*;

    use super::bridge::{samples, Sample, FIELDS};

    pub struct NativeNvml(pub Arc<nvml_wrapper::Nvml>);

    /// The library the bench loaded: what `init` (through `Default`) opens.
    pub static LOADED: std::sync::OnceLock<Arc<nvml_wrapper::Nvml>> = std::sync::OnceLock::new();

    impl Default for NativeNvml {
        fn default() -> Self {
            NativeNvml(LOADED.get().expect("the bench loads NVML first").clone())
        }
    }

    /// The guest's field, as the host names it.
    fn field(f: Field) -> host::Field {
        match f {
            Field::MemoryTotalBytes => host::Field::MemoryTotalBytes,
            Field::MemoryUsedBytes => host::Field::MemoryUsedBytes,
            Field::GpuUtilizationPct => host::Field::GpuUtilizationPct,
            Field::MemoryUtilizationPct => host::Field::MemoryUtilizationPct,
            Field::DecoderUtilizationPct => host::Field::DecoderUtilizationPct,
            Field::EncoderUtilizationPct => host::Field::EncoderUtilizationPct,
            Field::JpegUtilizationPct => host::Field::JpegUtilizationPct,
            Field::TemperatureCelsius => host::Field::TemperatureCelsius,
            Field::PowerDrawMilliwatts => host::Field::PowerDrawMilliwatts,
            Field::PowerLimitMilliwatts => host::Field::PowerLimitMilliwatts,
        }
    }

    fn error(e: host::NvmlError) -> NvmlError {
        match e {
            host::NvmlError::Unavailable(m) => NvmlError::Unavailable(m),
            host::NvmlError::NoPermission(m) => NvmlError::NoPermission(m),
            host::NvmlError::NotFound(m) => NvmlError::NotFound(m),
            host::NvmlError::NotSupported(m) => NvmlError::NotSupported(m),
            host::NvmlError::InsufficientResources(m) => NvmlError::InsufficientResources(m),
            host::NvmlError::GpuLost(m) => NvmlError::GpuLost(m),
            host::NvmlError::Failed(m) => NvmlError::Failed(m),
        }
    }

    fn instance(i: host::MigInstance) -> MigInstance {
        MigInstance {
            gpu_instance_id: i.gpu_instance_id,
            profile_id: i.profile_id,
            placement_start: i.placement_start,
            placement_size: i.placement_size,
            uuid: i.uuid,
            memory_total_bytes: i.memory_total_bytes,
            memory_used_bytes: i.memory_used_bytes,
        }
    }

    impl super::bridge::Nvml for NativeNvml {
        fn device_count(&self) -> Result<u32, NvmlError> {
            self.0
                .device_count()
                .map_err(|e| NvmlError::Failed(e.to_string()))
        }
        fn info(&self, device: u32) -> Result<DeviceInfo, NvmlError> {
            let i = calls::info(&self.0, device).map_err(error)?;
            Ok(DeviceInfo {
                name: i.name,
                uuid: i.uuid,
                serial: i.serial,
                pci_bus_id: i.pci_bus_id,
                pci_device_id: i.pci_device_id,
                pci_subsystem_id: i.pci_subsystem_id,
                mig_capable: i.mig_capable,
            })
        }
        fn sample(&self, devices: &[u32]) -> Result<Vec<Result<Sample, NvmlError>>, NvmlError> {
            let fields: Vec<host::Field> = FIELDS.iter().map(|&f| field(f)).collect();
            let answer = calls::samples(&self.0, devices, &fields).map_err(error)?;
            let readings = Readings {
                values: answer.values,
                failed: answer
                    .failed
                    .into_iter()
                    .map(|(position, e)| (position, error(e)))
                    .collect(),
            };
            Ok(samples(&readings, devices.len()))
        }
        fn processes(&self, device: u32) -> Result<Vec<ProcessUsage>, NvmlError> {
            let found = calls::processes(&self.0, device).map_err(error)?;
            Ok(found
                .into_iter()
                .map(|p| ProcessUsage {
                    pid: p.pid,
                    used_memory_bytes: p.used_memory_bytes,
                    sm_utilization_pct: p.sm_utilization_pct,
                    memory_utilization_pct: p.memory_utilization_pct,
                    decoder_utilization_pct: p.decoder_utilization_pct,
                    encoder_utilization_pct: p.encoder_utilization_pct,
                    gpu_instance_id: p.gpu_instance_id,
                    compute_instance_id: p.compute_instance_id,
                })
                .collect())
        }
        fn mig_mode(&self, device: u32) -> Result<MigState, NvmlError> {
            let m = calls::mig_mode(&self.0, device).map_err(error)?;
            Ok(MigState {
                current: m.current,
                pending: m.pending,
            })
        }
        fn mig_profiles(&self, device: u32) -> Result<Vec<MigProfile>, NvmlError> {
            let found = calls::mig_profiles(&self.0, device).map_err(error)?;
            Ok(found
                .into_iter()
                .map(|p| MigProfile {
                    id: p.id,
                    slice_count: p.slice_count,
                    memory_mib: p.memory_mib,
                    free_count: p.free_count,
                    max_count: p.max_count,
                })
                .collect())
        }
        fn mig_instances(&self, device: u32) -> Result<Vec<MigInstance>, NvmlError> {
            let found = calls::mig_instances(&self.0, device).map_err(error)?;
            Ok(found.into_iter().map(instance).collect())
        }
        fn create_mig_instance(
            &mut self,
            device: u32,
            profile: u32,
        ) -> Result<MigInstance, NvmlError> {
            calls::create_mig_instance(&self.0, device, profile)
                .map(instance)
                .map_err(error)
        }
        fn destroy_mig_instance(
            &mut self,
            device: u32,
            gpu_instance: u32,
        ) -> Result<(), NvmlError> {
            calls::destroy_mig_instance(&self.0, device, gpu_instance).map_err(error)
        }
    }
}

/// Median time per iteration over `rounds` rounds of `iters` iterations.
fn measure(rounds: usize, iters: u32, mut f: impl FnMut()) -> Duration {
    for _ in 0..iters.div_ceil(10) {
        f();
    }
    let mut samples: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            start.elapsed() / iters
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

fn show(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn row(
    what: &str,
    wasm: Duration,
    baseline: &str,
    native: Option<Duration>,
    target: Option<Duration>,
) {
    let native_text = native.map(show).unwrap_or_default();
    let ratio = native
        .map(|n| format!("{:.1}x", wasm.as_secs_f64() / n.as_secs_f64().max(1e-12)))
        .unwrap_or_default();
    let verdict = match target {
        Some(t) if wasm <= t => format!("≤ {} ok", show(t)),
        Some(t) => format!("> {} MISSED", show(t)),
        None => String::new(),
    };
    println!(
        "{what:<44} {:>10}   {baseline:<30} {native_text:>10} {ratio:>8}   {verdict}",
        show(wasm)
    );
}

fn main() -> anyhow::Result<()> {
    let (wasm_path, wasm) = packed_plugin("sim-xpu")?;
    let sha = hex::encode(Sha256::digest(&wasm));
    let cache_dir = tempfile::tempdir()?;
    let runtime = Runtime::new(RuntimeOptions {
        cache_dir: Some(cache_dir.path().to_path_buf()),
        max_instances: 1000,
        max_memory_bytes: 64 << 20,
        inference: InferenceOptions {
            library: None,
            providers: vec![],
            batching: Default::default(),
            worker: None,
        },
        limits: Default::default(),
        nvml_library: None,
    })?;
    let engine = runtime.engine().clone();
    println!(
        "sim-xpu.wasm: {} KiB, allocator: {:?}\n",
        wasm.len() / 1024,
        runtime.allocator()
    );
    println!(
        "{:<44} {:>10}   {:<30} {:>10} {:>8}",
        "", "wasm", "native baseline", "", "ratio"
    );

    // Loading.
    let cold = measure(5, 1, || {
        black_box(wasmtime::component::Component::from_binary(&engine, &wasm).unwrap());
    });
    let verify = measure(5, 20, || {
        let bytes = std::fs::read(&wasm_path).unwrap();
        black_box(Sha256::digest(&bytes));
    });
    row(
        "cold compile",
        cold,
        "read + sha256 the .wasm",
        Some(verify),
        None,
    );

    let cache = CompileCache::new(cache_dir.path(), &engine)?;
    cache.load(&engine, &wasm, &sha)?; // fills the cache
    let cached = measure(7, 20, || {
        black_box(cache.load(&engine, &wasm, &sha).unwrap());
    });
    let cwasm = std::fs::read_dir(cache_dir.path())?
        .filter_map(|e| e.ok())
        .find(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .map(|e| e.path())
        .expect("cache entry");
    let read_cwasm = measure(7, 20, || {
        black_box(std::fs::read(&cwasm).unwrap());
    });
    row(
        "cache-hit load (compiled component)",
        cached,
        "read the .cwasm file",
        Some(read_cwasm),
        Some(Duration::from_millis(5)),
    );

    // Instantiation.
    let (component, _) = runtime.load_component(&wasm, &sha)?;
    let pre = DriverPre::new(Api::V0_2, runtime.linker().instantiate_pre(&component)?)?;
    let sandbox = sandbox(&runtime, "sim-xpu", Default::default());
    let config = vec![("cards".to_string(), "8".to_string())];
    let native_config = Config::new(config.clone());
    let native_state = measure(7, 20_000, || {
        black_box(sim::SimXpu::from_config(&native_config).unwrap());
    });
    let new_store = measure(7, 20_000, || {
        black_box(sandbox.new_store(&engine).unwrap());
    });
    let instantiate = measure(7, 5_000, || {
        let mut store = sandbox.new_store(&engine).unwrap();
        store.set_epoch_deadline(1000);
        black_box(pre.instantiate(&mut store).unwrap());
    });
    row(
        "new store (WASI context, limits)",
        new_store,
        "",
        None,
        None,
    );
    // Instantiation alone has no native counterpart (a native driver has nothing
    // to instantiate): no baseline, only the budget. init's work is compared below.
    row(
        "instantiate from InstancePre (incl. store)",
        instantiate,
        "",
        None,
        Some(Duration::from_micros(10)),
    );
    let with_init = measure(7, 2_000, || {
        let mut store = sandbox.new_store(&engine).unwrap();
        store.set_epoch_deadline(1000);
        let b = pre.instantiate(&mut store).unwrap();
        black_box(b.init(&mut store, &config).unwrap().unwrap());
    });
    row(
        "instantiate + init(cards=8)",
        with_init,
        "SimXpu::from_config",
        Some(native_state),
        None,
    );

    // Calls.
    let mut store = sandbox.new_store(&engine)?;
    store.set_epoch_deadline(u64::MAX / 2);
    let bindings = pre.instantiate(&mut store)?;
    let driver_if = &bindings;
    driver_if.init(&mut store, &config)?.unwrap();
    let (mut native, _) = sim::SimXpu::from_config(&native_config).unwrap();
    let native_sample = measure(9, 50_000, || {
        black_box(native.sample().unwrap());
    });
    let native_empty = measure(9, 200_000, || {
        black_box(native.partitions().unwrap());
    });
    let empty = measure(9, 50_000, || {
        black_box(driver_if.partitions(&mut store).unwrap().unwrap());
    });
    let sample = measure(9, 50_000, || {
        black_box(driver_if.sample(&mut store).unwrap().unwrap());
    });
    row(
        "empty call (partitions -> [])",
        empty,
        "SimXpu::partitions",
        Some(native_empty),
        None,
    );
    row(
        "metrics sample, 8 cards (export call)",
        sample,
        "SimXpu::sample",
        Some(native_sample),
        Some(Duration::from_micros(5)),
    );

    // The same through the supervisor, as the sampler calls it.
    let supervised = Driver::new(
        "sim-xpu",
        engine.clone(),
        sandbox.clone(),
        pre.clone(),
        config.clone(),
        RestartPolicy::default(),
        Duration::from_secs(1),
    );
    supervised.start().map_err(|e| anyhow::anyhow!("{e}"))?;
    let via_supervisor = measure(9, 50_000, || {
        black_box(supervised.sample().unwrap());
    });
    row(
        "metrics sample, 8 cards (supervised call)",
        via_supervisor,
        "SimXpu::sample",
        Some(native_sample),
        Some(Duration::from_micros(5)),
    );

    let native_devices = measure(9, 50_000, || {
        black_box(native.devices().unwrap());
    });
    let devices_export = measure(9, 50_000, || {
        black_box(driver_if.devices(&mut store).unwrap().unwrap());
    });
    row(
        "devices, 8 cards (export call)",
        devices_export,
        "SimXpu::devices",
        Some(native_devices),
        None,
    );
    let devices = measure(9, 50_000, || {
        black_box(supervised.devices().unwrap());
    });
    row(
        "devices, 8 cards (supervised call)",
        devices,
        "SimXpu::devices",
        Some(native_devices),
        None,
    );
    println!();
    let native = native_driver::Native::new(native);
    let (round, native_round) = rounds(&supervised, &native, 20_000);
    row(
        "sampling round, 8 cards: sim-xpu",
        round,
        "sim-xpu natively",
        Some(native_round),
        Some(native_round * 2),
    );
    nvidia_round(&runtime)
}

/// A full sampling round as the sampler makes it (`sampler::sample_one`: sample,
/// devices and labels when they may have changed, then the cache), through the
/// supervised plugin and through the same driver code compiled natively:
/// (plugin, native) per round, each the median of 15 blocks of `iters` rounds.
/// The two sides' blocks alternate, so that a change in the machine's speed
/// while the bench runs (a 2-core VM's neighbours) weighs on both alike.
fn rounds<D: xpud_sdk::driver::Driver>(
    plugin: &Driver,
    native: &native_driver::Native<D>,
    iters: u32,
) -> (Duration, Duration) {
    let plugin_cache = xpud::sampler::SampleCache::new(Duration::from_secs(3600));
    let native_cache = xpud::sampler::SampleCache::new(Duration::from_secs(3600));
    let plugin_round = || {
        let snapshot = xpud::sampler::sample_one("bench", plugin, &plugin_cache).unwrap();
        plugin_cache.put("bench", black_box(snapshot));
    };
    let native_round = || {
        let snapshot = xpud::sampler::sample_one("bench", native, &native_cache).unwrap();
        native_cache.put("bench", black_box(snapshot));
    };
    let block = |round: &dyn Fn()| {
        let start = Instant::now();
        for _ in 0..iters {
            round();
        }
        start.elapsed() / iters
    };
    for _ in 0..iters.div_ceil(10) {
        plugin_round();
        native_round();
    }
    let (mut plugin_blocks, mut native_blocks): (Vec<Duration>, Vec<Duration>) = (0..15)
        .map(|_| (block(&plugin_round), block(&native_round)))
        .unzip();
    plugin_blocks.sort();
    native_blocks.sort();
    (plugin_blocks[7], native_blocks[7])
}

/// A driver compiled natively behind the sampler's interface, as a driver linked
/// into xpud would be: its answers are moved into the host's types (no copies),
/// and nothing checks them (a linked driver is trusted code).
mod native_driver {
    use std::cell::RefCell;
    use std::sync::Arc;

    use xpud::plugins::driver::DriverFailure;
    use xpud::plugins::driver::Reading;
    use xpud::runtime::bindings::driver_types as host;
    use xpud_sdk::driver as sdk;

    /// The devices of the last answer, and their version: what the plugin side's
    /// `Driver` keeps.
    type Kept = Option<(Option<u64>, Arc<[host::Device]>)>;

    pub struct Native<D> {
        driver: RefCell<D>,
        kept: RefCell<Kept>,
    }

    impl<D: sdk::Driver> Native<D> {
        pub fn new(driver: D) -> Native<D> {
            Native {
                driver: RefCell::new(driver),
                kept: RefCell::new(None),
            }
        }

        pub fn devices(&self) -> Result<Vec<host::Device>, DriverFailure> {
            let devices = self.driver.borrow_mut().devices().map_err(failure)?;
            Ok(devices
                .into_iter()
                .map(|d| host::Device {
                    id: d.id,
                    uuid: d.uuid,
                    index: d.index,
                    accelerator_type: d.accelerator_type,
                    memory_total_mib: d.memory_total_mib,
                    decoder_units: d.decoder_units,
                    encoder_units: d.encoder_units,
                    pci_bus_id: d.pci_bus_id,
                    health: health(d.health),
                })
                .collect())
        }
    }

    fn failure(e: sdk::DriverError) -> DriverFailure {
        DriverFailure::Driver(host::DriverError::DeviceFailure(format!("{e:?}")))
    }

    fn health(h: sdk::Health) -> host::Health {
        match h {
            sdk::Health::Healthy => host::Health::Healthy,
            sdk::Health::Degraded => host::Health::Degraded,
            sdk::Health::Unhealthy => host::Health::Unhealthy,
            sdk::Health::Unknown => host::Health::Unknown,
        }
    }

    impl<D: sdk::Driver> xpud::sampler::Sampled for Native<D> {
        /// As the plugin's supervisor does it: the sample, then the devices only
        /// when their version changed.
        fn sample(&self) -> Result<Reading, DriverFailure> {
            let (metrics, version) = {
                let mut driver = self.driver.borrow_mut();
                let metrics = driver.sample().map_err(failure)?;
                (metrics, driver.devices_version())
            };
            let kept = self.kept.borrow().clone();
            let devices = match kept {
                Some((kept, devices)) if version.is_some() && kept == version => devices,
                _ => {
                    let devices: Arc<[host::Device]> = Arc::from(self.devices()?);
                    *self.kept.borrow_mut() = Some((version, devices.clone()));
                    devices
                }
            };
            let metrics = host::Metrics {
                cards: metrics
                    .cards
                    .into_iter()
                    .map(|c| host::CardMetrics {
                        device_index: c.device_index,
                        ai_utilization_pct: c.ai_utilization_pct,
                        memory_used_mib: c.memory_used_mib,
                        memory_total_mib: c.memory_total_mib,
                        video_decode_utilization_pct: c.video_decode_utilization_pct,
                        picture_decode_utilization_pct: c.picture_decode_utilization_pct,
                        temperature_celsius: c.temperature_celsius,
                        power_watts: c.power_watts,
                    })
                    .collect(),
                instances: metrics
                    .instances
                    .into_iter()
                    .map(|i| host::InstanceMetrics {
                        partition_id: i.partition_id,
                        device_index: i.device_index,
                        ai_utilization_pct: i.ai_utilization_pct,
                        memory_used_mib: i.memory_used_mib,
                        memory_quota_mib: i.memory_quota_mib,
                    })
                    .collect(),
            };
            Ok(Reading { devices, metrics })
        }

        fn labels(&self) -> Result<Vec<host::Label>, DriverFailure> {
            let labels = self.driver.borrow_mut().labels().map_err(failure)?;
            Ok(labels
                .into_iter()
                .map(|l| host::Label {
                    key: l.key,
                    value: l.value,
                })
                .collect())
        }

        fn simulated(&self) -> bool {
            false
        }
    }
}

/// A plugin's sandbox on `runtime`, as the registry would make it, with the NVML
/// grant `nvml`.
fn sandbox(runtime: &Runtime, plugin: &str, nvml: xpud::runtime::nvml::NvmlGrant) -> Sandbox {
    Sandbox {
        plugin: plugin.into(),
        preopens: vec![],
        memory_limit_bytes: 32 << 20,
        assets: None,
        inference: runtime.inference().clone(),
        limits: std::sync::Arc::new(runtime.options.limits.clone()),
        log: std::sync::Arc::new(xpud::runtime::log::LogBudget::new(
            runtime.options.limits.log_lines_per_s,
        )),
        calls: Default::default(),
        launch: Default::default(),
        providers: Default::default(),
        nvml: xpud::runtime::nvml::NvmlAccess {
            bridge: runtime.nvml().clone(),
            grant: nvml,
        },
    }
}

/// A packed plugin from target/plugins, or from $XPUD_BENCH_PLUGINS (the device
/// script runs this binary away from the build tree).
fn packed_plugin(name: &str) -> anyhow::Result<(PathBuf, Vec<u8>)> {
    let dir = std::env::var_os("XPUD_BENCH_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins"));
    let path = dir.join(format!("{name}.wasm"));
    let wasm = std::fs::read(&path).map_err(|e| {
        anyhow::anyhow!("{}: {e} (run scripts/build-plugins first)", path.display())
    })?;
    Ok((path, wasm))
}

/// The stand-in NVML library, built with `cc` into target/fake-nvml.
fn fake_nvml() -> anyhow::Result<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let source = repo.join("tests/fixtures/fake-nvml/fake_nvml.c");
    let dir = repo.join("target/fake-nvml");
    std::fs::create_dir_all(&dir)?;
    let library = dir.join("libnvidia-ml-bench.so.1");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&library)
        .arg(&source)
        .status()
        .map_err(|e| anyhow::anyhow!("cc: {e} (a C compiler builds the stand-in NVML)"))?;
    anyhow::ensure!(status.success(), "cc failed on {}", source.display());
    Ok(library)
}

/// The nvidia driver's sampling round through the plugin and natively: over the
/// stand-in NVML with 8 cards, or over the library $XPUD_BENCH_NVML names (the
/// device script's real card).
fn nvidia_round(sim_runtime: &Runtime) -> anyhow::Result<()> {
    let real = std::env::var_os("XPUD_BENCH_NVML").map(PathBuf::from);
    let library = match &real {
        Some(library) => library.clone(),
        None => {
            // Read by the stand-in at nvmlInit.
            std::env::set_var("FAKE_NVML_CARDS", "8");
            fake_nvml()?
        }
    };
    let runtime = Runtime::new(RuntimeOptions {
        cache_dir: None,
        max_instances: 16,
        max_memory_bytes: 64 << 20,
        inference: InferenceOptions {
            library: None,
            providers: vec![],
            batching: Default::default(),
            worker: None,
        },
        limits: sim_runtime.options.limits.clone(),
        nvml_library: Some(library.clone()),
    })?;
    let (_, wasm) = packed_plugin("nvidia")?;
    let (component, _) = runtime.load_component(&wasm, &hex::encode(Sha256::digest(&wasm)))?;
    let pre = DriverPre::new(Api::V0_2, runtime.linker().instantiate_pre(&component)?)?;
    let sandbox = sandbox(&runtime, "nvidia", xpud::runtime::nvml::NvmlGrant::Read);
    let plugin = Driver::new(
        "nvidia",
        runtime.engine().clone(),
        sandbox,
        pre,
        vec![],
        RestartPolicy::default(),
        Duration::from_secs(3),
    );
    plugin.start().map_err(|e| anyhow::anyhow!("{e}"))?;
    let cards = plugin.devices()?.len();
    anyhow::ensure!(cards > 0, "no card over {}", library.display());
    let nvml = runtime.nvml().get().map_err(|e| anyhow::anyhow!("{e}"))?;
    let _ = native_nvml::LOADED.set(nvml.clone());
    let (native, _) = driver::Nvidia::<native_nvml::NativeNvml>::init(Config::new(vec![]))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let native = native_driver::Native::new(native);
    let over = match &real {
        Some(_) => "NVML",
        None => "stand-in NVML",
    };
    // A real library's calls may take milliseconds: as many rounds as fit in
    // about a second per figure, whatever the library.
    let iters = {
        let started = Instant::now();
        let cache = xpud::sampler::SampleCache::new(Duration::from_secs(3600));
        let snapshot = xpud::sampler::sample_one("probe", plugin.as_ref(), &cache)?;
        cache.put("probe", snapshot);
        let per_round = started.elapsed().as_secs_f64().max(1e-7);
        ((0.1 / per_round) as u32).clamp(3, 5_000)
    };
    // Each call alone, through the plugin and natively. A round asks for the
    // devices only when they changed.
    use xpud::sampler::Sampled;
    row(
        &format!("nvidia devices, {cards} cards (supervised)"),
        measure(9, iters, || drop(black_box(plugin.devices().unwrap()))),
        "nvidia driver natively",
        Some(measure(9, iters, || {
            drop(black_box(native.devices().unwrap()))
        })),
        None,
    );
    row(
        &format!("nvidia sample, {cards} cards (supervised)"),
        measure(9, iters, || {
            drop(black_box(Sampled::sample(plugin.as_ref()).unwrap()))
        }),
        "nvidia driver natively",
        Some(measure(9, iters, || {
            drop(black_box(native.sample().unwrap()))
        })),
        None,
    );
    let (round, native_round) = rounds(&plugin, &native, iters);
    row(
        &format!("sampling round, {cards} cards: nvidia/{over}"),
        round,
        "nvidia driver natively",
        Some(native_round),
        Some(native_round * 2),
    );
    if real.is_none() {
        break_even(&library, &plugin, round, native_round)?;
    }
    Ok(())
}

/// What the stand-in's ratio means for a real card. Both sides make the same NVML
/// calls, so a slower library adds the same time to each, and the plugin stays
/// within 2x native once each call takes (plugin - 2 x native) / calls longer
/// than the stand-in's, which answers from memory.
fn break_even(
    library: &Path,
    plugin: &Driver,
    round: Duration,
    native_round: Duration,
) -> anyhow::Result<()> {
    // SAFETY: the stand-in built above; the symbol is `unsigned long long (void)`.
    let calls = unsafe {
        let lib = libloading::Library::new(library)?;
        let count: libloading::Symbol<unsafe extern "C" fn() -> u64> =
            lib.get(b"fake_nvml_calls")?;
        let cache = xpud::sampler::SampleCache::new(Duration::from_secs(3600));
        let rounds = 1_000;
        let before = count();
        for _ in 0..rounds {
            let snapshot = xpud::sampler::sample_one("bench", plugin, &cache).unwrap();
            cache.put("bench", snapshot);
        }
        (count() - before) as f64 / f64::from(rounds)
    };
    let gap = round.as_secs_f64() - 2.0 * native_round.as_secs_f64();
    println!(
        "  {calls:.0} NVML calls per round: within 2x native once each takes {} more than the stand-in's",
        if gap <= 0.0 {
            "no time".to_string()
        } else {
            show(Duration::from_secs_f64(gap / calls))
        }
    );
    // For scale: the stand-in answers from memory, a real NVML reading the GPU goes
    // through the kernel driver, and no call into the kernel is cheaper than this
    // one (glibc's getppid is a bare system call).
    let syscall = measure(9, 100_000, || {
        black_box(std::os::unix::process::parent_id());
    });
    println!(
        "  for scale, the cheapest system call here (getppid) takes {}",
        show(syscall)
    );
    Ok(())
}
