//! linux-sysfs: discovers accelerators from Linux sysfs and procfs.
//!
//! Needs read-only grants of `/sys` (the whole tree: sysfs links are relative and
//! cross from `bus/` into `devices/`) and `/proc/driver`. It walks
//! `/sys/bus/pci/devices`, keeps display controllers and processing accelerators of
//! known accelerator vendors, and reads what the kernel drivers publish:
//!
//! - NVIDIA: model and UUID from `/proc/driver/nvidia/gpus/<bus id>/information`;
//!   utilisation and memory need NVML, so those figures are absent here.
//! - AMD (amdgpu): `gpu_busy_percent`, `mem_info_vram_total`, `mem_info_vram_used`,
//!   `product_name`, and the hwmon `temp1_input`/`power1_average`.
//!
//! On a machine without accelerators it reports no devices. It cannot partition.

use std::fs;
use std::path::{Path, PathBuf};

use xpud_sdk::driver::*;

const PCI_DEVICES: &str = "/sys/bus/pci/devices";
const NVIDIA_PROC: &str = "/proc/driver/nvidia/gpus";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vendor {
    Nvidia,
    Amd,
    Intel,
    Huawei,
    Cambricon,
}

impl Vendor {
    fn from_pci(id: u16) -> Option<Vendor> {
        match id {
            0x10de => Some(Vendor::Nvidia),
            0x1002 => Some(Vendor::Amd),
            0x8086 => Some(Vendor::Intel),
            0x19e5 => Some(Vendor::Huawei),
            0xcabc => Some(Vendor::Cambricon),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Vendor::Nvidia => "NVIDIA",
            Vendor::Amd => "AMD",
            Vendor::Intel => "INTEL",
            Vendor::Huawei => "HUAWEI",
            Vendor::Cambricon => "CAMBRICON",
        }
    }
}

/// Model names of common data-centre cards by PCI id, used when the driver does not
/// publish a model string.
fn known_model(vendor: u16, device: u16) -> Option<&'static str> {
    Some(match (vendor, device) {
        (0x10de, 0x1bb3) => "NVIDIA_P4",
        (0x10de, 0x1eb8) => "NVIDIA_T4",
        (0x10de, 0x25b6) => "NVIDIA_A2",
        (0x10de, 0x2236) => "NVIDIA_A10",
        (0x10de, 0x20b7) => "NVIDIA_A30",
        (0x10de, 0x20b0) | (0x10de, 0x20b2) | (0x10de, 0x20b5) => "NVIDIA_A100",
        (0x10de, 0x27b8) => "NVIDIA_L4",
        (0x10de, 0x2330) | (0x10de, 0x2331) => "NVIDIA_H100",
        (0x19e5, 0xd100) => "HUAWEI_ASCEND_310",
        (0x19e5, 0xd500) => "HUAWEI_ASCEND_310P",
        (0x19e5, 0xd801) => "HUAWEI_ASCEND_910",
        _ => return None,
    })
}

