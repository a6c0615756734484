//! The algorithm file package: what the platform pushes (E.2, I.2) and xpud runs.
//!
//! A gzip-compressed tar archive:
//!
//! ```text
//! package.toml          what E.5 and I.6/I.7 report (PackageManifest below)
//! plugin/NAME.wasm      the algorithm plugin (a component of the algorithm world)
//! plugin/NAME.toml      its plugin manifest, pinning the wasm's sha256
//! plugin/NAME.d/...     its model files, when the plugin manifest says `assets = "NAME.d"`
//! ```
//!
//! `xpud package build` makes one from a packed plugin; docs/packages.md has the whole
//! format. Unpacking refuses absolute paths, `..`, links and special files, and
//! stops at a size limit.

use std::io::Read;
use std::path::{Component, Path};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// The file inside the archive that describes it.
pub const MANIFEST: &str = "package.toml";
/// The directory inside the archive that holds the plugin.
pub const PLUGIN_DIR: &str = "plugin";

/// `package.toml`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PackageManifest {
    pub package: PackageInfo,
    #[serde(default)]
    pub bin: Bin,
    #[serde(default)]
    pub runtime: Runtime,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PackageInfo {
    /// The algorithm package code (I.4): letters, digits, `_`, `-`, `.`; under 128
    /// characters; e.g. `BAIDU-HUMAN_ATTR_ALERT-1.0.0`.
    pub code: String,
    pub name: String,
    pub version: String,
    /// BIN or ENGINE (I.6).
    #[serde(rename = "type")]
    pub kind: PackageType,
    #[serde(default)]
    pub author: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Environment of the algorithm (E.5 `env`).
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// The plugin inside `plugin/`: `NAME.wasm` and `NAME.toml`.
    pub plugin: String,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum PackageType {
    Bin,
    Engine,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

/// E.5 `bin`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Bin {
    #[serde(default = "wasm")]
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub remote_uri: String,
}

fn wasm() -> String {
    "wasm".into()
}

/// E.5 `algoRuntime`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Runtime {
    #[serde(default)]
    pub cmd: String,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub gpu: Vec<GpuRequirement>,
    /// Whether the algorithm runs without an accelerator (its inference on CPU).
    /// Unset: it does when `gpu` names no accelerator, and does not otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<bool>,
    /// Frames the algorithm analyses per second of video (default 5): the decoder
    /// drops the rest before converting them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis_fps: Option<f64>,
}

/// Frames analysed per second of video when the package does not say.
pub const DEFAULT_ANALYSIS_FPS: f64 = 5.0;

impl Runtime {
    /// Whether replicas may be placed on CPU only (F.2 `gpuType: CPU`).
    pub fn runs_on_cpu(&self) -> bool {
        self.cpu.unwrap_or(self.gpu.is_empty())
    }

    /// The analysis rate, within 0.1-60 frames per second.
    pub fn analysis_fps(&self) -> f64 {
        self.analysis_fps
            .filter(|f| f.is_finite())
            .map_or(DEFAULT_ANALYSIS_FPS, |f| f.clamp(0.1, 60.0))
    }
}

/// E.5 `algoRuntime.gpu[]`: what the algorithm needs of an accelerator.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GpuRequirement {
    pub quota: f64,
    /// Accelerator memory per replica, GB (E.5 `limit`); 0: the quota's share of
    /// the card's memory.
    #[serde(default)]
    pub limit: f64,
    pub vendor: String,
    pub accelerator: String,
    #[serde(default)]
    pub capacities: Capacities,
    #[serde(default)]
    pub resolution: String,
}

impl GpuRequirement {
    /// The memory a replica asks for (MiB), where `limit` names it.
    pub fn memory_mib(&self) -> Option<u64> {
        (self.limit > 0.0 && self.limit.is_finite()).then(|| (self.limit * 1024.0).ceil() as u64)
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Capacities {
    #[serde(default)]
    pub stream_video_quota: u32,
    #[serde(default)]
    pub stream_capture_quota: u32,
    #[serde(default)]
    pub analyze_quota: u32,
}

/// I.4: letters, digits, `_`, `-`, `.`; 1-127 characters.
pub fn valid_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() < 128
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl PackageManifest {
    pub fn parse(text: &str) -> anyhow::Result<PackageManifest> {
        let manifest: PackageManifest =
            crate::toml_input::parse(text).map_err(|e| anyhow::anyhow!("{MANIFEST}: {e}"))?;
        if !valid_code(&manifest.package.code) {
            bail!(
                "{MANIFEST}: package.code {:?}: letters, digits, '_', '-' or '.', under 128 characters",
                manifest.package.code
            );
        }
        if !crate::plugins::manifest::valid_name(&manifest.package.plugin) {
            bail!(
                "{MANIFEST}: package.plugin {:?} is not a plugin name",
                manifest.package.plugin
            );
        }
        for (i, gpu) in manifest.runtime.gpu.iter().enumerate() {
            if !(gpu.limit.is_finite() && gpu.limit >= 0.0 && gpu.limit <= 1e6) {
                bail!(
                    "{MANIFEST}: runtime.gpu[{i}].limit {}: GB of accelerator memory per \
                     replica, 0 (the quota's share of the card's) or more",
                    gpu.limit
                );
            }
        }
        Ok(manifest)
    }
}

/// Builds a package: `manifest` (package.toml) and the packed plugin `plugin` found
/// in `plugin_dir` (NAME.wasm, NAME.toml and its assets). Returns the md5 of the
/// archive, which the platform sends along with its URL.
pub fn build(manifest: &Path, plugin_dir: &Path, out: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("read {}", manifest.display()))?;
    let parsed = PackageManifest::parse(&text)?;
    let name = &parsed.package.plugin;
    let plugin_manifest = crate::plugins::Manifest::read(&plugin_dir.join(format!("{name}.toml")))?;
    if plugin_manifest.kind != crate::plugins::Kind::Algorithm {
        bail!(
            "plugin {name} is a {:?} plugin; a package carries an algorithm",
            plugin_manifest.kind
        );
    }
    let file = std::fs::File::create(out).with_context(|| format!("create {}", out.display()))?;
    let mut archive = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::default(),
    ));
    archive.append_path_with_name(manifest, MANIFEST)?;
    for file in [format!("{name}.wasm"), format!("{name}.toml")] {
        archive.append_path_with_name(plugin_dir.join(&file), format!("{PLUGIN_DIR}/{file}"))?;
    }
    if let Some(assets) = &plugin_manifest.assets {
        archive.append_dir_all(format!("{PLUGIN_DIR}/{assets}"), plugin_dir.join(assets))?;
    }
    archive.into_inner()?.finish()?;
    let bytes = std::fs::read(out)?;
    Ok(hex::encode(<md5::Md5 as md5::Digest>::digest(&bytes)))
}

