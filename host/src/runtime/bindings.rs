//! Host bindings of the `xpu:plugin@0.1.0` worlds, generated from `wit/v0.1.0`.
//!
//! A later API version gets its own `bindgen!` here (Zed's pattern): unchanged
//! interfaces map onto these types with `with:`, changed ones convert with `From`.
//! Every import is trappable: a plugin that hands the host a bad resource handle
//! traps instead of taking the host down.

pub mod driver {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "driver-plugin",
        imports: { default: trappable },
    });
}

pub mod algorithm {
    wasmtime::component::bindgen!({
        path: "../wit/v0.1.0",
        world: "algorithm-plugin",
        imports: { default: trappable },
        with: {
            "xpu:plugin/log": super::driver::xpu::plugin::log,
            "xpu:plugin/frames.frame": crate::runtime::frames::Frame,
            "xpu:plugin/inference.model": crate::runtime::inference::Model,
        },
    });
}

pub use algorithm::exports::xpu::plugin::analyzer;
pub use algorithm::xpu::plugin::{frames as wit_frames, inference as wit_inference};
pub use driver::exports::xpu::plugin::driver as wit_driver;
pub use driver::xpu::plugin::driver_types;
