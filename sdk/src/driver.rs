//! Accelerator driver plugins: the `driver-plugin` world.
//!
//! ```no_run
//! use xpud_sdk::driver::*;
//!
//! struct MyDriver { cards: u32 }
//!
//! impl Driver for MyDriver {
//!     fn init(config: Config) -> Result<(Self, DriverInfo), DriverError> {
//!         let cards = config.parse_or("cards", 1)?;
//!         let info = DriverInfo {
//!             vendor: "ACME".into(),
//!             version: env!("CARGO_PKG_VERSION").into(),
//!             accelerator_types: vec!["ACME_X1".into()],
//!             simulated: false,
//!         };
//!         Ok((MyDriver { cards }, info))
//!     }
//!     fn devices(&mut self) -> Result<Vec<Device>, DriverError> { Ok(vec![]) }
//!     fn sample(&mut self) -> Result<Metrics, DriverError> {
//!         Ok(Metrics { cards: vec![], instances: vec![] })
//!     }
//! }
//!
//! xpud_sdk::export_driver!(MyDriver);
//! ```

use std::cell::RefCell;
use std::str::FromStr;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit/v0.2.0",
        world: "driver-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_driver_world",
        default_bindings_module: "xpud_sdk::driver::bindings",
        runtime_path: "xpud_sdk::__wit_bindgen::rt",
    });
}

pub use bindings::exports::xpu::plugin::driver::Guest as __Guest;
/// A sample with its devices' version: what the export glue answers.
#[doc(hidden)]
pub use bindings::exports::xpu::plugin::driver::Reading;
pub use bindings::xpu::plugin::driver_types::{
    CardMetrics, Device, DriverError, DriverInfo, Health, InstanceMetrics, Isolation, Label,
    Metrics, Partition, PartitionSpec, Slicing,
};

/// NVIDIA's management library, bridged by the host (`xpu:plugin/nvml`).
///
/// Calls need the manifest's `[grants] nvml = "read"` (`"manage"` to create and
/// destroy MIG instances); where the host has no NVML they answer
/// [`NvmlError::Unavailable`](nvml::NvmlError::Unavailable).
pub mod nvml {
    pub use super::bindings::xpu::plugin::nvml::*;

    /// A figure NVML could not read, in [`Readings::values`].
    pub const BLANK: u64 = u64::MAX;

    /// A value of [`Readings::values`]: `None` where it is blank.
    pub fn figure(value: u64) -> Option<u64> {
        (value != BLANK).then_some(value)
    }

    impl Readings {
        /// The values of the device at `position` in the list asked (one per field
        /// asked, `fields` of them, in that order), or why it could not be read.
        pub fn device(&self, position: usize, fields: usize) -> Result<&[u64], NvmlError> {
            if let Some((_, e)) = self.failed.iter().find(|(p, _)| *p as usize == position) {
                return Err(e.clone());
            }
            position
                .checked_mul(fields)
                .and_then(|start| self.values.get(start..start.checked_add(fields)?))
                .ok_or_else(|| {
                    NvmlError::Failed(format!(
                        "the bridge answered no figures for device {position}"
                    ))
                })
        }
    }
}

/// The `[config]` table of the plugin's manifest, as the host passed it.
#[derive(Clone, Debug, Default)]
pub struct Config(Vec<(String, String)>);

impl Config {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Config(pairs)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Parses `key`, or returns `default` when it is absent. A value that does not
    /// parse is an `invalid-argument` error naming the key.
    pub fn parse_or<T: FromStr>(&self, key: &str, default: T) -> Result<T, DriverError> {
        match self.get(key) {
            None => Ok(default),
            Some(raw) => raw.trim().parse().map_err(|_| {
                DriverError::InvalidArgument(format!("config `{key}`: cannot parse {raw:?}"))
            }),
        }
    }
}

