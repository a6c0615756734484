//! NVML's device names to the standard's accelerator type names.
//!
//! The PCI device id decides first: it is what the board is, whatever the driver
//! calls it this year ("Tesla T4" and "NVIDIA T4" are one card). A board missing
//! from the table is named from NVML's name second, by a rule any new board follows:
//! `NVIDIA_` and the model, upper case, punctuation as `_`, with the memory size
//! where the model comes in several.

/// NVIDIA's PCI vendor id.
pub const VENDOR_ID: u32 = 0x10de;

/// (PCI device id, type name). From the PCI ID Repository's entries for the
/// data-centre boards; variants of one board with one memory size share a name.
const BY_DEVICE_ID: &[(u16, &str)] = &[
    (0x1bb3, "NVIDIA_P4"),
    (0x15f8, "NVIDIA_P100_16GB"),
    (0x1db1, "NVIDIA_V100_16GB"),
    (0x1db4, "NVIDIA_V100_16GB"),
    (0x1db5, "NVIDIA_V100_32GB"),
    (0x1db6, "NVIDIA_V100_32GB"),
    (0x1eb8, "NVIDIA_T4"),
    (0x20b0, "NVIDIA_A100_40GB"),
    (0x20f1, "NVIDIA_A100_40GB"),
    (0x20b2, "NVIDIA_A100_80GB"),
    (0x20b5, "NVIDIA_A100_80GB"),
    (0x20b7, "NVIDIA_A30"),
    (0x2235, "NVIDIA_A40"),
    (0x2236, "NVIDIA_A10"),
    (0x25b6, "NVIDIA_A2"),
    (0x2230, "NVIDIA_RTX_A6000"),
    (0x26b5, "NVIDIA_L40"),
    (0x26b9, "NVIDIA_L40S"),
    (0x27b8, "NVIDIA_L4"),
    (0x2330, "NVIDIA_H100_80GB"),
    (0x2331, "NVIDIA_H100_80GB"),
    (0x2335, "NVIDIA_H200"),
];

/// The standard's type name for a board: by PCI device id, else by NVML's name.
/// `pci_device_id` is NVML's: the device id in the high 16 bits, the vendor in the low.
pub fn accelerator_type(pci_device_id: Option<u32>, name: &str) -> String {
    if let Some(id) = pci_device_id.filter(|id| id & 0xffff == VENDOR_ID) {
        let device = (id >> 16) as u16;
        if let Some((_, known)) = BY_DEVICE_ID.iter().find(|(d, _)| *d == device) {
            return (*known).to_string();
        }
    }
    from_name(name)
}

/// "NVIDIA A100-SXM4-80GB" -> NVIDIA_A100_80GB, "Tesla T4" -> NVIDIA_T4: the model
/// and its memory size, without the vendor, brand and form factor.
fn from_name(name: &str) -> String {
    const DROPPED: &[&str] = &[
        "NVIDIA", "TESLA", "PCIE", "SXM", "SXM2", "SXM4", "SXM5", "NVL", "HGX", "DGX", "GEFORCE",
        "HBM2", "HBM2E", "HBM3", "HBM3E",
    ];
    let upper = name.to_ascii_uppercase();
    let words: Vec<&str> = upper
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty() && !DROPPED.contains(w))
        .collect();
    if words.is_empty() {
        return "NVIDIA_GPU".to_string();
    }
    format!("NVIDIA_{}", words.join("_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVML's pci.pciDeviceId as recorded on the boards.
    fn id(device: u32) -> Option<u32> {
        Some(device << 16 | VENDOR_ID)
    }

    #[test]
    fn the_device_id_names_the_board_whatever_nvml_calls_it() {
        assert_eq!(accelerator_type(id(0x1eb8), "Tesla T4"), "NVIDIA_T4");
        assert_eq!(accelerator_type(id(0x1eb8), "NVIDIA T4"), "NVIDIA_T4");
        assert_eq!(
            accelerator_type(id(0x20b2), "NVIDIA A100-SXM4-80GB"),
            "NVIDIA_A100_80GB"
        );
        assert_eq!(
            accelerator_type(id(0x20f1), "NVIDIA A100-PCIE-40GB"),
            "NVIDIA_A100_40GB"
        );
        assert_eq!(accelerator_type(id(0x2335), "NVIDIA H200"), "NVIDIA_H200");
        assert_eq!(accelerator_type(id(0x27b8), "NVIDIA L4"), "NVIDIA_L4");
    }

    #[test]
    fn an_unknown_board_is_named_from_nvml_s_name() {
        assert_eq!(
            accelerator_type(id(0x9999), "NVIDIA A100-SXM4-80GB"),
            "NVIDIA_A100_80GB"
        );
        assert_eq!(accelerator_type(None, "Tesla T4"), "NVIDIA_T4");
        assert_eq!(
            accelerator_type(None, "NVIDIA H100 80GB HBM3"),
            "NVIDIA_H100_80GB"
        );
        assert_eq!(accelerator_type(None, "NVIDIA H100 NVL"), "NVIDIA_H100");
        assert_eq!(accelerator_type(None, "!!"), "NVIDIA_GPU");
    }

    #[test]
    fn another_vendor_s_id_is_not_looked_up() {
        // 0x1eb8 under another vendor id is not a T4.
        assert_eq!(
            accelerator_type(Some(0x1eb8 << 16 | 0x1002), "Some Card"),
            "NVIDIA_SOME_CARD"
        );
    }
}
