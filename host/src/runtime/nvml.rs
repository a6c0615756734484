//! The host side of `xpu:plugin/nvml@0.2.0`: NVIDIA's management library, loaded at
//! run time through `nvml-wrapper` (dlopen of `libnvidia-ml.so.1`).
//!
//! One library handle serves every plugin. Where the library is absent or does not
//! initialise, calls answer `unavailable` with the reason, and the load is tried
//! again at most once a minute (a driver installed later is picked up). NVML's MIG
//! calls that `nvml-wrapper` does not wrap are made through its loaded symbol table.
//!
//! The calls are public for native callers too (the benchmarks' baseline runs the
//! nvidia driver's code natively over them). What a plugin can make the host
//! allocate is bounded: at most `MAX_DEVICES` devices (and `MAX_FIELDS` fields of
//! each), `MAX_PROCESSES` processes and `MAX_MIG` MIG instances per answer.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::{nvml_sym, nvml_try, NvmlError};
use nvml_wrapper::Nvml;
use nvml_wrapper_sys::bindings as sys;

use super::bindings::v0_2::driver::xpu::plugin::nvml::{
    self as wit, DeviceInfo, Field, MigInstance, MigProfile, MigState, NvmlError as Error,
    ProcessUsage, Readings,
};
use super::PluginState;

pub const MAX_DEVICES: u32 = 64;
/// Fields one `sample` call may ask for (there are 10; a field may be repeated).
pub const MAX_FIELDS: usize = 32;
/// A figure NVML could not read, in `sample`'s flat list of values.
pub const BLANK: u64 = u64::MAX;
pub const MAX_PROCESSES: usize = 256;
pub const MAX_MIG: usize = 64;
/// How long a failed load is remembered before the library is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// The window of per-process utilisation samples asked for.
const PROCESS_WINDOW: Duration = Duration::from_secs(5);

/// What a plugin's manifest is granted (`[grants] nvml`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum NvmlGrant {
    #[default]
    None,
    /// Every query.
    Read,
    /// Queries, and creating and destroying MIG instances.
    Manage,
}

#[derive(Debug)]
enum State {
    NotTried,
    Failed { reason: String, at: Instant },
}

/// The process-wide NVML handle, loaded on first use.
#[derive(Debug)]
pub struct NvmlBridge {
    library: Option<PathBuf>,
    /// Set once the library is loaded: every NVML call of every plugin reads it,
    /// without the lock.
    loaded: OnceLock<Arc<Nvml>>,
    state: Mutex<State>,
}

impl NvmlBridge {
    /// `library`: a path or file name to load instead of `libnvidia-ml.so.1`.
    pub fn new(library: Option<PathBuf>) -> Arc<NvmlBridge> {
        Arc::new(NvmlBridge {
            library,
            loaded: OnceLock::new(),
            state: Mutex::new(State::NotTried),
        })
    }

    /// The loaded library, or why there is none. Borrowed: a plugin's NVML call
    /// reads it without touching a shared count.
    pub fn get(&self) -> Result<&Arc<Nvml>, String> {
        if let Some(nvml) = self.loaded.get() {
            return Ok(nvml);
        }
        let mut state = crate::sync::lock(&self.state);
        // Another caller may have loaded it while this one waited for the lock.
        if let Some(nvml) = self.loaded.get() {
            return Ok(nvml);
        }
        match &*state {
            State::Failed { reason, at } if at.elapsed() < RETRY_AFTER => {
                return Err(reason.clone())
            }
            _ => {}
        }
        match open(self.library.as_deref()) {
            Ok(nvml) => {
                let version = nvml.sys_driver_version().unwrap_or_default();
                let library = self.library.as_deref().unwrap_or(Path::new(LIBRARY));
                tracing::info!(library = %library.display(), driver = %version, "NVML loaded");
                Ok(self.loaded.get_or_init(|| Arc::new(nvml)))
            }
            Err(reason) => {
                if matches!(*state, State::NotTried) {
                    tracing::info!("{reason}; NVIDIA devices cannot be read");
                }
                *state = State::Failed {
                    reason: reason.clone(),
                    at: Instant::now(),
                };
                Err(reason)
            }
        }
    }
}

