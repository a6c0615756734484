//! sim-xpu: a simulated accelerator driver.
//!
//! It is what runs where no hardware exists, and it says so: its accelerator type is
//! `SIMULATED_<MODEL>` and its driver info has `simulated = true`. Its metrics move
//! plausibly with time and with the partitions created on it; its partition
//! bookkeeping is real (quota accounting, over-commit refused, typed errors for modes
//! it cannot do).
//!
//! Config (`[config]` in the manifest): `cards` (default 2), `model` (default
//! "XPU16"), `memory-mib` per card (default 16384), `decoders`/`encoders` per card
//! (default 2/1), `max-partitions-per-card` (default 7).

mod sim;

pub use sim::SimXpu;

xpud_sdk::export_driver!(SimXpu);
