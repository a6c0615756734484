//! Host bindings of the `xpu:plugin` worlds, one module per released API version
//! (Zed's pattern): `wit/v0.1.0` here, `wit/v0.2.0` in [`v0_2`].
//!
//! The host works in the 0.1 types. A later version maps the interfaces whose types
//! did not change onto them with `with:`; an interface it imports under its own name
//! (`log@0.2.0`, `frames@0.2.0`, ...) has host functions that delegate to the 0.1
//! ones, converting with `From`. Every import is trappable: a plugin that hands the
//! host a bad resource handle traps instead of taking the host down.

pub mod v0_2;

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

use wasmtime::component::{InstancePre, Resource, ResourceAny};
use wasmtime::Store;

use crate::runtime::frames::Frame;
use crate::runtime::PluginState;
use analyzer::{AnalyzerError, Event, Rule};
use driver_types::{Device, DriverError, DriverInfo, Label, Metrics, Partition, PartitionSpec};

/// The API versions this host implements, each with its own bindings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    V0_1,
    V0_2,
}

impl Api {
    pub const ALL: [Api; 2] = [Api::V0_1, Api::V0_2];

    pub fn version(self) -> semver::Version {
        match self {
            Api::V0_1 => semver::Version::new(0, 1, 0),
            Api::V0_2 => semver::Version::new(0, 2, 0),
        }
    }

    /// The bindings a plugin built against `api` runs with: the newest implemented
    /// version it is semver-compatible with (same minor while the major is 0), and
    /// not newer than what the host implements.
    pub fn of(api: &semver::Version) -> Option<Api> {
        Api::ALL.into_iter().find(|implemented| {
            let host = implemented.version();
            api.major == 0 && api.minor == host.minor && api <= &host
        })
    }
}

/// A driver component, linked and type-checked against its API version's world.
#[derive(Clone)]
pub enum DriverPre {
    V0_1(driver::DriverPluginPre<PluginState>),
    V0_2(v0_2::driver::DriverPluginPre<PluginState>),
}

impl DriverPre {
    pub fn new(api: Api, pre: InstancePre<PluginState>) -> wasmtime::Result<DriverPre> {
        Ok(match api {
            Api::V0_1 => DriverPre::V0_1(driver::DriverPluginPre::new(pre)?),
            Api::V0_2 => DriverPre::V0_2(v0_2::driver::DriverPluginPre::new(pre)?),
        })
    }

    pub fn instantiate(&self, store: &mut Store<PluginState>) -> wasmtime::Result<DriverBindings> {
        Ok(match self {
            DriverPre::V0_1(pre) => DriverBindings::V0_1(pre.instantiate(store)?),
            DriverPre::V0_2(pre) => DriverBindings::V0_2(pre.instantiate(store)?),
        })
    }
}

/// A driver instance. Its `driver` interface has the same types in every version,
/// so a call is the same call on either; only 0.2's `sample` answers more.
pub enum DriverBindings {
    V0_1(driver::DriverPlugin),
    V0_2(v0_2::driver::DriverPlugin),
}

macro_rules! driver_call {
    ($self:ident, $method:ident($store:expr $(, $arg:expr)*)) => {
        match $self {
            DriverBindings::V0_1(b) => b.xpu_plugin_driver().$method($store $(, $arg)*),
            DriverBindings::V0_2(b) => b.xpu_plugin_driver().$method($store $(, $arg)*),
        }
    };
}

type Answer<T, E> = wasmtime::Result<Result<T, E>>;

