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
pub mod cuda;
pub mod engine;
pub mod frames;
pub mod inference;
pub mod limits;
pub mod log;
pub mod models;
pub mod nvml;
pub mod preprocess;
pub mod sandbox;
pub mod shm;
pub mod stderr;
pub mod worker;

pub use engine::{Runtime, RuntimeOptions};
pub use limits::PluginLimits;
pub use sandbox::{Launch, PluginState, Sandbox};

pub use bindings::Api;

/// The WIT API versions this host implements (`xpu:plugin@X`), for messages.
pub const SUPPORTED_APIS: &str = "0.1.0, 0.2.0";
