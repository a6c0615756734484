//! The integration tests, one module per area, in one binary: one link and one copy
//! of wasmtime on disk instead of one per area.

mod support;

mod api_algorithms;
mod api_clusters;
mod api_machine_packages;
mod api_monitors;
mod api_services;
mod api_workloads;
mod auth;
mod cli;
mod hostile;
mod interop;
mod metrics;
mod nvidia;
mod openapi;
mod platform;
mod plugin_host;
mod restart;
mod serve;
mod video;