/// NVML where the configuration names no library.
const LIBRARY: &str = "libnvidia-ml.so.1";

/// Loads and initialises NVML from `library`, else [`LIBRARY`]; or says why it
/// cannot be.
pub fn open(library: Option<&Path>) -> Result<Nvml, String> {
    let name = library.unwrap_or(Path::new(LIBRARY));
    Nvml::builder()
        .lib_path(name.as_os_str())
        .init()
        .map_err(|e| format!("NVML ({}) is unavailable: {e}", name.display()))
}

/// What one plugin instance may do with the bridge.
#[derive(Clone, Debug)]
pub struct NvmlAccess {
    pub bridge: Arc<NvmlBridge>,
    pub grant: NvmlGrant,
}

impl NvmlGrant {
    /// The entry of the operator's `allowed-grants` that allows this grant.
    pub fn allowed_as(self) -> Option<&'static str> {
        match self {
            NvmlGrant::None => None,
            NvmlGrant::Read => Some("nvml"),
            NvmlGrant::Manage => Some("nvml:manage"),
        }
    }
}

impl NvmlAccess {
    fn nvml(&self, needs: NvmlGrant) -> Result<&Nvml, Error> {
        if self.grant < needs {
            return Err(Error::NoPermission(match needs {
                NvmlGrant::Manage => {
                    "changing MIG instances needs the manifest's [grants] nvml = \"manage\"".into()
                }
                _ => "NVML needs the manifest's [grants] nvml = \"read\"".into(),
            }));
        }
        self.bridge
            .get()
            .map(|nvml| &**nvml)
            .map_err(Error::Unavailable)
    }
}

/// NVML's error, as the contract names it.
fn error(e: NvmlError) -> Error {
    let text = e.to_string();
    match e {
        NvmlError::NotSupported => Error::NotSupported(text),
        NvmlError::NoPermission => Error::NoPermission(text),
        NvmlError::NotFound | NvmlError::InvalidArg => Error::NotFound(text),
        NvmlError::InUse | NvmlError::InsufficientMemory => Error::InsufficientResources(text),
        NvmlError::GpuLost | NvmlError::ResetRequired => Error::GpuLost(text),
        NvmlError::Uninitialized
        | NvmlError::DriverNotLoaded
        | NvmlError::LibraryNotFound
        | NvmlError::FunctionNotFound
        | NvmlError::LibloadingError(_)
        | NvmlError::FailedToLoadSymbol(_) => Error::Unavailable(text),
        _ => Error::Failed(text),
    }
}

/// A figure NVML could not read for this device is absent; a lost GPU is not a
/// missing figure, it fails the whole answer.
fn figure<T>(answer: Result<T, NvmlError>) -> Result<Option<T>, Error> {
    match answer {
        Ok(value) => Ok(Some(value)),
        Err(e @ (NvmlError::GpuLost | NvmlError::ResetRequired)) => Err(error(e)),
        Err(_) => Ok(None),
    }
}

fn device(nvml: &Nvml, index: u32) -> Result<nvml_wrapper::Device<'_>, Error> {
    if index >= MAX_DEVICES {
        return Err(Error::NotFound(format!("no device {index}")));
    }
    nvml.device_by_index(index).map_err(error)
}

