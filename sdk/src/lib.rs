//! # xpud-sdk: write xpud plugins as small Rust crates
//!
//! An xpud plugin is a WebAssembly component built for `wasm32-wasip2`. This crate
//! generates the bindings of the `xpu:plugin@0.2.0` WIT package (`wit/v0.2.0` in the
//! xpud repository) and hides them behind one trait per world:
//!
//! - feature `driver`: implement [`driver::Driver`] and call [`export_driver!`] for an
//!   accelerator driver (device discovery, metrics, partitions, labels);
//! - feature `algorithm`: implement [`algorithm::Analyzer`] and call
//!   [`export_algorithm!`] for an analysis algorithm (rules in, events out).
//!
//! Enable exactly one of the two features: a world's bindings carry that world's
//! component type, and a plugin must import and export no more than its world names.
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//! [dependencies]
//! xpud-sdk = { version = "0.1", features = ["driver"] }
//! ```
//!
//! Build with `cargo build --target wasm32-wasip2 --release`, then describe the
//! `.wasm` with a manifest (see `docs/plugins.md`) and drop both into xpud's plugin
//! directory.

// The generated bindings name this crate by its public path, so that the export
// macros work when expanded inside a plugin crate.
extern crate self as xpud_sdk;

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// The WIT API version this SDK implements.
pub const API_VERSION: &str = "0.2.0";

pub mod log;

#[cfg(feature = "driver")]
pub mod driver;

#[cfg(feature = "algorithm")]
pub mod algorithm;
