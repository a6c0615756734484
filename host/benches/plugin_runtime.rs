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
//!   of crossing into the component from the work and the lifting of the result.

use std::hint::black_box;
use std::path::Path;
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
    let wasm_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins/sim-xpu.wasm");
    let wasm = std::fs::read(&wasm_path).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (run scripts/build-plugins first)",
            wasm_path.display()
        )
    })?;
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
    let sandbox = Sandbox {
        plugin: "sim-xpu".into(),
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
            grant: Default::default(),
        },
    };
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
    Ok(())
}