/// Memory through NVML's v2 call (which tells reserved memory apart), or v1 on
/// drivers older than 510 that lack it: (total, used) bytes.
fn memory(nvml: &Nvml, dev: &nvml_wrapper::Device<'_>) -> Result<(u64, u64), NvmlError> {
    // The symbol is looked at first: asking the wrapper for a missing one formats
    // the loader's error message, on every sample of every card.
    if nvml.lib().nvmlDeviceGetMemoryInfo_v2.is_ok() {
        match dev.memory_info() {
            Ok(info) => return Ok((info.total, info.used)),
            // The symbol exists but the driver does not implement it.
            Err(NvmlError::FunctionNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    let sym = nvml_sym(nvml.lib().nvmlDeviceGetMemoryInfo.as_ref())?;
    // SAFETY: the handle comes from this library; the struct is NVML's v1
    // `nvmlMemory_t`, written by the call.
    unsafe {
        let mut info: sys::nvmlMemory_t = std::mem::zeroed();
        nvml_try(sym(dev.handle(), &mut info))?;
        Ok((info.total, info.used))
    }
}

/// The JPEG engines' utilisation: a call `nvml-wrapper` does not wrap (NVML 11.4+;
/// older libraries lack the symbol, and the figure is absent).
fn jpeg_utilization(nvml: &Nvml, dev: &nvml_wrapper::Device<'_>) -> Result<u32, NvmlError> {
    // A missing symbol is not turned into the wrapper's formatted error each round.
    let Ok(sym) = nvml.lib().nvmlDeviceGetJpgUtilization.as_ref() else {
        return Err(NvmlError::FunctionNotFound);
    };
    let (mut utilization, mut period) = (0, 0);
    // SAFETY: the handle is this library's; both outputs are written by the call.
    nvml_try(unsafe { sym(dev.handle(), &mut utilization, &mut period) })?;
    Ok(utilization)
}

pub fn info(nvml: &Nvml, index: u32) -> Result<DeviceInfo, Error> {
    let dev = device(nvml, index)?;
    let pci = figure(dev.pci_info())?;
    Ok(DeviceInfo {
        name: dev.name().map_err(error)?,
        uuid: figure(dev.uuid())?,
        serial: figure(dev.serial())?,
        pci_bus_id: pci.as_ref().map(|p| p.bus_id.clone()),
        pci_device_id: pci.as_ref().map(|p| p.pci_device_id),
        pci_subsystem_id: pci.and_then(|p| p.pci_sub_system_id),
        mig_capable: dev.mig_mode().is_ok(),
    })
}

/// Appends `fields` of device `index` to `values`, one value each, `BLANK` where
/// NVML could not read it. NVML is asked once per figure it reads, memory and
/// utilisation once for both of their fields, and not at all for a figure not asked
/// for.
fn sample(nvml: &Nvml, index: u32, fields: &[Field], values: &mut Vec<u64>) -> Result<(), Error> {
    let dev = device(nvml, index)?;
    let wants = |any: &[Field]| fields.iter().any(|f| any.contains(f));
    let memory = if wants(&[Field::MemoryTotalBytes, Field::MemoryUsedBytes]) {
        figure(memory(nvml, &dev))?
    } else {
        None
    };
    let utilization = if wants(&[Field::GpuUtilizationPct, Field::MemoryUtilizationPct]) {
        figure(dev.utilization_rates())?
    } else {
        None
    };
    for field in fields {
        let value = match field {
            Field::MemoryTotalBytes => memory.map(|m| m.0),
            Field::MemoryUsedBytes => memory.map(|m| m.1),
            Field::GpuUtilizationPct => utilization.as_ref().map(|u| u.gpu.into()),
            Field::MemoryUtilizationPct => utilization.as_ref().map(|u| u.memory.into()),
            Field::DecoderUtilizationPct => {
                figure(dev.decoder_utilization())?.map(|u| u.utilization.into())
            }
            Field::EncoderUtilizationPct => {
                figure(dev.encoder_utilization())?.map(|u| u.utilization.into())
            }
            Field::JpegUtilizationPct => figure(jpeg_utilization(nvml, &dev))?.map(u64::from),
            Field::TemperatureCelsius => {
                figure(dev.temperature(TemperatureSensor::Gpu))?.map(u64::from)
            }
            Field::PowerDrawMilliwatts => figure(dev.power_usage())?.map(u64::from),
            Field::PowerLimitMilliwatts => figure(dev.enforced_power_limit())?.map(u64::from),
        };
        values.push(value.unwrap_or(BLANK));
    }
    Ok(())
}

/// `fields` of each of `devices`, in that order, flat: a round's cards in one
/// call. At most `MAX_DEVICES` devices and `MAX_FIELDS` fields, which bound the
/// NVML calls and the answer a plugin's lists can make the host spend.
pub fn samples(nvml: &Nvml, devices: &[u32], fields: &[Field]) -> Result<Readings, Error> {
    if devices.len() > MAX_DEVICES as usize {
        return Err(Error::NotFound(format!(
            "{} devices asked for in one call; there are at most {MAX_DEVICES}",
            devices.len()
        )));
    }
    if fields.len() > MAX_FIELDS {
        return Err(Error::NotFound(format!(
            "{} fields asked for in one call; at most {MAX_FIELDS}",
            fields.len()
        )));
    }
    let mut readings = Readings {
        values: Vec::with_capacity(devices.len() * fields.len()),
        failed: Vec::new(),
    };
    for (position, &device) in (0u32..).zip(devices) {
        let start = readings.values.len();
        if let Err(e) = sample(nvml, device, fields, &mut readings.values) {
            readings.values.truncate(start);
            readings.values.resize(start + fields.len(), BLANK);
            readings.failed.push((position, e));
        }
    }
    Ok(readings)
}

/// One process's NVML figures: what `running_compute_processes` says (memory, MIG
/// instance) joined with its newest utilisation sample.
pub(crate) fn join_processes(
    running: Vec<nvml_wrapper::struct_wrappers::device::ProcessInfo>,
    samples: &[nvml_wrapper::struct_wrappers::device::ProcessUtilizationSample],
) -> Vec<ProcessUsage> {
    running
        .into_iter()
        .take(MAX_PROCESSES)
        .map(|p| {
            let newest = samples
                .iter()
                .filter(|s| s.pid == p.pid)
                .max_by_key(|s| s.timestamp);
            ProcessUsage {
                pid: p.pid,
                used_memory_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(bytes) => Some(bytes),
                    UsedGpuMemory::Unavailable => None,
                },
                sm_utilization_pct: newest.map(|s| s.sm_util),
                memory_utilization_pct: newest.map(|s| s.mem_util),
                decoder_utilization_pct: newest.map(|s| s.dec_util),
                encoder_utilization_pct: newest.map(|s| s.enc_util),
                gpu_instance_id: p.gpu_instance_id,
                compute_instance_id: p.compute_instance_id,
            }
        })
        .collect()
}

pub fn processes(nvml: &Nvml, index: u32) -> Result<Vec<ProcessUsage>, Error> {
    let dev = device(nvml, index)?;
    let running = dev.running_compute_processes().map_err(error)?;
    let since = SystemTime::now()
        .checked_sub(PROCESS_WINDOW)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_micros() as u64);
    // Per-process utilisation is unsupported on some boards (and in MIG mode):
    // the processes are still listed, without it.
    let samples = dev.process_utilization_stats(since).unwrap_or_default();
    Ok(join_processes(running, &samples))
}

pub fn mig_mode(nvml: &Nvml, index: u32) -> Result<MigState, Error> {
    let mode = device(nvml, index)?.mig_mode().map_err(error)?;
    Ok(MigState {
        current: mode.current == sys::NVML_DEVICE_MIG_ENABLE,
        pending: mode.pending == sys::NVML_DEVICE_MIG_ENABLE,
    })
}

/// NVML's status code as the contract's error.
fn check(code: sys::nvmlReturn_t) -> Result<(), Error> {
    // The wrapper has no variant for this one (MIG: no room for the profile).
    if code == sys::nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_RESOURCES {
        return Err(Error::InsufficientResources(
            "not enough free slices or memory on the device".into(),
        ));
    }
    nvml_try(code).map_err(error)
}

/// The GPU instance profiles the device supports, with NVML's profile index.
fn gpu_instance_profiles(
    nvml: &Nvml,
    handle: sys::nvmlDevice_t,
) -> Result<Vec<sys::nvmlGpuInstanceProfileInfo_t>, Error> {
    let get = nvml_sym(nvml.lib().nvmlDeviceGetGpuInstanceProfileInfo.as_ref()).map_err(error)?;
    let mut profiles = Vec::new();
    for profile in 0..sys::NVML_GPU_INSTANCE_PROFILE_COUNT {
        // SAFETY: `handle` is a device of this library; `info` is NVML's v1 struct.
        let mut info: sys::nvmlGpuInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
        match nvml_try(unsafe { get(handle, profile, &mut info) }) {
            Ok(()) => profiles.push(info),
            // Profiles this board does not have.
            Err(NvmlError::NotSupported | NvmlError::InvalidArg) => {}
            Err(e) => return Err(error(e)),
        }
    }
    Ok(profiles)
}

pub fn mig_profiles(nvml: &Nvml, index: u32) -> Result<Vec<MigProfile>, Error> {
    let dev = device(nvml, index)?;
    // SAFETY: the handle lives as long as the library, which `nvml` holds.
    let handle = unsafe { dev.handle() };
    let remaining = nvml_sym(
        nvml.lib()
            .nvmlDeviceGetGpuInstanceRemainingCapacity
            .as_ref(),
    )
    .map_err(error)?;
    gpu_instance_profiles(nvml, handle)?
        .into_iter()
        .map(|info| {
            let mut free = 0;
            // SAFETY: as above; `free` is written by the call.
            check(unsafe { remaining(handle, info.id, &mut free) })?;
            Ok(MigProfile {
                id: info.id,
                slice_count: info.sliceCount,
                memory_mib: info.memorySizeMB,
                free_count: free,
                max_count: info.instanceCount,
            })
        })
        .collect()
}

/// The GPU instances of one profile.
fn gpu_instances(
    nvml: &Nvml,
    handle: sys::nvmlDevice_t,
    profile: &sys::nvmlGpuInstanceProfileInfo_t,
) -> Result<Vec<sys::nvmlGpuInstance_t>, Error> {
    let get = nvml_sym(nvml.lib().nvmlDeviceGetGpuInstances.as_ref()).map_err(error)?;
    let capacity = (profile.instanceCount as usize).min(MAX_MIG);
    let mut instances: Vec<sys::nvmlGpuInstance_t> = vec![std::ptr::null_mut(); capacity];
    let mut count = 0;
    // SAFETY: the array holds `capacity` entries, which is what NVML may write
    // (a profile has at most `instanceCount` instances).
    check(unsafe { get(handle, profile.id, instances.as_mut_ptr(), &mut count) })?;
    instances.truncate((count as usize).min(capacity));
    Ok(instances)
}

/// A GPU instance as the contract shows it, with its MIG device's uuid and memory
/// where a compute instance exists.
fn describe(
    nvml: &Nvml,
    dev: &nvml_wrapper::Device<'_>,
    instance: sys::nvmlGpuInstance_t,
) -> Result<MigInstance, Error> {
    let get_info = nvml_sym(nvml.lib().nvmlGpuInstanceGetInfo.as_ref()).map_err(error)?;
    // SAFETY: `instance` came from NVML for this device; `info` is written by it.
    let mut info: sys::nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
    check(unsafe { get_info(instance, &mut info) })?;
    let mut described = MigInstance {
        gpu_instance_id: info.id,
        profile_id: info.profileId,
        placement_start: info.placement.start,
        placement_size: info.placement.size,
        uuid: None,
        memory_total_bytes: None,
        memory_used_bytes: None,
    };
    if let Some(mig) = mig_device(nvml, dev, info.id)? {
        described.uuid = figure(mig.uuid())?;
        if let Some((total, used)) = figure(memory(nvml, &mig))? {
            described.memory_total_bytes = Some(total);
            described.memory_used_bytes = Some(used);
        }
    }
    Ok(described)
}

/// The MIG device of GPU instance `gpu_instance_id`, once it has a compute instance.
fn mig_device<'n>(
    nvml: &'n Nvml,
    dev: &nvml_wrapper::Device<'n>,
    gpu_instance_id: u32,
) -> Result<Option<nvml_wrapper::Device<'n>>, Error> {
    let lib = nvml.lib();
    let max = nvml_sym(lib.nvmlDeviceGetMaxMigDeviceCount.as_ref()).map_err(error)?;
    let instance_id = nvml_sym(lib.nvmlDeviceGetGpuInstanceId.as_ref()).map_err(error)?;
    // SAFETY: the handle is this library's; the counts and ids are written by NVML.
    let handle = unsafe { dev.handle() };
    let mut count = 0;
    check(unsafe { max(handle, &mut count) })?;
    for i in 0..count.min(MAX_MIG as u32) {
        let Ok(mig) = dev.mig_device_by_index(i) else {
            continue;
        };
        let mut id = 0;
        if nvml_try(unsafe { instance_id(mig.handle(), &mut id) }).is_ok() && id == gpu_instance_id
        {
            return Ok(Some(mig));
        }
    }
    Ok(None)
}

