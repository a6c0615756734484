//! What a component imports and exports, and which xpud world it implements.

use anyhow::{bail, Context};
use wasmtime::component::Component;
use wasmtime::Engine;

use super::Kind;
use crate::runtime::Api;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Inspection {
    pub kind: Kind,
    pub api: semver::Version,
    /// The host bindings it runs with.
    #[serde(skip)]
    pub bindings: Api,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

/// Finds the world from the exported `xpu:plugin/...@VERSION` interface.
pub fn inspect(engine: &Engine, component: &Component) -> anyhow::Result<Inspection> {
    let ty = component.component_type();
    let imports: Vec<String> = ty
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let exports: Vec<String> = ty
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let mut found = None;
    for kind in [Kind::Driver, Kind::Algorithm] {
        let prefix = format!("{}@", kind.export_interface());
        if let Some(name) = exports.iter().find(|e| e.starts_with(&prefix)) {
            if found.is_some() {
                bail!("exports both the driver and the analyzer interface; a plugin is one kind");
            }
            let version = &name[prefix.len()..];
            let api = semver::Version::parse(version)
                .with_context(|| format!("export {name}: bad version"))?;
            found = Some((kind, api));
        }
    }
    let Some((kind, api)) = found else {
        bail!(
            "exports neither xpu:plugin/driver nor xpu:plugin/analyzer (it exports: {})",
            if exports.is_empty() {
                "nothing".to_string()
            } else {
                exports.join(", ")
            }
        );
    };
    let Some(bindings) = Api::of(&api) else {
        bail!(
            "built against xpu:plugin@{api}, which this host does not implement (it implements {})",
            crate::runtime::SUPPORTED_APIS
        );
    };
    Ok(Inspection {
        kind,
        api,
        bindings,
        imports,
        exports,
    })
}