/// What an accelerator driver does. Only `init`, `devices` and `sample` are required:
/// a driver that cannot partition keeps the defaults, which answer `unsupported`.
pub trait Driver: Sized + 'static {
    /// Reads the manifest's config and probes the hardware. Called once per instance.
    fn init(config: Config) -> Result<(Self, DriverInfo), DriverError>;

    fn devices(&mut self) -> Result<Vec<Device>, DriverError>;

    /// Current figures of every card and every partition; unknown figures are `None`.
    fn sample(&mut self) -> Result<Metrics, DriverError>;

    /// A number that changes whenever [`devices`](Driver::devices) would answer
    /// differently: a card came or went, or changed health, type or memory. Asked
    /// right after each [`sample`](Driver::sample); the host then asks for the
    /// devices only when it changed. The default, `None`, has the host ask for them
    /// after every sample.
    fn devices_version(&self) -> Option<u64> {
        None
    }

    fn create_partition(&mut self, spec: PartitionSpec) -> Result<Partition, DriverError> {
        let _ = spec;
        Err(DriverError::Unsupported(
            "this driver cannot partition devices".into(),
        ))
    }

    fn destroy_partition(&mut self, id: String) -> Result<(), DriverError> {
        Err(DriverError::NotFound(format!("no partition {id}")))
    }

    fn partitions(&mut self) -> Result<Vec<Partition>, DriverError> {
        Ok(Vec::new())
    }

    /// Scheduling labels. The default derives the common ones from `devices`.
    fn labels(&mut self) -> Result<Vec<Label>, DriverError> {
        Ok(standard_labels(&self.devices()?))
    }

    /// The device a process is given to do partition `id`'s work, as the vendor's
    /// runtime names it (for NVIDIA, a `CUDA_VISIBLE_DEVICES` value: a MIG
    /// instance's uuid, or a time slice's card's): the host runs the models of the
    /// partition's replicas in a process of their own that sees only it. The
    /// default, `None`, keeps them in the host's process.
    fn partition_device(&mut self, id: &str) -> Result<Option<String>, DriverError> {
        let _ = id;
        Ok(None)
    }

    /// Process `pid` now does partition `id`'s work (the host says so after each
    /// start of the process `partition_device` named): what the device measures of
    /// it is the partition's usage. The default keeps no record: a driver that
    /// names no devices is never told.
    fn bind_process(&mut self, id: &str, pid: u32) -> Result<(), DriverError> {
        let _ = pid;
        Err(DriverError::Unsupported(format!(
            "this driver does not measure partition {id} by process"
        )))
    }
}

/// Labels every driver should publish for its devices (§10.3: the node's scheduling
/// labels carry the accelerator type): presence, count, model(s) and memory.
pub fn standard_labels(devices: &[Device]) -> Vec<Label> {
    let label = |key: &str, value: String| Label {
        key: key.to_string(),
        value,
    };
    let mut labels = vec![
        label("xpu.present", (!devices.is_empty()).to_string()),
        label("xpu.count", devices.len().to_string()),
    ];
    let mut models: Vec<&str> = devices
        .iter()
        .map(|d| d.accelerator_type.as_str())
        .collect();
    models.sort_unstable();
    models.dedup();
    if !models.is_empty() {
        labels.push(label("xpu.model", models.join(".")));
    }
    if let Some(min_memory) = devices.iter().filter_map(|d| d.memory_total_mib).min() {
        labels.push(label("xpu.memory-mib", min_memory.to_string()));
    }
    labels
}

thread_local! {
    static INSTANCE: RefCell<Option<Box<dyn std::any::Any>>> = const { RefCell::new(None) };
}

fn with_driver<D: Driver, R>(
    f: impl FnOnce(&mut D) -> Result<R, DriverError>,
) -> Result<R, DriverError> {
    INSTANCE.with(|cell| {
        let mut slot = cell.borrow_mut();
        match slot.as_mut().and_then(|any| any.downcast_mut::<D>()) {
            Some(driver) => f(driver),
            None => Err(DriverError::InvalidArgument(
                "driver used before init".into(),
            )),
        }
    })
}

/// Glue between the generated `Guest` trait and a [`Driver`]; used by [`export_driver!`].
#[doc(hidden)]
pub mod glue {
    use super::*;

