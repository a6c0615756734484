//! nvidia: NVIDIA GPUs through the host's NVML bridge (`xpu:plugin/nvml@0.2.0`).
//!
//! Cards are named by the standard's type names (`models`), read every sampling
//! round (utilisation, memory, decoder, temperature, power), and partitioned: MIG
//! instances where the card is in MIG mode (`mig`: hard isolation, space slicing),
//! time-sliced quotas the host enforces otherwise. Without NVML on the machine the
//! driver loads and reports no cards, saying why once.
//!
//! The manifest grants `nvml = "manage"` (MIG instances are created and destroyed);
//! an operator who wants no MIG changes grants `"read"` and gets `unsupported` for
//! MIG partitions.

mod bridge;
mod driver;
mod mig;
mod models;

pub use bridge::{HostNvml, Nvml};
pub use driver::Nvidia;

xpud_sdk::export_driver!(Nvidia<HostNvml>);
