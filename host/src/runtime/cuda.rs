//! Which CUDA device each card is.
//!
//! Replicas are placed on cards by NVML's index; ONNX Runtime's CUDA provider, and
//! ffmpeg's NVDEC (`-hwaccel_device`, in a child process that inherits the
//! environment), take a CUDA ordinal. The two agree only where CUDA numbers devices by PCI bus, as NVML
//! does (`CUDA_DEVICE_ORDER=PCI_BUS_ID`; CUDA's default is fastest first), and sees
//! every card. MIG breaks the second: a process that can see a MIG instance sees
//! that one instance and no other GPU. So where a card is in MIG mode, xpud shows
//! CUDA only the cards that are not (`CUDA_VISIBLE_DEVICES`, by UUID), and a card
//! in MIG mode has no CUDA device in this process: its replicas' models run in the
//! worker process of their MIG instance (`worker`), which sees that instance alone.

use std::path::Path;
use std::sync::OnceLock;

/// Card index → CUDA ordinal, where MIG made them differ (none: they are equal).
static ORDINALS: OnceLock<Vec<Option<u32>>> = OnceLock::new();

/// A card as CUDA numbering needs it.
#[derive(Clone, Debug)]
pub struct Card {
    pub uuid: String,
    /// MIG mode is on.
    pub mig: bool,
}

/// What CUDA is shown, and so each card's ordinal.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// `CUDA_VISIBLE_DEVICES`, where some cards must be hidden.
    pub visible: Option<String>,
    /// By card index: its CUDA ordinal, none for a card in MIG mode.
    pub ordinals: Vec<Option<u32>>,
}

/// CUDA sees every card unless one is in MIG mode; then it sees the others, in
/// index order.
pub fn plan(cards: &[Card]) -> Plan {
    if !cards.iter().any(|c| c.mig) {
        return Plan {
            visible: None,
            ordinals: (0..cards.len() as u32).map(Some).collect(),
        };
    }
    let mut visible = Vec::new();
    let ordinals = cards
        .iter()
        .map(|card| {
            (!card.mig).then(|| {
                visible.push(card.uuid.as_str());
                visible.len() as u32 - 1
            })
        })
        .collect();
    Plan {
        visible: Some(visible.join(",")),
        ordinals,
    }
}

/// The cards NVML sees, in index order.
pub fn cards(nvml: &nvml_wrapper::Nvml) -> Result<Vec<Card>, String> {
    let count = nvml
        .device_count()
        .map_err(|e| format!("NVML cannot count the cards: {e}"))?;
    (0..count)
        .map(|index| {
            let info =
                super::nvml::info(nvml, index).map_err(|e| format!("card {index}: {e:?}"))?;
            let mig = super::nvml::mig_mode(nvml, index).is_ok_and(|m| m.current);
            Ok(Card {
                uuid: info.uuid.unwrap_or_default(),
                mig,
            })
        })
        .collect()
}

/// Numbers CUDA's devices as the cards are numbered, as far as CUDA allows (see
/// the module). `nvml_library` is the configured NVML; without one there are no
/// NVIDIA cards to number. Warns where the environment already decides otherwise.
///
/// Changes the process environment: `xpud serve` calls it before any thread starts.
pub fn number_devices(nvml_library: Option<&Path>) {
    match std::env::var("CUDA_DEVICE_ORDER") {
        Err(_) => std::env::set_var("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
        Ok(order) if order == "PCI_BUS_ID" => {}
        Ok(order) => tracing::warn!(
            "CUDA_DEVICE_ORDER={order}: CUDA's device numbers may not be the cards' indexes, \
             and a replica may run its models on another card than its own; unset it or \
             set PCI_BUS_ID"
        ),
    }
    if let Ok(visible) = std::env::var("CUDA_VISIBLE_DEVICES") {
        tracing::warn!(
            "CUDA_VISIBLE_DEVICES={visible}: CUDA numbers only these devices, so a card's \
             index may not be its CUDA ordinal, and a replica may run its models on \
             another card than its own"
        );
        return;
    }
    let Ok(nvml) = super::nvml::open(nvml_library) else {
        return;
    };
    let cards = cards(&nvml);
    // Shut down before the environment changes: the library is the one party
    // here that may have started threads.
    drop(nvml);
    let cards = match cards {
        Ok(cards) => cards,
        Err(e) => {
            tracing::warn!("cannot tell which cards are in MIG mode: {e}");
            return;
        }
    };
    let plan = plan(&cards);
    if let Some(visible) = &plan.visible {
        let in_mig: Vec<String> = (0..cards.len())
            .filter(|i| plan.ordinals[*i].is_none())
            .map(|i| i.to_string())
            .collect();
        tracing::info!(
            "cards in MIG mode ({}) have no CUDA device in this process: CUDA sees the \
             others only (CUDA_VISIBLE_DEVICES={visible:?})",
            in_mig.join(", ")
        );
        std::env::set_var("CUDA_VISIBLE_DEVICES", visible);
        let _ = ORDINALS.set(plan.ordinals);
    }
}

/// The CUDA ordinal of card `index`: none for a card this process cannot run
/// models on (in MIG mode, or unknown where MIG renumbered the others).
pub fn ordinal(index: u32) -> Option<u32> {
    match ORDINALS.get() {
        None => Some(index),
        Some(ordinals) => ordinals.get(index as usize).copied().flatten(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(uuid: &str, mig: bool) -> Card {
        Card {
            uuid: uuid.into(),
            mig,
        }
    }

    #[test]
    fn without_mig_every_card_is_its_own_index() {
        let plan = plan(&[card("GPU-a", false), card("GPU-b", false)]);
        assert_eq!(plan.visible, None);
        assert_eq!(plan.ordinals, [Some(0), Some(1)]);
    }

    #[test]
    fn cards_in_mig_mode_are_hidden_and_the_others_renumbered() {
        let plan = plan(&[
            card("GPU-a", false),
            card("GPU-b", true),
            card("GPU-c", false),
        ]);
        assert_eq!(plan.visible.as_deref(), Some("GPU-a,GPU-c"));
        assert_eq!(plan.ordinals, [Some(0), None, Some(1)]);
        // Every card in MIG mode: CUDA sees none.
        let plan = super::plan(&[card("GPU-a", true)]);
        assert_eq!(plan.visible.as_deref(), Some(""));
        assert_eq!(plan.ordinals, [None]);
    }
}
