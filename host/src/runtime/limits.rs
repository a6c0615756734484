//! What a plugin may make the host do on its behalf.
//!
//! The sandbox bounds a plugin's own memory and time; these bound the rest: work
//! and memory the host spends for it (model sessions, log lines, call deadlines)
//! and the size of what it hands the host (driver answers). Each is the operator's
//! choice, in `[plugin-limits]`, with a default safe for a shared machine.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginLimits {
    /// Ceiling on a manifest's `limits.call-timeout-ms`: how long one plugin call
    /// may hold a worker thread.
    pub max_call_timeout_ms: u64,
    /// Log lines a plugin may write per second (all its instances together), with
    /// bursts of ten seconds' worth; lines past it are dropped and counted.
    pub log_lines_per_s: u32,
    /// Largest model file a plugin may load.
    pub max_model_bytes: u64,
    /// Models one plugin instance may hold loaded at once; a load past it answers
    /// `inference-error.runtime`.
    pub max_models_per_instance: u32,
    /// How long a model load (parsing, optimising, placing on the device) may take
    /// before the plugin's call gives up on it.
    pub model_load_timeout_ms: u64,
    /// Devices a driver may report, and cards in one sample.
    pub max_devices: u32,
    /// Partitions (instances) a driver may report.
    pub max_partitions: u32,
    /// Longest string a driver may put in an answer (ids, names, labels).
    pub max_string_bytes: u32,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            max_call_timeout_ms: 30_000,
            log_lines_per_s: 100,
            max_model_bytes: 1 << 30,
            max_models_per_instance: 8,
            model_load_timeout_ms: 60_000,
            max_devices: 64,
            max_partitions: 1024,
            max_string_bytes: 256,
        }
    }
}

impl PluginLimits {
    pub fn validate(&self) -> anyhow::Result<()> {
        let positive = [
            ("max-call-timeout-ms", self.max_call_timeout_ms),
            ("log-lines-per-s", self.log_lines_per_s.into()),
            ("max-model-bytes", self.max_model_bytes),
            (
                "max-models-per-instance",
                self.max_models_per_instance.into(),
            ),
            ("model-load-timeout-ms", self.model_load_timeout_ms),
            ("max-devices", self.max_devices.into()),
            ("max-partitions", self.max_partitions.into()),
            ("max-string-bytes", self.max_string_bytes.into()),
        ];
        for (key, value) in positive {
            if value == 0 {
                anyhow::bail!("plugin-limits.{key} must be positive");
            }
        }
        Ok(())
    }
}
