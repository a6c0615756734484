//! legacy-driver: a driver built against `xpu:plugin@0.1.0` with wit-bindgen
//! directly, as a vendor's driver from before 0.2 was. It reports one simulated
//! card and keeps partitions in a list; the host must load and run it unchanged.

wit_bindgen::generate!({ path: "../../../wit/v0.1.0", world: "driver-plugin" });

use std::cell::RefCell;

use exports::xpu::plugin::driver::Guest;
use xpu::plugin::driver_types::{
    CardMetrics, Device, DriverError, DriverInfo, Health, InstanceMetrics, Label, Metrics,
    Partition, PartitionSpec,
};

const MEMORY_MIB: u64 = 8192;

thread_local! {
    static PARTITIONS: RefCell<(u32, Vec<Partition>)> = const { RefCell::new((0, Vec::new())) };
}

struct Legacy;

impl Guest for Legacy {
    fn init(_config: Vec<(String, String)>) -> Result<DriverInfo, DriverError> {
        xpu::plugin::log::log(xpu::plugin::log::Level::Info, "legacy driver started");
        Ok(DriverInfo {
            vendor: "LEGACY".into(),
            version: "0.1.0".into(),
            accelerator_types: vec!["LEGACY_X1".into()],
            simulated: true,
        })
    }

    fn devices() -> Result<Vec<Device>, DriverError> {
        Ok(vec![Device {
            id: "legacy-0".into(),
            uuid: None,
            index: 0,
            accelerator_type: "LEGACY_X1".into(),
            memory_total_mib: Some(MEMORY_MIB),
            decoder_units: None,
            encoder_units: None,
            pci_bus_id: None,
            health: Health::Healthy,
        }])
    }

    fn sample() -> Result<Metrics, DriverError> {
        let instances = PARTITIONS.with(|p| {
            p.borrow()
                .1
                .iter()
                .map(|p| InstanceMetrics {
                    partition_id: p.id.clone(),
                    device_index: 0,
                    ai_utilization_pct: Some(10.0),
                    memory_used_mib: Some(p.spec.memory_quota_mib / 2),
                    memory_quota_mib: p.spec.memory_quota_mib,
                })
                .collect()
        });
        Ok(Metrics {
            cards: vec![CardMetrics {
                device_index: 0,
                ai_utilization_pct: Some(25.0),
                memory_used_mib: Some(1024),
                memory_total_mib: Some(MEMORY_MIB),
                video_decode_utilization_pct: None,
                picture_decode_utilization_pct: None,
                temperature_celsius: None,
                power_watts: None,
            }],
            instances,
        })
    }

    fn create_partition(spec: PartitionSpec) -> Result<Partition, DriverError> {
        if spec.device_index != 0 {
            return Err(DriverError::NotFound(format!(
                "no device {}",
                spec.device_index
            )));
        }
        Ok(PARTITIONS.with(|p| {
            let mut p = p.borrow_mut();
            p.0 += 1;
            let partition = Partition {
                id: format!("legacy-{}", p.0),
                spec,
            };
            p.1.push(partition.clone());
            partition
        }))
    }

    fn destroy_partition(id: String) -> Result<(), DriverError> {
        PARTITIONS.with(|p| {
            let mut p = p.borrow_mut();
            let before = p.1.len();
            p.1.retain(|q| q.id != id);
            if p.1.len() == before {
                Err(DriverError::NotFound(format!("no partition {id}")))
            } else {
                Ok(())
            }
        })
    }

    fn partitions() -> Result<Vec<Partition>, DriverError> {
        Ok(PARTITIONS.with(|p| p.borrow().1.clone()))
    }

    fn labels() -> Result<Vec<Label>, DriverError> {
        Ok(vec![Label {
            key: "xpu.model".into(),
            value: "LEGACY_X1".into(),
        }])
    }
}

export!(Legacy);