/// Unpacks `archive` into `dest` (which must not exist) and returns its manifest.
/// Refuses unsafe entries and archives unpacking to more than `max_bytes`.
pub fn unpack(archive: &Path, dest: &Path, max_bytes: u64) -> anyhow::Result<PackageManifest> {
    std::fs::create_dir(dest).with_context(|| format!("create {}", dest.display()))?;
    let file =
        std::fs::File::open(archive).with_context(|| format!("open {}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut total: u64 = 0;
    for entry in tar.entries().context("not a tar.gz archive")? {
        let mut entry = entry.context("corrupt archive")?;
        let path = entry.path().context("entry path")?.into_owned();
        if !path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            bail!("archive entry {} leaves the package", path.display());
        }
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            bail!(
                "archive entry {} is neither a file nor a directory",
                path.display()
            );
        }
        total += entry.header().size().unwrap_or(0);
        if total > max_bytes {
            bail!("the package unpacks to more than {max_bytes} bytes");
        }
        if !entry
            .unpack_in(dest)
            .with_context(|| format!("unpack {}", path.display()))?
        {
            bail!("archive entry {} leaves the package", path.display());
        }
    }
    let mut text = String::new();
    std::fs::File::open(dest.join(MANIFEST))
        .with_context(|| format!("the package has no {MANIFEST}"))?
        .take(64 * 1024)
        .read_to_string(&mut text)?;
    PackageManifest::parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST_TEXT: &str = r#"
[package]
code = "XPUD-PASSTHROUGH-0.1.0"
name = "passthrough"
version = "0.1.0"
type = "ENGINE"
plugin = "passthrough"
env = [{ name = "LOG", value = "1" }]

[[runtime.gpu]]
quota = 0.5
vendor = "NVIDIA"
accelerator = "T4"
resolution = "PIXELS_200W"
capacities = { stream-video-quota = 6 }
"#;

    #[test]
    fn the_manifest_parses_and_checks_the_code() {
        let m = PackageManifest::parse(MANIFEST_TEXT).unwrap();
        assert_eq!(m.package.kind, PackageType::Engine);
        assert_eq!(m.runtime.gpu[0].capacities.stream_video_quota, 6);
        assert_eq!(m.bin, Bin::default());
        let bad = MANIFEST_TEXT.replace("XPUD-PASSTHROUGH-0.1.0", "has space");
        assert!(PackageManifest::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("package.code"));
        let bad = MANIFEST_TEXT.replace("\"ENGINE\"", "\"DOCKER\"");
        assert!(PackageManifest::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("package.type"));
    }

    #[test]
    fn unpacking_refuses_escapes_and_bombs() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("evil.tar.gz");
        {
            let file = std::fs::File::create(&archive).unwrap();
            let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::fast(),
            ));
            let data = b"owned";
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            // `append_data` refuses `..`, so write the raw name.
            header.as_gnu_mut().unwrap().name[..12].copy_from_slice(b"../escape.tx");
            header.set_cksum();
            tar.append(&header, &data[..]).unwrap();
            tar.into_inner().unwrap().finish().unwrap();
        }
        let err = unpack(&archive, &dir.path().join("out"), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("leaves the package"), "{err}");
        assert!(!dir.path().join("escape.tx").exists());

        let big = dir.path().join("big.tar.gz");
        {
            let file = std::fs::File::create(&big).unwrap();
            let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::fast(),
            ));
            let data = vec![0u8; 4096];
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            tar.append_data(&mut header, "zeros", &data[..]).unwrap();
            tar.into_inner().unwrap().finish().unwrap();
        }
        let err = unpack(&big, &dir.path().join("out2"), 1024).unwrap_err();
        assert!(err.to_string().contains("more than 1024 bytes"), "{err}");
    }
}
