//! Plugins: manifests, the plugin directory, and the life of plugin instances.
//!
//! Life cycle: the directory is scanned at start and watched ([`watcher`]); each
//! `NAME.toml` + `NAME.wasm` pair is verified (manifest, sha256, API version, the
//! world's export, links against the host) and compiled through the cache
//! ([`registry`]); a loaded plugin runs under a [`supervisor`] that restarts it with
//! backoff and marks it unhealthy past its restart budget.

pub mod algorithm;
pub mod calls;
pub mod contract;
pub mod driver;
pub mod inspect;
pub mod manifest;
pub mod registry;
pub mod supervisor;
pub mod watcher;

pub use manifest::{Kind, Manifest};
pub use registry::{Registry, RegistryOptions};
