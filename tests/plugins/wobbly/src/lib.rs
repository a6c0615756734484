//! wobbly: an algorithm plugin that crashes mid-stream, for the pipeline's
//! containment tests. Each frame raises one `FRAME` event; a frame whose centre
//! pixel is bright (any channel over 200) traps the instance, as a plugin with a bug
//! would on some input.
//!
//! It is also the test suite's plugin built against `xpu:plugin@0.1.0`, with
//! wit-bindgen directly and no SDK, as a vendor's plugin from before 0.2 was: the
//! host must keep running it unchanged.

wit_bindgen::generate!({ path: "../../../wit/v0.1.0", world: "algorithm-plugin" });

use exports::xpu::plugin::analyzer::{AnalyzerError, Event, Guest, GuestSession, Rule};
use xpu::plugin::frames::{Frame, Rect};

struct Wobbly;

struct Session {
    event_type: String,
}

impl Guest for Wobbly {
    type Session = Session;
}

impl GuestSession for Session {
    fn open(rules: Vec<Rule>) -> Result<exports::xpu::plugin::analyzer::Session, AnalyzerError> {
        let event_type = rules
            .first()
            .map(|r| r.event_type.clone())
            .ok_or_else(|| AnalyzerError::InvalidRules("no rules".into()))?;
        Ok(exports::xpu::plugin::analyzer::Session::new(Session {
            event_type,
        }))
    }

    fn process(&self, frame: &Frame) -> Result<Vec<Event>, AnalyzerError> {
        let centre = Rect {
            x: frame.width() / 2,
            y: frame.height() / 2,
            width: 1,
            height: 1,
        };
        let pixel = frame
            .read_region(centre)
            .map_err(|e| AnalyzerError::Processing(format!("read the centre: {e}")))?;
        if pixel.iter().any(|&v| v > 200) {
            core::arch::wasm32::unreachable();
        }
        Ok(vec![Event {
            event_type: "FRAME".into(),
            area_id: None,
            bbox: None,
            label: self.event_type.clone(),
            confidence: 1.0,
            attributes: "{}".into(),
        }])
    }
}

export!(Wobbly);