impl DriverBindings {
    pub fn init(
        &self,
        store: &mut Store<PluginState>,
        config: &[(String, String)],
    ) -> Answer<DriverInfo, DriverError> {
        driver_call!(self, call_init(store, config))
    }
    pub fn devices(&self, store: &mut Store<PluginState>) -> Answer<Vec<Device>, DriverError> {
        driver_call!(self, call_devices(store))
    }
    /// The figures, and the version of the devices they belong to (0.1 drivers keep
    /// none).
    pub fn sample(
        &self,
        store: &mut Store<PluginState>,
    ) -> Answer<(Metrics, Option<u64>), DriverError> {
        Ok(match self {
            DriverBindings::V0_1(b) => b
                .xpu_plugin_driver()
                .call_sample(store)?
                .map(|metrics| (metrics, None)),
            DriverBindings::V0_2(b) => b
                .xpu_plugin_driver()
                .call_sample(store)?
                .map(|reading| (reading.metrics, reading.devices_version)),
        })
    }
    pub fn create_partition(
        &self,
        store: &mut Store<PluginState>,
        spec: PartitionSpec,
    ) -> Answer<Partition, DriverError> {
        driver_call!(self, call_create_partition(store, spec))
    }
    pub fn destroy_partition(
        &self,
        store: &mut Store<PluginState>,
        id: &str,
    ) -> Answer<(), DriverError> {
        driver_call!(self, call_destroy_partition(store, id))
    }
    pub fn partitions(
        &self,
        store: &mut Store<PluginState>,
    ) -> Answer<Vec<Partition>, DriverError> {
        driver_call!(self, call_partitions(store))
    }
    pub fn labels(&self, store: &mut Store<PluginState>) -> Answer<Vec<Label>, DriverError> {
        driver_call!(self, call_labels(store))
    }
    /// The device of a partition of its own; API 0.1 has none to tell.
    pub fn partition_device(
        &self,
        store: &mut Store<PluginState>,
        id: &str,
    ) -> Answer<Option<String>, DriverError> {
        match self {
            DriverBindings::V0_1(_) => Ok(Ok(None)),
            DriverBindings::V0_2(b) => b.xpu_plugin_driver().call_partition_device(store, id),
        }
    }
    /// Names the process that does a partition's work; API 0.1 names no device
    /// such a process is given, so it is never told.
    pub fn bind_process(
        &self,
        store: &mut Store<PluginState>,
        id: &str,
        pid: u32,
    ) -> Answer<(), DriverError> {
        match self {
            DriverBindings::V0_1(_) => Ok(Err(DriverError::Unsupported(
                "API 0.1 drivers do not measure partitions by process".into(),
            ))),
            DriverBindings::V0_2(b) => b.xpu_plugin_driver().call_bind_process(store, id, pid),
        }
    }
}

/// An algorithm component, linked and type-checked against its API version's world.
#[derive(Clone)]
pub enum AlgorithmPre {
    V0_1(algorithm::AlgorithmPluginPre<PluginState>),
    V0_2(v0_2::algorithm::AlgorithmPluginPre<PluginState>),
}

impl AlgorithmPre {
    pub fn new(api: Api, pre: InstancePre<PluginState>) -> wasmtime::Result<AlgorithmPre> {
        Ok(match api {
            Api::V0_1 => AlgorithmPre::V0_1(algorithm::AlgorithmPluginPre::new(pre)?),
            Api::V0_2 => AlgorithmPre::V0_2(v0_2::algorithm::AlgorithmPluginPre::new(pre)?),
        })
    }

    pub fn instantiate(
        &self,
        store: &mut Store<PluginState>,
    ) -> wasmtime::Result<AlgorithmBindings> {
        Ok(match self {
            AlgorithmPre::V0_1(pre) => AlgorithmBindings::V0_1(pre.instantiate(store)?),
            AlgorithmPre::V0_2(pre) => AlgorithmBindings::V0_2(pre.instantiate(store)?),
        })
    }
}

/// An algorithm instance; a 0.2 one's rules and events convert from and to 0.1's.
pub enum AlgorithmBindings {
    V0_1(algorithm::AlgorithmPlugin),
    V0_2(v0_2::algorithm::AlgorithmPlugin),
}

impl AlgorithmBindings {
    /// Opens a session: the guest's `session` resource.
    pub fn open(
        &self,
        store: &mut Store<PluginState>,
        rules: &[Rule],
    ) -> Answer<ResourceAny, AnalyzerError> {
        match self {
            AlgorithmBindings::V0_1(b) => b.xpu_plugin_analyzer().session().call_open(store, rules),
            AlgorithmBindings::V0_2(b) => {
                let rules: Vec<_> = rules.iter().map(Into::into).collect();
                let opened = b.xpu_plugin_analyzer().session().call_open(store, &rules)?;
                Ok(opened.map_err(Into::into))
            }
        }
    }

    /// Runs `session` on the frame behind `frame`.
    pub fn process(
        &self,
        store: &mut Store<PluginState>,
        session: ResourceAny,
        frame: Resource<Frame>,
    ) -> Answer<Vec<Event>, AnalyzerError> {
        match self {
            AlgorithmBindings::V0_1(b) => b
                .xpu_plugin_analyzer()
                .session()
                .call_process(store, session, frame),
            AlgorithmBindings::V0_2(b) => {
                let events = b
                    .xpu_plugin_analyzer()
                    .session()
                    .call_process(store, session, frame)?;
                Ok(events
                    .map(|events| events.into_iter().map(Into::into).collect())
                    .map_err(Into::into))
            }
        }
    }
}