pub fn mig_instances(nvml: &Nvml, index: u32) -> Result<Vec<MigInstance>, Error> {
    let dev = device(nvml, index)?;
    // SAFETY: the handle lives as long as the library, which `nvml` holds.
    let handle = unsafe { dev.handle() };
    let mut out = Vec::new();
    for profile in gpu_instance_profiles(nvml, handle)? {
        for instance in gpu_instances(nvml, handle, &profile)? {
            if out.len() >= MAX_MIG {
                return Ok(out);
            }
            out.push(describe(nvml, &dev, instance)?);
        }
    }
    Ok(out)
}

/// Creates a GPU instance of `profile_id` and one compute instance over all of it;
/// a GPU instance whose compute instance cannot be made is destroyed again.
pub fn create_mig_instance(nvml: &Nvml, index: u32, profile_id: u32) -> Result<MigInstance, Error> {
    let dev = device(nvml, index)?;
    let lib = nvml.lib();
    // SAFETY: the handle lives as long as the library, which `nvml` holds.
    let handle = unsafe { dev.handle() };
    if !gpu_instance_profiles(nvml, handle)?
        .iter()
        .any(|p| p.id == profile_id)
    {
        return Err(Error::NotFound(format!(
            "device {index} has no GPU instance profile {profile_id}"
        )));
    }
    let create = nvml_sym(lib.nvmlDeviceCreateGpuInstance.as_ref()).map_err(error)?;
    let destroy = nvml_sym(lib.nvmlGpuInstanceDestroy.as_ref()).map_err(error)?;
    let ci_profile =
        nvml_sym(lib.nvmlGpuInstanceGetComputeInstanceProfileInfo.as_ref()).map_err(error)?;
    let ci_create = nvml_sym(lib.nvmlGpuInstanceCreateComputeInstance.as_ref()).map_err(error)?;
    let mut instance: sys::nvmlGpuInstance_t = std::ptr::null_mut();
    // SAFETY: NVML writes the new instance's handle.
    check(unsafe { create(handle, profile_id, &mut instance) })?;
    // The compute instance profile spanning the most slices of this GPU instance.
    let mut widest: Option<sys::nvmlComputeInstanceProfileInfo_t> = None;
    for profile in 0..sys::NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
        // SAFETY: `instance` was just created; `info` is written by the call.
        let mut info: sys::nvmlComputeInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
        let code = unsafe {
            ci_profile(
                instance,
                profile,
                sys::NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
                &mut info,
            )
        };
        if nvml_try(code).is_ok() && widest.is_none_or(|w| info.sliceCount > w.sliceCount) {
            widest = Some(info);
        }
    }
    let made = match widest {
        Some(profile) => {
            let mut compute: sys::nvmlComputeInstance_t = std::ptr::null_mut();
            // SAFETY: as above.
            check(unsafe { ci_create(instance, profile.id, &mut compute) })
        }
        None => Err(Error::NotSupported(format!(
            "GPU instance profile {profile_id} offers no compute instance profile"
        ))),
    };
    if let Err(e) = made {
        // SAFETY: the instance was created above and nothing else holds it.
        let _ = unsafe { destroy(instance) };
        return Err(e);
    }
    describe(nvml, &dev, instance)
}

