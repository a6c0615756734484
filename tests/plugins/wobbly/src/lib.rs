//! wobbly: an algorithm plugin that crashes mid-stream, for the pipeline's
//! containment tests. Each frame raises one `FRAME` event; a frame whose centre
//! pixel is bright (any channel over 200) traps the instance, as a plugin with a bug
//! would on some input.

use xpud_sdk::algorithm::*;

struct Wobbly {
    event_type: String,
}

impl Analyzer for Wobbly {
    fn open(rules: Vec<Rule>) -> Result<Self, AnalyzerError> {
        let event_type = rules
            .first()
            .map(|r| r.event_type.clone())
            .ok_or_else(|| AnalyzerError::InvalidRules("no rules".into()))?;
        Ok(Wobbly { event_type })
    }

    fn process(&mut self, frame: &Frame) -> Result<Vec<Event>, AnalyzerError> {
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

xpud_sdk::export_algorithm!(Wobbly);
