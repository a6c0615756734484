//! The plugin directory and the plugins loaded from it.
//!
//! A scan compares each `NAME.toml`/`NAME.wasm` pair with what is loaded (by size
//! and modification time, then by content hash) and loads, replaces or removes
//! plugins accordingly. A plugin that fails verification is refused with a log line
//! naming the reason; if an older version of it is loaded, that version keeps
//! serving. One plugin's failure never stops the scan of the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use super::algorithm::AlgorithmPlugin;
use super::calls::CallStats;
use super::driver::Driver;
use super::inspect::{inspect, Inspection};
use super::manifest::MAX_MANIFEST_BYTES;
use super::supervisor::{RestartPolicy, Status};
use super::{Kind, Manifest};
use crate::files::read_regular_file;
use crate::runtime::bindings::{AlgorithmPre, DriverPre};
use crate::runtime::cache::LoadedFrom;
use crate::runtime::log::LogBudget;
use crate::runtime::nvml::NvmlAccess;
use crate::runtime::{Runtime, Sandbox};

/// Largest plugin accepted: far above any real plugin, far below hurting the host.
pub const MAX_WASM_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct RegistryOptions {
    pub plugin_dir: PathBuf,
    /// Host directory that grants are resolved under: `/` in production; tests point
    /// it at a fixture tree laid out like `/sys` and `/proc`.
    pub grant_root: PathBuf,
    /// Path prefixes the operator allows plugins to be granted.
    pub allowed_grants: Vec<String>,
    pub restart: RestartPolicy,
    /// Whether drivers of simulated devices load.
    pub simulated_devices: bool,
}

/// Identity of the files a plugin was loaded from, cheap to compare.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    manifest: (u64, Option<SystemTime>),
    wasm: (u64, Option<SystemTime>),
}