/// "Tesla T4" -> "NVIDIA_T4"; "NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3".
fn type_name(vendor: Vendor, model: &str) -> String {
    let mut words: Vec<String> = model
        .split(|c: char| c.is_whitespace() || c == '-' || c == '_')
        .filter(|w| !w.is_empty())
        .map(|w| {
            w.chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .collect::<String>()
                .to_uppercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    let vendor_name = vendor.name();
    words.retain(|w| w != "TESLA" && w != vendor_name && w != "AMD" && w != "RADEON");
    if words.is_empty() {
        return format!("{vendor_name}_UNKNOWN");
    }
    format!("{vendor_name}_{}", words.join("_"))
}

struct Card {
    bus_id: String,
    dir: PathBuf,
    vendor: Vendor,
    accelerator_type: String,
    uuid: Option<String>,
    memory_total_mib: Option<u64>,
    driver_bound: bool,
    hwmon: Option<PathBuf>,
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn read_hex(path: &Path) -> Option<u32> {
    let text = read_trimmed(path)?;
    u32::from_str_radix(text.trim_start_matches("0x"), 16).ok()
}

fn read_u64(path: &Path) -> Option<u64> {
    read_trimmed(path)?.parse().ok()
}

/// "Key:   value" lines of /proc/driver/nvidia/gpus/*/information.
fn proc_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

fn is_accelerator_class(class: u32) -> bool {
    let base_sub = class >> 8;
    // 0x0300 VGA, 0x0302 3D controller, 0x0380 other display, 0x1200 processing accelerator.
    matches!(base_sub, 0x0300 | 0x0302 | 0x0380 | 0x1200)
}

fn probe_card(bus_id: &str) -> Option<Card> {
    let dir = Path::new(PCI_DEVICES).join(bus_id);
    let class = read_hex(&dir.join("class"))?;
    if !is_accelerator_class(class) {
        return None;
    }
    let vendor_id = read_hex(&dir.join("vendor"))? as u16;
    let device_id = read_hex(&dir.join("device")).unwrap_or(0) as u16;
    let Some(vendor) = Vendor::from_pci(vendor_id) else {
        xpud_sdk::debug!("{bus_id}: display device of vendor {vendor_id:04x} is no accelerator");
        return None;
    };
    let mut uuid = None;
    let mut model = None;
    if vendor == Vendor::Nvidia {
        if let Some(info) = read_trimmed(&Path::new(NVIDIA_PROC).join(bus_id).join("information")) {
            model = proc_field(&info, "Model");
            uuid = proc_field(&info, "GPU UUID");
        }
    }
    if model.is_none() {
        model = read_trimmed(&dir.join("product_name")).filter(|m| !m.is_empty());
    }
    let accelerator_type = match (model, known_model(vendor_id, device_id)) {
        (Some(model), _) => type_name(vendor, &model),
        (None, Some(known)) => known.to_string(),
        (None, None) => format!("{}_{device_id:04X}", vendor.name()),
    };
    let memory_total_mib = read_u64(&dir.join("mem_info_vram_total")).map(|b| b >> 20);
    let hwmon = fs::read_dir(dir.join("hwmon"))
        .ok()
        .and_then(|mut entries| entries.next())
        .and_then(|entry| entry.ok())
        .map(|entry| entry.path());
    Some(Card {
        bus_id: bus_id.to_string(),
        driver_bound: dir.join("driver").exists(),
        dir,
        vendor,
        accelerator_type,
        uuid,
        memory_total_mib,
        hwmon,
    })
}

struct LinuxSysfs {
    cards: Vec<Card>,
}

impl LinuxSysfs {
    fn scan() -> Result<Vec<Card>, DriverError> {
        let entries = match fs::read_dir(PCI_DEVICES) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                xpud_sdk::info!("{PCI_DEVICES} not present: no PCI devices to report");
                return Ok(Vec::new());
            }
            Err(e) => {
                return Err(DriverError::DeviceFailure(format!(
                    "cannot list {PCI_DEVICES}: {e} (is /sys granted?)"
                )))
            }
        };
        let mut bus_ids: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        bus_ids.sort();
        Ok(bus_ids.iter().filter_map(|id| probe_card(id)).collect())
    }
}

impl Driver for LinuxSysfs {
    fn init(_config: Config) -> Result<(Self, DriverInfo), DriverError> {
        let cards = Self::scan()?;
        xpud_sdk::info!("found {} accelerator(s) in sysfs", cards.len());
        let mut types: Vec<String> = cards.iter().map(|c| c.accelerator_type.clone()).collect();
        types.sort();
        types.dedup();
        let mut vendors: Vec<&str> = cards.iter().map(|c| c.vendor.name()).collect();
        vendors.dedup();
        let info = DriverInfo {
            vendor: if vendors.is_empty() {
                "LINUX".to_string()
            } else {
                vendors.join("+")
            },
            version: env!("CARGO_PKG_VERSION").into(),
            accelerator_types: types,
            simulated: false,
        };
        Ok((LinuxSysfs { cards }, info))
    }

    fn devices(&mut self) -> Result<Vec<Device>, DriverError> {
        Ok(self
            .cards
            .iter()
            .enumerate()
            .map(|(index, card)| Device {
                id: card.uuid.clone().unwrap_or_else(|| {
                    format!("{}:{}", card.vendor.name().to_lowercase(), card.bus_id)
                }),
                uuid: card.uuid.clone(),
                index: index as u32,
                accelerator_type: card.accelerator_type.clone(),
                memory_total_mib: card.memory_total_mib,
                decoder_units: None,
                encoder_units: None,
                pci_bus_id: Some(card.bus_id.clone()),
                health: if !card.dir.exists() {
                    Health::Unhealthy
                } else if card.driver_bound {
                    Health::Healthy
                } else {
                    Health::Unknown
                },
            })
            .collect())
    }

    fn sample(&mut self) -> Result<Metrics, DriverError> {
        let cards = self
            .cards
            .iter()
            .enumerate()
            .map(|(index, card)| {
                let hwmon = card.hwmon.as_deref();
                CardMetrics {
                    device_index: index as u32,
                    ai_utilization_pct: read_u64(&card.dir.join("gpu_busy_percent"))
                        .map(|p| p as f32),
                    memory_used_mib: read_u64(&card.dir.join("mem_info_vram_used"))
                        .map(|b| b >> 20),
                    memory_total_mib: card.memory_total_mib,
                    video_decode_utilization_pct: None,
                    picture_decode_utilization_pct: None,
                    temperature_celsius: hwmon
                        .and_then(|h| read_u64(&h.join("temp1_input")))
                        .map(|milli| milli as f32 / 1000.0),
                    power_watts: hwmon
                        .and_then(|h| {
                            read_u64(&h.join("power1_average"))
                                .or_else(|| read_u64(&h.join("power1_input")))
                        })
                        .map(|micro| micro as f32 / 1_000_000.0),
                }
            })
            .collect();
        Ok(Metrics {
            cards,
            instances: Vec::new(),
        })
    }
}

xpud_sdk::export_driver!(LinuxSysfs);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_follow_the_vendor_model_convention() {
        assert_eq!(type_name(Vendor::Nvidia, "Tesla T4"), "NVIDIA_T4");
        assert_eq!(type_name(Vendor::Nvidia, "NVIDIA A2"), "NVIDIA_A2");
        assert_eq!(
            type_name(Vendor::Nvidia, "NVIDIA H100 80GB HBM3"),
            "NVIDIA_H100_80GB_HBM3"
        );
        assert_eq!(
            type_name(Vendor::Amd, "AMD Instinct MI210"),
            "AMD_INSTINCT_MI210"
        );
        assert_eq!(type_name(Vendor::Amd, ""), "AMD_UNKNOWN");
    }
}
