//! The on-disk cache of compiled components.
//!
//! Compiling a component takes tens of milliseconds; loading its compiled form takes
//! well under one. Entries are keyed by the wasm's sha256 and by the engine's
//! compatibility hash (wasmtime version plus every setting that changes code), so a
//! wasmtime upgrade or a config change misses instead of loading stale code.
//! Entries are only ever written by this process into its own data directory:
//! deserializing is `unsafe` in wasmtime because compiled code is trusted.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use wasmtime::component::Component;
use wasmtime::Engine;

#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
    engine_key: String,
}

/// How a component came to be in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LoadedFrom {
    Cache,
    Compiled,
}

#[derive(Clone, Copy, Debug)]
pub struct LoadReport {
    pub from: LoadedFrom,
    pub took: Duration,
}

impl CompileCache {
    pub fn new(dir: &Path, engine: &Engine) -> anyhow::Result<CompileCache> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("create compile cache {}", dir.display()))?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(CompileCache {
            dir: dir.to_path_buf(),
            engine_key: format!("{:016x}", hasher.finish()),
        })
    }

    fn entry(&self, wasm_sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{wasm_sha256}-{}.cwasm", self.engine_key))
    }

    /// Loads `wasm` (whose sha256 the caller verified) from the cache, or compiles it
    /// and stores the result. A corrupt entry is removed and recompiled.
    pub fn load(
        &self,
        engine: &Engine,
        wasm: &[u8],
        wasm_sha256: &str,
    ) -> anyhow::Result<(Component, LoadReport)> {
        let started = Instant::now();
        let entry = self.entry(wasm_sha256);
        if entry.exists() {
            // SAFETY: entries are written only by `store` below, into our own data
            // directory, from code this engine compiled.
            match unsafe { Component::deserialize_file(engine, &entry) } {
                Ok(component) => {
                    let report = LoadReport {
                        from: LoadedFrom::Cache,
                        took: started.elapsed(),
                    };
                    return Ok((component, report));
                }
                Err(e) => {
                    tracing::warn!(entry = %entry.display(), "unusable compile cache entry, recompiling: {e:#}");
                    let _ = std::fs::remove_file(&entry);
                }
            }
        }
        let component = Component::from_binary(engine, wasm)?;
        if let Err(e) = self.store(&entry, &component) {
            // The cache is an optimisation: a full disk costs speed, not service.
            tracing::warn!(entry = %entry.display(), "cannot write compile cache: {e:#}");
        }
        let report = LoadReport {
            from: LoadedFrom::Compiled,
            took: started.elapsed(),
        };
        Ok((component, report))
    }

    fn store(&self, entry: &Path, component: &Component) -> anyhow::Result<()> {
        let bytes = component.serialize()?;
        let tmp = entry.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, entry)?;
        Ok(())
    }
}
