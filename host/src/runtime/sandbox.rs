//! The sandbox of one plugin instance: its `Store` data, built from the plugin's
//! grants and limits.
//!
//! What a plugin gets: WASI clocks and random, read-only preopens of the paths its
//! manifest requests and the operator allows, a memory cap, and its own stderr
//! captured in memory (shown in the log when it crashes), and the environment and
//! arguments of what it runs for (a service's F.2 `envs`, a pod's B.2
//! `command`/`args`: [`Launch`]). What it does not get: the network (sockets denied,
//! no name lookup), anything of the host's environment, stdin, or any other path.

use super::nvml::NvmlAccess;
use std::path::PathBuf;
use std::sync::Arc;

use super::clocks::SandboxClock;
use super::inference::{Device, Inference};
use super::limits::PluginLimits;
use super::log::LogBudget;
use super::stderr::StderrTail;
use super::Runtime;
use anyhow::Context;
use std::time::{Duration, Instant};
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// How much of a plugin's stderr is kept (a panic message fits easily).
const STDERR_CAPACITY: usize = 16 * 1024;

/// Bytes the host may allocate for the arguments and results one guest call hands
/// it (wasmtime's "hostcall fuel"). Strings and lists are copied out of guest
/// memory, and a hostile guest can point 100,000 list entries at the same megabyte:
/// its memory cap does not bound the copies, this does. Set here, not left to
/// wasmtime's default (128 MiB), so that an upgrade cannot loosen it; the largest
/// legitimate transfer (a driver's whole answer) is far below it.
const HOSTCALL_FUEL: usize = 16 << 20;

/// Everything needed to build a store for one plugin, computed once at load.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub plugin: Arc<str>,
    /// (host path, guest path) pairs, mounted read-only.
    pub preopens: Vec<(PathBuf, String)>,
    pub memory_limit_bytes: usize,
    /// The plugin's package directory, where `inference` finds model files.
    pub assets: Option<Arc<cap_std::fs::Dir>>,
    pub inference: Arc<Inference>,
    pub limits: Arc<PluginLimits>,
    /// The plugin's log rate, shared by all its instances.
    pub log: Arc<LogBudget>,
    /// The plugin's call figures, shared by all its instances.
    pub calls: Arc<crate::plugins::calls::CallStats>,
    /// The environment and arguments instances start with.
    pub launch: Launch,
    /// The execution providers the models of these instances run on (what the
    /// service and task details show), shared by the instances of one worker.
    pub providers: Arc<std::sync::Mutex<std::collections::BTreeSet<&'static str>>>,
    /// The NVML bridge, and what the manifest's grant lets the plugin do with it.
    pub nvml: NvmlAccess,
}

/// What one instance is started with beyond its plugin's grants: exactly these
/// environment variables and arguments, nothing of the host's, and the device
/// its models run on (its replica's card).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Launch {
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    pub device: Device,
}

/// The data of a plugin's `Store`.
pub struct PluginState {
    pub(crate) plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    stderr: StderrTail,
    pub(crate) assets: Option<Arc<cap_std::fs::Dir>>,
    pub(crate) inference: Arc<Inference>,
    pub(crate) limits: Arc<PluginLimits>,
    pub(crate) log: Arc<LogBudget>,
    pub(crate) providers: Arc<std::sync::Mutex<std::collections::BTreeSet<&'static str>>>,
    /// Where this instance's models run.
    pub(crate) device: Device,
    /// Models this instance holds loaded (bounded by the limits).
    pub(crate) models_loaded: u32,
    pub(crate) clock: SandboxClock,
    /// When the call in progress must end; sleeps are capped at it.
    pub(crate) call_deadline: Option<Instant>,
    pub(crate) nvml: NvmlAccess,
}

impl PluginState {
    /// Arms the deadline of the next call, `timeout` from `from` (when its turn
    /// began): epochs for wasm code, this for sleeps.
    pub fn set_deadline(store: &mut Store<PluginState>, from: Instant, timeout: Duration) {
        store.set_epoch_deadline(Runtime::deadline_ticks(timeout));
        store.data_mut().call_deadline = Some(from + timeout);
    }

    pub(crate) fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    /// The last lines the plugin wrote to stderr (a Rust panic message lands here).
    pub fn stderr_tail(&self) -> String {
        self.stderr.last_lines(5)
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory and remembers whether the cap was hit, so that the trap that
/// follows (a Rust guest aborts when allocation fails) is reported as out-of-memory.
pub struct MemoryLimiter {
    limit: usize,
    pub(crate) peak: usize,
    pub(crate) denied: bool,
}

impl MemoryLimiter {
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// Table growth cap: generous for function tables, bounded against abuse.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.denied = true;
            return Ok(false);
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

impl Sandbox {
    /// A fresh store for one instance of the plugin.
    pub fn new_store(&self, engine: &wasmtime::Engine) -> anyhow::Result<Store<PluginState>> {
        let stderr = StderrTail::new(STDERR_CAPACITY);
        let clock = SandboxClock {
            origin: Instant::now(),
        };
        let mut wasi = WasiCtxBuilder::new();
        wasi.stderr(stderr.clone())
            .monotonic_clock(clock)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            // Calls run on blocking threads already: file reads need no hop to tokio.
            .allow_blocking_current_thread(true)
            .envs(&self.launch.env)
            .args(&self.launch.args);
        for (host, guest) in &self.preopens {
            wasi.preopened_dir(host, guest, FsPerms::ReadOnly)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("grant {guest} (host path {})", host.display()))?;
        }
        let state = PluginState {
            plugin: self.plugin.clone(),
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                limit: self.memory_limit_bytes,
                peak: 0,
                denied: false,
            },
            stderr,
            assets: self.assets.clone(),
            inference: self.inference.clone(),
            limits: self.limits.clone(),
            log: self.log.clone(),
            providers: self.providers.clone(),
            device: self.launch.device.clone(),
            models_loaded: 0,
            clock,
            call_deadline: None,
            nvml: self.nvml.clone(),
        };
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_hostcall_fuel(HOSTCALL_FUEL);
        Ok(store)
    }
}