pub fn destroy_mig_instance(nvml: &Nvml, index: u32, gpu_instance_id: u32) -> Result<(), Error> {
    let dev = device(nvml, index)?;
    let lib = nvml.lib();
    // SAFETY: the handle lives as long as the library, which `nvml` holds.
    let handle = unsafe { dev.handle() };
    let by_id = nvml_sym(lib.nvmlDeviceGetGpuInstanceById.as_ref()).map_err(error)?;
    let computes = nvml_sym(lib.nvmlGpuInstanceGetComputeInstances.as_ref()).map_err(error)?;
    let ci_destroy = nvml_sym(lib.nvmlComputeInstanceDestroy.as_ref()).map_err(error)?;
    let destroy = nvml_sym(lib.nvmlGpuInstanceDestroy.as_ref()).map_err(error)?;
    let mut instance: sys::nvmlGpuInstance_t = std::ptr::null_mut();
    // SAFETY: NVML writes the instance's handle.
    check(unsafe { by_id(handle, gpu_instance_id, &mut instance) })?;
    for profile in 0..sys::NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
        let mut found: Vec<sys::nvmlComputeInstance_t> = vec![std::ptr::null_mut(); MAX_MIG];
        let mut count = 0;
        // SAFETY: the array holds MAX_MIG entries, more than a GPU instance's 7 slices.
        let code = unsafe { computes(instance, profile, found.as_mut_ptr(), &mut count) };
        if nvml_try(code).is_err() {
            continue;
        }
        for compute in found.into_iter().take((count as usize).min(MAX_MIG)) {
            // SAFETY: a compute instance NVML just listed.
            check(unsafe { ci_destroy(compute) })?;
        }
    }
    // SAFETY: the instance NVML found by id; its compute instances are gone.
    check(unsafe { destroy(instance) })
}

