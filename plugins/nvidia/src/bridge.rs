//! What the driver asks of NVML, as a trait: the host's bridge in the plugin, and
//! recorded answers in the unit tests.

use xpud_sdk::driver::nvml::{
    self, DeviceInfo, DeviceSample, MigInstance, MigProfile, MigState, NvmlError, ProcessUsage,
};

pub trait Nvml {
    fn device_count(&self) -> Result<u32, NvmlError>;
    fn info(&self, device: u32) -> Result<DeviceInfo, NvmlError>;
    /// Each device's reading, in the order asked, from one call.
    fn sample(&self, devices: &[u32]) -> Result<Vec<Result<DeviceSample, NvmlError>>, NvmlError>;
    fn processes(&self, device: u32) -> Result<Vec<ProcessUsage>, NvmlError>;
    fn mig_mode(&self, device: u32) -> Result<MigState, NvmlError>;
    fn mig_profiles(&self, device: u32) -> Result<Vec<MigProfile>, NvmlError>;
    fn mig_instances(&self, device: u32) -> Result<Vec<MigInstance>, NvmlError>;
    fn create_mig_instance(&mut self, device: u32, profile: u32) -> Result<MigInstance, NvmlError>;
    fn destroy_mig_instance(&mut self, device: u32, gpu_instance: u32) -> Result<(), NvmlError>;
}

/// The host's NVML bridge (`xpu:plugin/nvml`).
#[derive(Default)]
pub struct HostNvml;

impl Nvml for HostNvml {
    fn device_count(&self) -> Result<u32, NvmlError> {
        nvml::device_count()
    }
    fn info(&self, device: u32) -> Result<DeviceInfo, NvmlError> {
        nvml::info(device)
    }
    fn sample(&self, devices: &[u32]) -> Result<Vec<Result<DeviceSample, NvmlError>>, NvmlError> {
        nvml::sample(devices)
    }
    fn processes(&self, device: u32) -> Result<Vec<ProcessUsage>, NvmlError> {
        nvml::processes(device)
    }
    fn mig_mode(&self, device: u32) -> Result<MigState, NvmlError> {
        nvml::mig_mode(device)
    }
    fn mig_profiles(&self, device: u32) -> Result<Vec<MigProfile>, NvmlError> {
        nvml::mig_profiles(device)
    }
    fn mig_instances(&self, device: u32) -> Result<Vec<MigInstance>, NvmlError> {
        nvml::mig_instances(device)
    }
    fn create_mig_instance(&mut self, device: u32, profile: u32) -> Result<MigInstance, NvmlError> {
        nvml::create_mig_instance(device, profile)
    }
    fn destroy_mig_instance(&mut self, device: u32, gpu_instance: u32) -> Result<(), NvmlError> {
        nvml::destroy_mig_instance(device, gpu_instance)
    }
}
