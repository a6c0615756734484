//! The WebAssembly runtime: one engine, its compile cache, and the host side of the
//! WIT contracts. Plugins' life cycle (loading, supervising) lives in `crate::plugins`.
//!
//! Like Spin's core crate, this is a thin layer that narrows wasmtime to what xpud
//! uses; each capability a plugin can import is its own module (`log`, `frames`,
//! `inference`), and `sandbox` builds the per-instance store that enforces grants
//! and limits.

pub mod batching;
pub mod bindings;
pub mod cache;
pub mod clocks;
pub mod engine;
pub mod frames;
pub mod inference;
pub mod limits;
pub mod log;
pub mod models;
pub mod preprocess;
pub mod sandbox;
pub mod stderr;

pub use engine::{Runtime, RuntimeOptions};
pub use limits::PluginLimits;
pub use sandbox::{Launch, PluginState, Sandbox};

/// The WIT API versions this host implements (`xpu:plugin@X`): a plugin built against
/// any semver-compatible version links.
pub const SUPPORTED_API: &str = "0.1.0";

/// Whether a plugin built against `api` can run here (same major, or same minor
/// while the major is 0, and not newer than what the host implements).
pub fn api_supported(api: &semver::Version) -> bool {
    let host = semver::Version::parse(SUPPORTED_API).expect("SUPPORTED_API is semver");
    let compatible = if host.major == 0 {
        api.major == 0 && api.minor == host.minor
    } else {
        api.major == host.major
    };
    compatible && api <= &host
}
