//! xpud: a video-analytics central compute server whose accelerator drivers and
//! analysis algorithms are sandboxed WebAssembly components.
//!
//! - [`runtime`]: the wasmtime engine, compile cache and host side of the WIT contracts;
//! - [`plugins`]: manifests, the plugin directory, supervision of plugin instances;
//! - [`http`]: the HTTP API;
//! - [`config`]: `xpud serve` configuration with embedded defaults.

pub mod auth;
pub mod children;
pub mod clusters;
pub mod config;
pub mod dates;
pub mod error;
pub mod evacuation;
pub mod fetch;
pub mod files;
pub mod http;
pub mod machine;
pub mod machine_packages;
pub mod metrics;
pub mod package;
pub mod packages;
pub mod pipeline;
pub mod platform;
pub mod plugins;
pub mod runtime;
pub mod sampler;
pub mod scheduler;
pub mod server;
pub mod services;
pub mod store;
pub mod sync;
pub mod tasks;
pub mod text;
pub mod tls;
pub mod toml_input;
pub mod transport;
pub mod workloads;