/// From the files' own metadata: links are not followed (and are refused at load).
fn fingerprint(manifest: &Path, wasm: &Path) -> Option<Fingerprint> {
    let stat = |p: &Path| {
        std::fs::symlink_metadata(p)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    Some(Fingerprint {
        manifest: stat(manifest)?,
        wasm: stat(wasm).unwrap_or((0, None)),
    })
}

pub enum Handle {
    Driver(Arc<Driver>),
    Algorithm(Box<AlgorithmPlugin>),
}

/// A verified, compiled plugin.
pub struct Plugin {
    pub manifest: Manifest,
    pub inspection: Inspection,
    pub loaded_from: LoadedFrom,
    pub load_time: Duration,
    pub loaded_at: SystemTime,
    /// Grants in effect: the paths mounted (those present on this host), and the
    /// native bridges (`nvml`, `nvml:manage`).
    pub mounted: Vec<String>,
    pub handle: Handle,
    /// The plugin's log rate (lines dropped past it).
    pub log: Arc<LogBudget>,
    /// What its calls did, over all its instances.
    pub calls: Arc<CallStats>,
}

impl Plugin {
    pub fn driver(&self) -> Option<&Arc<Driver>> {
        match &self.handle {
            Handle::Driver(d) => Some(d),
            Handle::Algorithm(_) => None,
        }
    }

    pub fn algorithm(&self) -> Option<&AlgorithmPlugin> {
        match &self.handle {
            Handle::Algorithm(a) => Some(a.as_ref()),
            Handle::Driver(_) => None,
        }
    }

    /// The supervisor's view; algorithm templates have none (their workers do).
    pub fn status(&self) -> Option<Status> {
        self.driver().map(|d| d.status())
    }
}

struct Refusal {
    reason: String,
    at: SystemTime,
}

#[derive(Default)]
struct Entry {
    loaded: Option<Arc<Plugin>>,
    /// Content id of the loaded files.
    content: Option<String>,
    refused: Option<Refusal>,
    /// The files as they were when last looked at (loaded or refused).
    seen: Option<Fingerprint>,
}

/// One row of `GET /plugins`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct PluginView {
    pub name: String,
    /// loaded | refused
    pub state: &'static str,
    pub kind: Option<Kind>,
    pub version: Option<String>,
    pub api: Option<String>,
    pub sha256: Option<String>,
    pub loaded_from: Option<LoadedFrom>,
    pub load_ms: Option<f64>,
    pub loaded_at_ms: Option<u64>,
    pub grants: Vec<String>,
    pub exports: Vec<String>,
    /// The supervisor's state (drivers).
    pub instance: Option<Status>,
    /// Drivers: their devices are simulated (loaded because the operator asked).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub simulated: bool,
    /// Log lines dropped past `[plugin-limits] log-lines-per-s`.
    pub log_lines_dropped: u64,
    /// Why the driver's last answer was refused (degraded), until a good one comes.
    pub answer_refused: Option<String>,
    /// Driver answers refused since the plugin was loaded.
    pub answers_refused: u64,
    /// Why the current files were refused (an older version may still be loaded).
    pub refused: Option<String>,
    pub refused_at_ms: Option<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanReport {
    pub loaded: Vec<String>,
    pub replaced: Vec<String>,
    pub removed: Vec<String>,
    pub refused: Vec<String>,
}

pub struct Registry {
    runtime: Arc<Runtime>,
    options: RegistryOptions,
    entries: RwLock<BTreeMap<String, Entry>>,
}

impl Registry {
    pub fn new(runtime: Arc<Runtime>, options: RegistryOptions) -> anyhow::Result<Registry> {
        std::fs::create_dir_all(&options.plugin_dir)
            .with_context(|| format!("create plugin directory {}", options.plugin_dir.display()))?;
        Ok(Registry {
            runtime,
            options,
            entries: RwLock::new(BTreeMap::new()),
        })
    }

    pub fn plugin_dir(&self) -> &Path {
        &self.options.plugin_dir
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn get(&self, name: &str) -> Option<Arc<Plugin>> {
        self.read().get(name).and_then(|e| e.loaded.clone())
    }

    /// Every loaded plugin.
    pub fn loaded(&self) -> Vec<Arc<Plugin>> {
        self.read()
            .values()
            .filter_map(|e| e.loaded.clone())
            .collect()
    }

    pub fn drivers(&self) -> Vec<(String, Arc<Driver>)> {
        self.loaded()
            .iter()
            .filter_map(|p| p.driver().map(|d| (p.manifest.name.clone(), d.clone())))
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        crate::sync::read(&self.entries)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        crate::sync::write(&self.entries)
    }

    pub fn views(&self) -> Vec<PluginView> {
        self.read()
            .iter()
            .map(|(name, entry)| {
                let p = entry.loaded.as_deref();
                PluginView {
                    name: name.clone(),
                    state: if p.is_some() { "loaded" } else { "refused" },
                    kind: p.map(|p| p.manifest.kind),
                    version: p.map(|p| p.manifest.version.to_string()),
                    api: p.map(|p| p.inspection.api.to_string()),
                    sha256: p.map(|p| p.manifest.sha256.clone()),
                    loaded_from: p.map(|p| p.loaded_from),
                    load_ms: p.map(|p| p.load_time.as_secs_f64() * 1000.0),
                    loaded_at_ms: p.map(|p| unix_ms(p.loaded_at)),
                    grants: p.map(|p| p.mounted.clone()).unwrap_or_default(),
                    exports: p.map(|p| p.inspection.exports.clone()).unwrap_or_default(),
                    instance: p.and_then(|p| p.status()),
                    simulated: p
                        .and_then(|p| p.driver())
                        .and_then(|d| d.info())
                        .is_some_and(|i| i.simulated),
                    log_lines_dropped: p.map_or(0, |p| p.log.dropped()),
                    answer_refused: p.and_then(|p| p.driver()).and_then(|d| d.violation()),
                    answers_refused: p
                        .and_then(|p| p.driver())
                        .map_or(0, |d| d.answers_refused()),
                    refused: entry.refused.as_ref().map(|r| r.reason.clone()),
                    refused_at_ms: entry.refused.as_ref().map(|r| unix_ms(r.at)),
                }
            })
            .collect()
    }

    /// Brings the loaded set in line with the directory. Blocking (compiles).
    pub fn scan(&self) -> ScanReport {
        let mut report = ScanReport::default();
        let names = match self.manifest_names() {
            Ok(names) => names,
            Err(e) => {
                tracing::error!(dir = %self.options.plugin_dir.display(), "cannot read plugin directory: {e:#}");
                return report;
            }
        };
        for name in &names {
            let manifest_path = self.options.plugin_dir.join(format!("{name}.toml"));
            let wasm_path = self.options.plugin_dir.join(format!("{name}.wasm"));
            let seen = fingerprint(&manifest_path, &wasm_path);
            let mut content = None;
            {
                let mut entries = self.write();
                if let Some(entry) = entries.get_mut(name) {
                    if entry.seen.is_some() && entry.seen == seen {
                        continue;
                    }
                    // Hashed only when the files changed, and only if they load.
                    content = content_id(&manifest_path, &wasm_path);
                    if entry.loaded.is_some() && content.is_some() && entry.content == content {
                        // Touched, not changed: keep the running instance.
                        entry.seen = seen;
                        entry.refused = None;
                        continue;
                    }
                }
            }
            let result = self.load(&self.options.plugin_dir, name);
            let mut entries = self.write();
            let entry = entries.entry(name.clone()).or_default();
            entry.seen = seen;
            match result {
                Ok(plugin) => {
                    let replaced = entry.loaded.is_some();
                    tracing::info!(
                        plugin = %name,
                        version = %plugin.manifest.version,
                        kind = ?plugin.manifest.kind,
                        loaded_from = ?plugin.loaded_from,
                        load_ms = plugin.load_time.as_secs_f64() * 1000.0,
                        grants = ?plugin.mounted,
                        "{}", if replaced { "plugin replaced" } else { "plugin loaded" }
                    );
                    entry.loaded = Some(Arc::new(plugin));
                    entry.content = content.or_else(|| content_id(&manifest_path, &wasm_path));
                    entry.refused = None;
                    if replaced {
                        report.replaced.push(name.clone());
                    } else {
                        report.loaded.push(name.clone());
                    }
                }
                Err(e) => {
                    let reason = format!("{e:#}");
                    tracing::error!(
                        plugin = %name,
                        still_serving = entry.loaded.is_some(),
                        "plugin refused: {reason}"
                    );
                    entry.refused = Some(Refusal {
                        reason,
                        at: SystemTime::now(),
                    });
                    report.refused.push(name.clone());
                }
            }
        }
        let mut entries = self.write();
        let gone: Vec<String> = entries
            .keys()
            .filter(|name| !names.contains(name))
            .cloned()
            .collect();
        for name in gone {
            entries.remove(&name);
            tracing::info!(plugin = %name, "plugin removed");
            report.removed.push(name);
        }
        report
    }

    fn manifest_names(&self) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.options.plugin_dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                names.push(stem.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Loads the plugin `name` from `dir` (an unpacked package's plugin directory)
    /// with the same verification as the plugin directory's, without adding it to
    /// the directory's set: its owner (the package) holds it.
    pub fn load_bundle(&self, dir: &Path, name: &str) -> anyhow::Result<Arc<Plugin>> {
        self.load(dir, name).map(Arc::new)
    }

    /// Verifies and compiles the plugin `name` in `dir`, and starts it if it is a driver.
    fn load(&self, dir: &Path, name: &str) -> anyhow::Result<Plugin> {
        let manifest_path = &dir.join(format!("{name}.toml"));
        let wasm_path = &dir.join(format!("{name}.wasm"));
        let manifest = Manifest::read(manifest_path)?;
        if manifest.name != name {
            bail!(
                "manifest name {:?} does not match its file name {name}.toml",
                manifest.name
            );
        }
        let wasm = read_regular_file(wasm_path, MAX_WASM_BYTES)?;
        let actual = hex::encode(Sha256::digest(&wasm));
        if actual != manifest.sha256 {
            bail!(
                "sha256 mismatch: the manifest pins {}, {} hashes to {actual}",
                manifest.sha256,
                wasm_path.display()
            );
        }
        if crate::runtime::Api::of(&manifest.api).is_none() {
            bail!(
                "api {}: this host implements xpu:plugin@{}",
                manifest.api,
                crate::runtime::SUPPORTED_APIS
            );
        }
        let (component, report) = self
            .runtime
            .load_component(&wasm, &actual)
            .context("compile")?;
        let inspection = inspect(self.runtime.engine(), &component)?;
        if inspection.kind != manifest.kind {
            bail!(
                "manifest says kind {:?}, the component implements the {:?} world",
                manifest.kind,
                inspection.kind
            );
        }
        if inspection.api.major != manifest.api.major || inspection.api.minor != manifest.api.minor
        {
            bail!(
                "manifest says api {}, the component was built against {}",
                manifest.api,
                inspection.api
            );
        }
        let preopens = self.resolve_grants(&manifest)?;
        let mut mounted: Vec<String> = preopens.iter().map(|(_, guest)| guest.clone()).collect();
        mounted.extend(manifest.grants.nvml.allowed_as().map(String::from));
        let assets = match &manifest.assets {
            None => None,
            Some(rel) => {
                let dir = dir.join(rel);
                // A real directory in the plugin's directory, not a link out of it.
                let meta = std::fs::symlink_metadata(&dir)
                    .with_context(|| format!("assets directory {}", dir.display()))?;
                if !meta.is_dir() {
                    bail!(
                        "assets {}: not a directory (links are not followed)",
                        dir.display()
                    );
                }
                let dir = cap_std::fs::Dir::open_ambient_dir(&dir, cap_std::ambient_authority())
                    .with_context(|| format!("assets directory {}", dir.display()))?;
                Some(Arc::new(dir))
            }
        };
        let max_memory_mib = (self.runtime.options.max_memory_bytes >> 20) as u64;
        if manifest.memory_mib > max_memory_mib {
            bail!(
                "limits.memory-mib {} is above this host's ceiling of {max_memory_mib}",
                manifest.memory_mib
            );
        }
        let limits = &self.runtime.options.limits;
        if manifest.call_timeout_ms > limits.max_call_timeout_ms {
            bail!(
                "limits.call-timeout-ms {} is above this host's ceiling of {} \
                 ([plugin-limits] max-call-timeout-ms)",
                manifest.call_timeout_ms,
                limits.max_call_timeout_ms
            );
        }
        let log = Arc::new(LogBudget::new(limits.log_lines_per_s));
        let calls = Arc::new(CallStats::default());
        let sandbox = Sandbox {
            plugin: Arc::from(name),
            preopens,
            memory_limit_bytes: (manifest.memory_mib as usize) << 20,
            assets,
            inference: self.runtime.inference().clone(),
            limits: Arc::new(limits.clone()),
            log: log.clone(),
            calls: calls.clone(),
            launch: Default::default(),
            providers: Default::default(),
            nvml: NvmlAccess {
                bridge: self.runtime.nvml().clone(),
                grant: manifest.grants.nvml,
            },
        };
        let pre = self
            .runtime
            .linker()
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .context("link against the host (does it import something xpud does not provide?)")?;
        let timeout = Duration::from_millis(manifest.call_timeout_ms);
        let engine = self.runtime.engine().clone();
        let policy = self.options.restart.clone();
        let handle = match manifest.kind {
            Kind::Driver => {
                let driver = Driver::new(
                    name,
                    engine,
                    sandbox,
                    DriverPre::new(inspection.bindings, pre)?,
                    manifest.config.clone(),
                    policy,
                    timeout,
                );
                // An upgrade keeps the partitions the previous version created.
                if let Some(previous) = self.get(name).as_ref().and_then(|p| p.driver()) {
                    driver.inherit_partitions(previous);
                }
                // A driver that cannot even start is refused now, not at first use.
                let info = driver.start().context("start")?;
                if info.simulated && !self.options.simulated_devices {
                    anyhow::bail!(
                        "its devices are simulated ({} {}): simulated devices load only when \
                         the operator asks (--simulated-devices, [runtime] simulated-devices)",
                        info.vendor,
                        info.accelerator_types.join(", ")
                    );
                }
                Handle::Driver(driver)
            }
            Kind::Algorithm => Handle::Algorithm(Box::new(AlgorithmPlugin::new(
                name,
                engine,
                sandbox,
                AlgorithmPre::new(inspection.bindings, pre)?,
                policy,
                timeout,
            ))),
        };
        Ok(Plugin {
            manifest,
            inspection,
            loaded_from: report.from,
            load_time: report.took,
            loaded_at: SystemTime::now(),
            mounted,
            handle,
            log,
            calls,
        })
    }

    /// Maps requested grants to host directories, after the operator's policy.
    /// Grants absent on this host are skipped (a driver for hardware that is not
    /// here then finds nothing, which is the truth).
    fn resolve_grants(&self, manifest: &Manifest) -> anyhow::Result<Vec<(PathBuf, String)>> {
        if let Some(needed) = manifest.grants.nvml.allowed_as() {
            if !self.options.allowed_grants.iter().any(|a| a == needed) {
                bail!(
                    "grants.nvml {:?} is not allowed by this host (allowed-grants lacks {needed:?}; \
                     allowed: {})",
                    manifest.grants.nvml,
                    self.options.allowed_grants.join(", ")
                );
            }
        }
        let mut preopens = Vec::new();
        for grant in &manifest.grants.read {
            let allowed = self
                .options
                .allowed_grants
                .iter()
                .any(|prefix| Path::new(grant).starts_with(Path::new(prefix)));
            if !allowed {
                bail!(
                    "grants.read {grant:?} is not allowed by this host (allowed: {})",
                    self.options.allowed_grants.join(", ")
                );
            }
            let host = self.options.grant_root.join(grant.trim_start_matches('/'));
            if !host.is_dir() {
                tracing::info!(plugin = %manifest.name, grant = %grant, host = %host.display(), "grant not present on this host; not mounted");
                continue;
            }
            preopens.push((host, grant.clone()));
        }
        Ok(preopens)
    }
}

/// Hash of both files' contents: tells a real change from a touch. `None` for
/// files that would not load anyway (links, oversized).
fn content_id(manifest: &Path, wasm: &Path) -> Option<String> {
    let mut hasher = Sha256::new();
    hasher.update(read_regular_file(manifest, MAX_MANIFEST_BYTES).ok()?);
    hasher.update(read_regular_file(wasm, MAX_WASM_BYTES).ok()?);
    Some(hex::encode(hasher.finalize()))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
