//! `xpud serve` configuration: embedded defaults, then a TOML file, then flags.
//!
//! ```toml
//! data-dir = "xpud-data"           # state, compile cache; plugins in data-dir/plugins
//! plugin-dir = "/opt/xpud/plugins" # optional: elsewhere
//! listen = "127.0.0.1:8080"
//! advertise-address = "10.0.0.5"   # optional: how other machines reach this one
//! machine-code = "cad-01"          # optional: this machine's code in CAD mode
//!
//! [runtime]
//! max-instances = 256              # live plugin instances (sizes the pooling allocator)
//! max-memory-mib = 1024            # ceiling on any plugin's memory
//! grant-root = "/"                 # host directory plugin grants are resolved under
//! allowed-grants = ["/sys", "/proc/driver", "nvml", "nvml:manage"]
//!                                  # paths, and the NVML bridge (read; MIG changes)
//! nvml-library = "libnvidia-ml.so.1"   # where NVML is loaded from
//! simulated-devices = false        # load drivers whose devices are simulated (sim-xpu):
//!                                  # for trying xpud out and for tests, never production
//!
//! [plugin-limits]                  # what a plugin may make the host do
//! max-call-timeout-ms = 30000      # ceiling on a manifest's call-timeout-ms
//! log-lines-per-s = 100            # per plugin; bursts of 10 s; the rest dropped, counted
//! max-model-bytes = 1073741824     # largest model file a plugin may load
//! max-models-per-instance = 8      # models one instance may hold loaded
//! model-load-timeout-ms = 60000    # a model load past it is abandoned
//! max-devices = 64                 # devices (and cards per sample) a driver may report
//! max-partitions = 1024            # partitions a driver may report
//! max-string-bytes = 256           # longest string in a driver's answer
//!
//! [restart]                        # supervision of crashing plugins
//! max-restarts = 3
//! window-s = 60
//! backoff-initial-ms = 200
//! backoff-max-ms = 5000
//!
//! [sampler]
//! interval-ms = 2000               # how often driver plugins are sampled
//!
//! [inference]
//! onnxruntime = "/opt/onnxruntime/libonnxruntime.so.1.31.1"   # or XPUD_ONNXRUNTIME
//! providers = ["cuda", "cpu"]      # tried in order (also "tensorrt"); each failure
//!                                  # is logged
//! max-batch = 8                    # runs of one model queued at once from several
//!                                  # instances go as one batch (1: never)
//!
//! [video]
//! ffmpeg = "ffmpeg"                # the decoder binary (a bare name: looked up on PATH)
//! hwaccel = "auto"                 # auto (NVDEC on an NVIDIA replica, VA-API where
//!                                  # /dev/dri exists), none, cuda, vaapi
//! max-running-tasks = 64           # tasks decoding at once (a thread and an ffmpeg each)
//!
//! [platform]                       # the platform xpud registers with (none: no calls)
//! url = "http://10.0.0.2:8080"
//! modes = ["cap"]                  # cap (/ACP/...), cad (/CAD/machine/...), or both
//! id = "300000000601"              # CAP device id; default: the node id
//! username = "xpud"                # this API's credentials, sent with the registration
//! password = "..."                 # never logged
//! expires-s = 60                   # keepalive every third of it
//! backoff-initial-ms = 500         # retry backoff while the platform is down
//! backoff-max-ms = 30000
//! package-url = "http://10.0.0.2:8080/packages/{id}.tar.gz"   # CAD mode (I.2)
//! ca-bundle = "/etc/xpud/platform-ca.pem"   # CAs trusted for the platform's HTTPS
//!
//! [tls]                            # none: a local CA in data-dir/tls issues the certificate
//! cert = "/etc/xpud/server.pem"    # chain, leaf first; reloaded when replaced
//! key = "/etc/xpud/server.key"
//! ca = "/etc/xpud/ca.pem"          # handed to clients by A.6
//! insecure-http = false            # plain HTTP, local development only (--insecure-http)
//!
//! [auth]                           # OAuth2 client credentials (§9)
//! token-ttl-s = 3600
//! key-rotation-interval-s = 86400  # 0: only `xpud keys rotate`
//! failed-auth-limit = 10           # failed authentications per address and window
//! failed-auth-window-s = 60
//! [[auth.clients]]                 # besides `xpud client add`
//! id = "platform"
//! secret-hash = "$argon2id$..."    # `xpud client hash` prints one
//! scopes = ["read", "write"]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::auth::AuthConfig;
use crate::platform::PlatformConfig;
use crate::plugins::supervisor::RestartPolicy;
use crate::runtime::batching::Batching;
use crate::runtime::inference::Provider;
use crate::runtime::PluginLimits;
use crate::tls::TlsConfig;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub plugin_dir: Option<PathBuf>,
    pub listen: SocketAddr,
    /// The address other machines reach this one at (node IPs, A.6, registration);
    /// default: the first non-loopback IPv4 address.
    pub advertise_address: Option<std::net::IpAddr>,
    /// This machine's code in CAD mode (Appendix H); default: its node id
    /// (`node-<hostname>`).
    pub machine_code: Option<String>,
    pub runtime: RuntimeConfig,
    pub plugin_limits: PluginLimits,
    pub restart: RestartPolicy,
    pub sampler: SamplerConfig,
    pub inference: InferenceConfig,
    pub video: VideoConfig,
    pub platform: PlatformConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct InferenceConfig {
    /// Path of libonnxruntime.so; without it models cannot run.
    pub onnxruntime: Option<PathBuf>,
    /// Execution providers to try, in order.
    pub providers: Vec<Provider>,
    /// Most runs of one model (from different instances) batched together; 1: none.
    pub max_batch: usize,
    /// The executable started as the inference worker of each partition whose
    /// driver names its device (a MIG instance, a time slice): `xpud serve` uses
    /// itself unless this names another.
    pub worker: Option<PathBuf>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        let batching = Batching::default();
        InferenceConfig {
            onnxruntime: None,
            providers: vec![Provider::Cuda, Provider::Cpu],
            max_batch: batching.max,
            worker: None,
        }
    }
}

