//! Plugin manifests: `NAME.toml` beside `NAME.wasm` in the plugin directory.
//!
//! ```toml
//! name = "sim-xpu"            # must match the file names
//! version = "0.1.0"           # the plugin's own version (semver)
//! kind = "driver"             # driver | algorithm
//! api = "0.1.0"               # the xpu:plugin WIT version it was built against
//! sha256 = "…"                # of NAME.wasm: a mismatch refuses the plugin
//! description = "…"
//! assets = "sim-xpu.d"        # optional package directory (model files), relative
//!
//! [grants]
//! read = ["/sys", "/proc/driver"]   # read-only paths, as the plugin will see them
//! nvml = "read"               # the NVML bridge (v0.2 drivers): "read", or "manage"
//!                             # to create and destroy MIG instances
//!
//! [limits]
//! memory-mib = 64
//! call-timeout-ms = 1000
//!
//! [config]                    # handed to the driver's init as key/value strings
//! cards = 2
//! ```
//!
//! Unknown keys are errors: a typo in a security-relevant file must not pass silently.

use std::path::{Component, Path};

use serde::Deserialize;

pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
const DEFAULT_MEMORY_MIB: u64 = 64;
const DEFAULT_CALL_TIMEOUT_MS: u64 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Driver,
    Algorithm,
}

impl Kind {
    /// The interface the plugin's component must export.
    pub fn export_interface(self) -> &'static str {
        match self {
            Kind::Driver => "xpu:plugin/driver",
            Kind::Algorithm => "xpu:plugin/analyzer",
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    #[serde(default)]
    pub read: Vec<String>,
    #[serde(default)]
    pub nvml: crate::runtime::nvml::NvmlGrant,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Limits {
    pub memory_mib: Option<u64>,
    pub call_timeout_ms: Option<u64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    version: String,
    kind: Kind,
    api: String,
    sha256: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    assets: Option<String>,
    #[serde(default)]
    grants: Grants,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    config: toml::Table,
}

/// A validated manifest.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Manifest {
    pub name: String,
    pub version: semver::Version,
    pub kind: Kind,
    pub api: semver::Version,
    pub sha256: String,
    pub description: String,
    pub assets: Option<String>,
    pub grants: Grants,
    pub memory_mib: u64,
    pub call_timeout_ms: u64,
    pub config: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error("manifest {file}: {message}")]
pub struct ManifestError {
    pub file: String,
    pub message: String,
}

/// Plugin names: lower-case letters, digits, `-` and `_`, starting with a letter or
/// digit, at most 64 characters (they become file names and log fields).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
}

/// A grant is an absolute, normalised path: no `..`, no `.`, no empty parts, no
/// trailing slash. Checked on the text: `Path::components` would normalise `.` and
/// trailing slashes away instead of refusing them.
pub fn valid_grant(path: &str) -> bool {
    path == "/"
        || path.strip_prefix('/').is_some_and(|rest| {
            rest.split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..")
        })
}