    pub fn init<D: Driver>(config: Vec<(String, String)>) -> Result<DriverInfo, DriverError> {
        let (driver, info) = D::init(Config::new(config))?;
        INSTANCE.with(|cell| *cell.borrow_mut() = Some(Box::new(driver)));
        Ok(info)
    }
    pub fn devices<D: Driver>() -> Result<Vec<Device>, DriverError> {
        with_driver::<D, _>(|d| d.devices())
    }
    pub fn sample<D: Driver>() -> Result<Reading, DriverError> {
        with_driver::<D, _>(|d| {
            let metrics = d.sample()?;
            Ok(Reading {
                metrics,
                devices_version: d.devices_version(),
            })
        })
    }
    pub fn create_partition<D: Driver>(spec: PartitionSpec) -> Result<Partition, DriverError> {
        with_driver::<D, _>(|d| d.create_partition(spec))
    }
    pub fn destroy_partition<D: Driver>(id: String) -> Result<(), DriverError> {
        with_driver::<D, _>(|d| d.destroy_partition(id))
    }
    pub fn partitions<D: Driver>() -> Result<Vec<Partition>, DriverError> {
        with_driver::<D, _>(|d| d.partitions())
    }
    pub fn labels<D: Driver>() -> Result<Vec<Label>, DriverError> {
        with_driver::<D, _>(|d| d.labels())
    }
    pub fn partition_device<D: Driver>(id: String) -> Result<Option<String>, DriverError> {
        with_driver::<D, _>(|d| d.partition_device(&id))
    }
    pub fn bind_process<D: Driver>(id: String, pid: u32) -> Result<(), DriverError> {
        with_driver::<D, _>(|d| d.bind_process(&id, pid))
    }
}

/// Exports a [`Driver`] implementation as the plugin's `xpu:plugin/driver` interface.
#[macro_export]
macro_rules! export_driver {
    ($driver:ty) => {
        struct __XpudDriverExport;

        impl $crate::driver::__Guest for __XpudDriverExport {
            fn init(
                config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
            ) -> ::std::result::Result<$crate::driver::DriverInfo, $crate::driver::DriverError> {
                $crate::driver::glue::init::<$driver>(config)
            }
            fn devices() -> ::std::result::Result<
                ::std::vec::Vec<$crate::driver::Device>,
                $crate::driver::DriverError,
            > {
                $crate::driver::glue::devices::<$driver>()
            }
            fn sample(
            ) -> ::std::result::Result<$crate::driver::Reading, $crate::driver::DriverError> {
                $crate::driver::glue::sample::<$driver>()
            }
            fn create_partition(
                spec: $crate::driver::PartitionSpec,
            ) -> ::std::result::Result<$crate::driver::Partition, $crate::driver::DriverError>
            {
                $crate::driver::glue::create_partition::<$driver>(spec)
            }
            fn destroy_partition(
                id: ::std::string::String,
            ) -> ::std::result::Result<(), $crate::driver::DriverError> {
                $crate::driver::glue::destroy_partition::<$driver>(id)
            }
            fn partitions() -> ::std::result::Result<
                ::std::vec::Vec<$crate::driver::Partition>,
                $crate::driver::DriverError,
            > {
                $crate::driver::glue::partitions::<$driver>()
            }
            fn labels() -> ::std::result::Result<
                ::std::vec::Vec<$crate::driver::Label>,
                $crate::driver::DriverError,
            > {
                $crate::driver::glue::labels::<$driver>()
            }
            fn partition_device(
                id: ::std::string::String,
            ) -> ::std::result::Result<
                ::std::option::Option<::std::string::String>,
                $crate::driver::DriverError,
            > {
                $crate::driver::glue::partition_device::<$driver>(id)
            }
            fn bind_process(
                id: ::std::string::String,
                pid: u32,
            ) -> ::std::result::Result<(), $crate::driver::DriverError> {
                $crate::driver::glue::bind_process::<$driver>(id, pid)
            }
        }

        $crate::driver::bindings::__export_driver_world!(
            __XpudDriverExport with_types_in $crate::driver::bindings
        );
    };
}
