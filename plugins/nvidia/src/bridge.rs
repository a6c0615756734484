//! What the driver asks of NVML, as a trait: the host's bridge in the plugin, and
//! recorded answers in the unit tests.

use xpud_sdk::driver::nvml::{
    self, figure, DeviceInfo, Field, MigInstance, MigProfile, MigState, NvmlError, ProcessUsage,
    Readings,
};

/// What the driver reads of each card in a sampling round, in this order: NVML is
/// asked for nothing it does not report.
pub const FIELDS: [Field; 7] = [
    Field::MemoryTotalBytes,
    Field::MemoryUsedBytes,
    Field::GpuUtilizationPct,
    Field::DecoderUtilizationPct,
    Field::JpegUtilizationPct,
    Field::TemperatureCelsius,
    Field::PowerDrawMilliwatts,
];

/// A card's figures of one round (`FIELDS`); `None` where NVML could not read one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub memory_total_bytes: Option<u64>,
    pub memory_used_bytes: Option<u64>,
    pub gpu_utilization_pct: Option<u64>,
    pub decoder_utilization_pct: Option<u64>,
    pub jpeg_utilization_pct: Option<u64>,
    pub temperature_celsius: Option<u64>,
    pub power_draw_milliwatts: Option<u64>,
}

impl Sample {
    /// From one device's values, one per field of `FIELDS`, in that order.
    fn from_values(values: &[u64]) -> Sample {
        let mut sample = Sample::default();
        for (field, &value) in FIELDS.iter().zip(values) {
            let slot = match field {
                Field::MemoryTotalBytes => &mut sample.memory_total_bytes,
                Field::MemoryUsedBytes => &mut sample.memory_used_bytes,
                Field::GpuUtilizationPct => &mut sample.gpu_utilization_pct,
                Field::DecoderUtilizationPct => &mut sample.decoder_utilization_pct,
                Field::JpegUtilizationPct => &mut sample.jpeg_utilization_pct,
                Field::TemperatureCelsius => &mut sample.temperature_celsius,
                Field::PowerDrawMilliwatts => &mut sample.power_draw_milliwatts,
                // Not in `FIELDS`: never asked for.
                Field::MemoryUtilizationPct
                | Field::EncoderUtilizationPct
                | Field::PowerLimitMilliwatts => continue,
            };
            *slot = figure(value);
        }
        sample
    }
}

/// Each of `devices` devices' sample out of the bridge's flat answer to `FIELDS`.
pub fn samples(readings: &Readings, devices: usize) -> Vec<Result<Sample, NvmlError>> {
    (0..devices)
        .map(|position| {
            readings
                .device(position, FIELDS.len())
                .map(Sample::from_values)
        })
        .collect()
}

pub trait Nvml {
    fn device_count(&self) -> Result<u32, NvmlError>;
    fn info(&self, device: u32) -> Result<DeviceInfo, NvmlError>;
    /// Each device's reading, in the order asked, from one call.
    fn sample(&self, devices: &[u32]) -> Result<Vec<Result<Sample, NvmlError>>, NvmlError>;
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
    fn sample(&self, devices: &[u32]) -> Result<Vec<Result<Sample, NvmlError>>, NvmlError> {
        nvml::sample(devices, &FIELDS).map(|readings| samples(&readings, devices.len()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use xpud_sdk::driver::nvml::BLANK;

    #[test]
    fn a_flat_answer_becomes_each_card_s_sample_with_blanks_absent() {
        // Three cards asked, seven fields each: the second could not be read at
        // all, the first has no JPEG engine. A fourth card asked got no values.
        let mut values = vec![15360 << 20, 345 << 20, 37, 18, BLANK, 48, 27_512];
        values.extend([BLANK; 7]);
        values.extend([40960 << 20, 38 << 20, BLANK, BLANK, 4, 33, 54_221]);
        let readings = Readings {
            values,
            failed: vec![(1, NvmlError::GpuLost("fell off the bus".into()))],
        };
        let samples = samples(&readings, 4);
        assert_eq!(
            samples[0].as_ref().unwrap(),
            &Sample {
                memory_total_bytes: Some(15360 << 20),
                memory_used_bytes: Some(345 << 20),
                gpu_utilization_pct: Some(37),
                decoder_utilization_pct: Some(18),
                jpeg_utilization_pct: None,
                temperature_celsius: Some(48),
                power_draw_milliwatts: Some(27_512),
            }
        );
        assert!(matches!(&samples[1], Err(NvmlError::GpuLost(_))));
        let a100 = samples[2].as_ref().unwrap();
        assert_eq!(a100.gpu_utilization_pct, None);
        assert_eq!(a100.jpeg_utilization_pct, Some(4));
        assert!(matches!(&samples[3], Err(NvmlError::Failed(m)) if m.contains("device 3")));
    }
}
