//! The one process-wide wasmtime `Engine` and the linker every plugin links against.
//!
//! - Pooling allocator when the machine gives it the address space (it reserves all
//!   instance slots up front), on-demand allocation otherwise; the choice is logged.
//! - Epoch interruption with a ticker thread: every guest call gets a deadline in
//!   ticks, and a guest that runs past it traps instead of holding a thread forever.
//!   (Epochs stop wasm code, not a host function the guest is inside: host functions
//!   here are bounded themselves.)
//! - Synchronous calls: no async fibers on the call path. Callers run guest calls on
//!   blocking threads.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings;
use super::cache::{CompileCache, LoadReport, LoadedFrom};
use super::inference::{Inference, InferenceOptions};
use super::nvml::NvmlBridge;
use super::{PluginLimits, PluginState};

/// Bytes of each pooled memory, and of each table (2,048 function references,
/// more than a plugin has), kept resident (reset, not given back) when an
/// instance ends. The pool holds 2 memories and 4 tables per instance, so this
/// is at most 48 MiB at the default 256 instances. It took instantiating sim-xpu
/// from about 13 to 7 µs (BENCHMARKS.md).
const MEMORY_KEEP_RESIDENT: usize = 64 << 10;
const TABLE_KEEP_RESIDENT: usize = 16 << 10;

/// Epoch granularity: deadlines are rounded up to this.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// Where compiled components are cached; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// Plugin instances that can be alive at once (sizes the pooling allocator).
    pub max_instances: u32,
    /// Ceiling on any one plugin's linear memory, whatever its manifest asks.
    pub max_memory_bytes: usize,
    pub inference: InferenceOptions,
    /// The NVML library to load instead of `libnvidia-ml.so.1`.
    pub nvml_library: Option<PathBuf>,
    /// What a plugin may make the host do on its behalf.
    pub limits: PluginLimits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Allocator {
    Pooling,
    OnDemand,
}

pub struct Runtime {
    engine: Engine,
    linker: Linker<PluginState>,
    cache: Option<CompileCache>,
    allocator: Allocator,
    inference: Arc<Inference>,
    nvml: Arc<NvmlBridge>,
    pub options: RuntimeOptions,
}

fn engine_config(options: &RuntimeOptions, pooling: bool) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    if pooling {
        let n = options.max_instances.max(1);
        let mut pool = PoolingAllocationConfig::default();
        // A Rust wasip2 component holds a handful of core instances (the program, the
        // WASI adapter, shims), two memories at most and a few tables.
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(8))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(4))
            .total_stacks(n)
            .max_memory_size(options.max_memory_bytes)
            // A freed slot's pages go back to the kernel at once. Batching would save
            // a madvise per instance, but a plugin that crashed at a 1 GiB cap would
            // then leave its gigabyte resident until 31 more slots were freed.
            .decommit_batch_size(1)
            // Except a small bounded part of each slot (the *_KEEP_RESIDENT bytes),
            // reset in place instead: on Linux 6.7+ only its dirty pages, found with
            // PAGEMAP_SCAN. For a plugin whose working set fits, that spares the
            // madvise, its TLB shootdown and the next instance's page faults.
            .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
            .table_keep_resident(TABLE_KEEP_RESIDENT)
            .pagemap_scan(wasmtime::Enabled::Auto);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

impl Runtime {
    pub fn new(options: RuntimeOptions) -> anyhow::Result<Arc<Runtime>> {
        let (engine, allocator) = match Engine::new(&engine_config(&options, true)) {
            Ok(engine) => (engine, Allocator::Pooling),
            Err(e) => {
                tracing::warn!(
                    "pooling allocator unavailable ({e:#}); falling back to on-demand \
                     instance allocation: instantiation will be slower"
                );
                let engine = Engine::new(&engine_config(&options, false))
                    .map_err(anyhow::Error::from)
                    .context("create wasmtime engine")?;
                (engine, Allocator::OnDemand)
            }
        };
        tracing::info!(
            allocator = ?allocator,
            max_instances = options.max_instances,
            "wasm engine ready"
        );
        spawn_epoch_ticker(&engine).context("start the epoch ticker thread")?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        super::clocks::add_to_linker(&mut linker)?;
        bindings::driver::xpu::plugin::log::add_to_linker::<_, HasSelf<PluginState>>(
            &mut linker,
            |s| s,
        )?;
        bindings::wit_frames::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |s| s)?;
        bindings::wit_inference::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |s| s)?;
        // xpu:plugin@0.2.0: the same host functions under the new version's names,
        // and the NVML bridge.
        {
            use bindings::v0_2::{algorithm, driver};
            driver::xpu::plugin::log::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |s| s)?;
            driver::xpu::plugin::nvml::add_to_linker::<_, HasSelf<PluginState>>(
                &mut linker,
                |s| s,
            )?;
            algorithm::xpu::plugin::frames::add_to_linker::<_, HasSelf<PluginState>>(
                &mut linker,
                |s| s,
            )?;
            algorithm::xpu::plugin::inference::add_to_linker::<_, HasSelf<PluginState>>(
                &mut linker,
                |s| s,
            )?;
        }

        let cache = match &options.cache_dir {
            Some(dir) => Some(CompileCache::new(dir, &engine)?),
            None => None,
        };
        let inference = Inference::get_or_init(&options.inference);
        let nvml = NvmlBridge::new(options.nvml_library.clone());
        Ok(Arc::new(Runtime {
            engine,
            linker,
            cache,
            allocator,
            inference,
            nvml,
            options,
        }))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn linker(&self) -> &Linker<PluginState> {
        &self.linker
    }

    pub fn inference(&self) -> &Arc<Inference> {
        &self.inference
    }

    pub fn nvml(&self) -> &Arc<NvmlBridge> {
        &self.nvml
    }

    pub fn allocator(&self) -> Allocator {
        self.allocator
    }

    /// Loads a component whose bytes hash to `sha256`, from the compile cache when
    /// it can.
    pub fn load_component(
        &self,
        wasm: &[u8],
        sha256: &str,
    ) -> anyhow::Result<(Component, LoadReport)> {
        match &self.cache {
            Some(cache) => cache.load(&self.engine, wasm, sha256),
            None => {
                let started = std::time::Instant::now();
                let component = Component::from_binary(&self.engine, wasm)?;
                let report = LoadReport {
                    from: LoadedFrom::Compiled,
                    took: started.elapsed(),
                };
                Ok((component, report))
            }
        }
    }

    /// Epoch ticks that cover `timeout` (at least one).
    pub fn deadline_ticks(timeout: Duration) -> u64 {
        let tick = EPOCH_TICK.as_micros();
        (timeout.as_micros().div_ceil(tick) as u64).max(1)
    }
}

/// Advances the engine's epoch every `EPOCH_TICK` for as long as the engine lives.
fn spawn_epoch_ticker(engine: &Engine) -> std::io::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => break,
            }
        })
        .map(drop)
}