impl wit::Host for PluginState {
    fn device_count(&mut self) -> wasmtime::Result<Result<u32, Error>> {
        Ok(self
            .nvml
            .nvml(NvmlGrant::Read)
            .and_then(|n| n.device_count().map_err(error))
            .map(|count| count.min(MAX_DEVICES)))
    }
    fn info(&mut self, device: u32) -> wasmtime::Result<Result<DeviceInfo, Error>> {
        Ok(self
            .nvml
            .nvml(NvmlGrant::Read)
            .and_then(|n| info(n, device)))
    }
    fn sample(
        &mut self,
        devices: Vec<u32>,
        fields: Vec<Field>,
    ) -> wasmtime::Result<Result<Readings, Error>> {
        Ok(self
            .nvml
            .nvml(NvmlGrant::Read)
            .and_then(|n| samples(n, &devices, &fields)))
    }
    fn processes(&mut self, device: u32) -> wasmtime::Result<Result<Vec<ProcessUsage>, Error>> {
        Ok(self
            .nvml
            .nvml(NvmlGrant::Read)
            .and_then(|n| processes(n, device)))
    }
    fn mig_mode(&mut self, device: u32) -> wasmtime::Result<Result<MigState, Error>> {
        Ok(self
            .nvml
            .nvml(NvmlGrant::Read)
            .and_then(|n| mig_mode(n, device)))
    }
    fn mig_profiles(&mut self, device: u32) -> wasmtime::Result<Result<Vec<MigProfile>, Error>> {
        Ok(self
            .nvml
            .nvml(NvmlGrant::Read)
            .and_then(|n| mig_profiles(n, device)))
    }
    fn mig_instances(&mut self, device: u32) -> wasmtime::Result<Result<Vec<MigInstance>, Error>> {
        Ok(self
            .nvml
            .nvml(NvmlGrant::Read)
            .and_then(|n| mig_instances(n, device)))
    }
    fn create_mig_instance(
        &mut self,
        device: u32,
        profile_id: u32,
    ) -> wasmtime::Result<Result<MigInstance, Error>> {
        let answer = self
            .nvml
            .nvml(NvmlGrant::Manage)
            .and_then(|n| create_mig_instance(n, device, profile_id));
        if let Ok(made) = &answer {
            tracing::info!(
                plugin = &*self.plugin,
                device,
                profile_id,
                gpu_instance = made.gpu_instance_id,
                "MIG instance created"
            );
        }
        Ok(answer)
    }
    fn destroy_mig_instance(
        &mut self,
        device: u32,
        gpu_instance_id: u32,
    ) -> wasmtime::Result<Result<(), Error>> {
        let answer = self
            .nvml
            .nvml(NvmlGrant::Manage)
            .and_then(|n| destroy_mig_instance(n, device, gpu_instance_id));
        if answer.is_ok() {
            tracing::info!(
                plugin = &*self.plugin,
                device,
                gpu_instance = gpu_instance_id,
                "MIG instance destroyed"
            );
        }
        Ok(answer)
    }
}