impl InferenceConfig {
    pub fn batching(&self) -> Batching {
        Batching {
            max: self.max_batch,
            ..Batching::default()
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct SamplerConfig {
    /// How often every driver plugin is sampled.
    pub interval_ms: u64,
}

/// `[video]`: how tasks reach their streams.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct VideoConfig {
    /// The ffmpeg binary that decodes (a bare name is looked up on PATH).
    pub ffmpeg: PathBuf,
    /// Hardware decode: `auto` (NVDEC when the task's replica sits on an NVIDIA
    /// card, VA-API where /dev/dri/renderD128 exists, else CPU), `none`, `cuda`,
    /// `vaapi`. A hardware decoder that fails falls back to CPU, said so.
    pub hwaccel: crate::tasks::HwaccelMode,
    /// Tasks decoding at once: each holds a thread, an ffmpeg process and its
    /// frame buffers. Past it, G.2 and G.4 are refused (409).
    pub max_running_tasks: usize,
}

impl Default for VideoConfig {
    fn default() -> Self {
        VideoConfig {
            ffmpeg: PathBuf::from("ffmpeg"),
            hwaccel: crate::tasks::HwaccelMode::Auto,
            max_running_tasks: 64,
        }
    }
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig { interval_ms: 2000 }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuntimeConfig {
    pub max_instances: u32,
    pub max_memory_mib: u64,
    pub grant_root: PathBuf,
    pub allowed_grants: Vec<String>,
    /// The NVML library; `None`: `libnvidia-ml.so.1` from the loader's path.
    pub nvml_library: Option<PathBuf>,
    /// Drivers that say their devices are simulated load only when this is set
    /// (`--simulated-devices`): a simulator must never pass for compute.
    pub simulated_devices: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            data_dir: PathBuf::from("xpud-data"),
            plugin_dir: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            advertise_address: None,
            machine_code: None,
            runtime: RuntimeConfig::default(),
            plugin_limits: PluginLimits::default(),
            restart: RestartPolicy::default(),
            sampler: SamplerConfig::default(),
            inference: InferenceConfig::default(),
            video: VideoConfig::default(),
            platform: PlatformConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_instances: 256,
            max_memory_mib: 1024,
            grant_root: PathBuf::from("/"),
            allowed_grants: vec![
                "/sys".into(),
                "/proc/driver".into(),
                "nvml".into(),
                "nvml:manage".into(),
            ],
            nvml_library: None,
            simulated_devices: false,
        }
    }
}

impl ServeConfig {
    /// Reads a config file; keys it does not set keep their defaults.
    pub fn from_file(path: &Path) -> anyhow::Result<ServeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config {}", path.display()))?;
        crate::toml_input::parse(&text)
            .map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.sampler.interval_ms == 0 {
            anyhow::bail!("sampler.interval-ms must be positive");
        }
        if self.runtime.max_instances == 0 {
            anyhow::bail!("runtime.max-instances must be positive");
        }
        if self.inference.providers.is_empty() {
            anyhow::bail!("inference.providers must name at least one provider");
        }
        if !(1..=64).contains(&self.inference.max_batch) {
            anyhow::bail!("inference.max-batch must be within 1-64 (1: no batching)");
        }
        if self.runtime.max_memory_mib == 0 {
            anyhow::bail!("runtime.max-memory-mib must be positive");
        }
        self.plugin_limits.validate()?;
        self.tls.validate()?;
        self.auth.validate()
    }

    pub fn plugin_dir(&self) -> PathBuf {
        self.plugin_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("plugins"))
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.data_dir.join("cache").join("components")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_file_keeps_the_defaults() {
        let config: ServeConfig =
            toml::from_str("listen = \"0.0.0.0:9000\"\n[restart]\nmax-restarts = 5\n").unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.restart.max_restarts, 5);
        assert_eq!(config.restart.window_s, 60);
        assert_eq!(config.plugin_dir(), PathBuf::from("xpud-data/plugins"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<ServeConfig>("lissen = \"x\"").is_err());
    }
}