impl Manifest {
    /// Parses and validates a manifest; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Manifest, ManifestError> {
        let fail = |message: String| ManifestError {
            file: file.to_string(),
            message,
        };
        let raw: RawManifest = crate::toml_input::parse(text).map_err(fail)?;
        if !valid_name(&raw.name) {
            return Err(fail(format!(
                "name {:?}: use 1-64 lower-case letters, digits, '-' or '_'",
                raw.name
            )));
        }
        let version = semver::Version::parse(&raw.version)
            .map_err(|e| fail(format!("version {:?}: {e}", raw.version)))?;
        let api = semver::Version::parse(&raw.api)
            .map_err(|e| fail(format!("api {:?}: {e}", raw.api)))?;
        let sha256 = raw.sha256.to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(fail(format!(
                "sha256 {:?}: expected 64 hex digits",
                raw.sha256
            )));
        }
        if let Some(bad) = raw.grants.read.iter().find(|g| !valid_grant(g)) {
            return Err(fail(format!(
                "grants.read {bad:?}: grants are absolute paths without '.' or '..'"
            )));
        }
        if let Some(assets) = &raw.assets {
            let p = Path::new(assets);
            if assets.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(fail(format!(
                    "assets {assets:?}: a relative path inside the plugin directory"
                )));
            }
        }
        let memory_mib = raw.limits.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        if memory_mib == 0 {
            return Err(fail("limits.memory-mib must be positive".into()));
        }
        let call_timeout_ms = raw
            .limits
            .call_timeout_ms
            .unwrap_or(DEFAULT_CALL_TIMEOUT_MS);
        if call_timeout_ms == 0 || call_timeout_ms > 600_000 {
            return Err(fail(
                "limits.call-timeout-ms must be within 1-600000".into(),
            ));
        }
        let mut config = Vec::with_capacity(raw.config.len());
        for (key, value) in raw.config {
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(fail(format!(
                        "config.{key}: only strings, numbers and booleans, not {}",
                        other.type_str()
                    )))
                }
            };
            config.push((key, value));
        }
        Ok(Manifest {
            name: raw.name,
            version,
            kind: raw.kind,
            api,
            sha256,
            description: raw.description,
            assets: raw.assets,
            grants: raw.grants,
            memory_mib,
            call_timeout_ms,
            config,
        })
    }

    /// Reads and parses `path`, a regular file (not a link) of bounded size.
    pub fn read(path: &Path) -> Result<Manifest, ManifestError> {
        let file = path.display().to_string();
        let fail = |message: String| ManifestError {
            file: file.clone(),
            message,
        };
        let bytes = crate::files::read_regular_file(path, MAX_MANIFEST_BYTES)
            .map_err(|e| fail(e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|_| fail("not UTF-8 text".into()))?;
        Manifest::parse(&text, &file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "sim-xpu"
version = "0.1.0"
kind = "driver"
api = "0.1.0"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
[grants]
read = ["/sys", "/proc/driver"]
[limits]
memory-mib = 32
[config]
cards = 8
model = "T4"
"#;

    #[test]
    fn a_good_manifest_parses_with_defaults() {
        let m = Manifest::parse(GOOD, "sim-xpu.toml").unwrap();
        assert_eq!(m.kind, Kind::Driver);
        assert_eq!(m.memory_mib, 32);
        assert_eq!(m.call_timeout_ms, DEFAULT_CALL_TIMEOUT_MS);
        assert!(m.config.contains(&("cards".to_string(), "8".to_string())));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (GOOD.replace("\"driver\"", "\"gpu\""), "kind"),
            (
                GOOD.replace("version = \"0.1.0\"", "version = \"one\""),
                "version",
            ),
            (GOOD.replace("sha256 = \"0000", "sha256 = \"zz00"), "sha256"),
            (
                GOOD.replace("\"/proc/driver\"", "\"/proc/../etc\""),
                "grants.read",
            ),
            (
                GOOD.replace("memory-mib = 32", "memory-mib = 0"),
                "memory-mib",
            ),
            (
                GOOD.replace("name = \"sim-xpu\"", "name = \"Sim XPU\""),
                "name",
            ),
            (
                GOOD.replace("[limits]", "colour = \"red\"\n[limits]"),
                "colour",
            ),
            (GOOD.replace("cards = 8", "cards = [8]"), "config.cards"),
        ];
        for (text, field) in cases {
            let err = Manifest::parse(&text, "m.toml").unwrap_err().to_string();
            assert!(err.contains(field), "{field} not named in: {err}");
        }
    }

    #[test]
    fn grants_must_be_normalised_absolute_paths() {
        assert!(valid_grant("/sys"));
        assert!(valid_grant("/proc/driver"));
        assert!(!valid_grant("sys"));
        assert!(!valid_grant("/sys/../etc"));
        assert!(!valid_grant("/sys/./class"));
        assert!(!valid_grant("/sys/"));
    }
}
