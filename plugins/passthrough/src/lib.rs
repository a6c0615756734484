//! passthrough: the smallest algorithm that proves the algorithm world end to end.
//!
//! For every frame it raises one `FRAME_SEEN` event per rule, carrying the frame's size
//! and time and the mean brightness of a small patch at the frame's centre (the only
//! pixels it reads: 16x16 of them).
//!
//! A rule whose `extendParams` names a model (`{"model": "m.onnx", "inputWidth": 224,
//! "inputHeight": 224}`) also runs that model from the plugin's package on each frame,
//! natively in the host, and adds its outputs and execution provider to the event.
//! A rule with `{"echoEnv": true}` adds the environment variables and arguments the
//! instance was started with (what a service's `envs` became), for checking them.

use serde_json::{json, Map, Value};
use xpud_sdk::algorithm::inference::{ChannelOrder, Layout, Model, Preprocess};
use xpud_sdk::algorithm::*;

const PATCH: u32 = 16;

struct RuleState {
    rule: Rule,
    model: Option<(Model, Preprocess)>,
    echo_env: bool,
}

struct Passthrough {
    rules: Vec<RuleState>,
    frames: u64,
}

fn check_area(area: &Area) -> Result<(), AnalyzerError> {
    let needed = match area.area_type {
        AreaType::Polygon => 3,
        _ => 2,
    };
    if area.points.len() < needed {
        return Err(AnalyzerError::InvalidRules(format!(
            "area {}: {:?} needs at least {needed} points, got {}",
            area.id,
            area.area_type,
            area.points.len()
        )));
    }
    if let Some(p) = area
        .points
        .iter()
        .find(|p| !(0.0..=1.0).contains(&p.x) || !(0.0..=1.0).contains(&p.y))
    {
        return Err(AnalyzerError::InvalidRules(format!(
            "area {}: point ({}, {}) is outside the normalised frame 0..1",
            area.id, p.x, p.y
        )));
    }
    Ok(())
}

/// Loads the model a rule's extendParams names, if any.
fn rule_model(rule: &Rule) -> Result<Option<(Model, Preprocess)>, AnalyzerError> {
    let params: Value = serde_json::from_str(&rule.extend_params)
        .map_err(|e| AnalyzerError::InvalidRules(format!("extendParams: {e}")))?;
    let Some(path) = params.get("model") else {
        return Ok(None);
    };
    let path = path
        .as_str()
        .ok_or_else(|| AnalyzerError::InvalidRules("extendParams.model: not a string".into()))?;
    let side = |key: &str| -> Result<u32, AnalyzerError> {
        match params.get(key) {
            None => Ok(224),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    AnalyzerError::InvalidRules(format!("extendParams.{key}: not a size"))
                }),
        }
    };
    let pre = Preprocess {
        crop: None,
        width: side("inputWidth")?,
        height: side("inputHeight")?,
        layout: Layout::Nchw,
        channel_order: ChannelOrder::Rgb,
        mean: (0.0, 0.0, 0.0),
        std: (1.0, 1.0, 1.0),
    };
    let model = Model::load(path)
        .map_err(|e| AnalyzerError::InvalidRules(format!("extendParams.model {path}: {e:?}")))?;
    xpud_sdk::info!("model {path} runs on {}", model.provider());
    Ok(Some((model, pre)))
}

impl Analyzer for Passthrough {
    fn open(rules: Vec<Rule>) -> Result<Self, AnalyzerError> {
        if rules.is_empty() {
            return Err(AnalyzerError::InvalidRules("no rules".into()));
        }
        let mut states = Vec::with_capacity(rules.len());
        for rule in rules {
            if rule.event_type.is_empty() {
                return Err(AnalyzerError::InvalidRules("eventType is empty".into()));
            }
            rule.areas
                .iter()
                .chain(&rule.masks)
                .try_for_each(check_area)?;
            let model = rule_model(&rule)?;
            let echo_env = serde_json::from_str::<Value>(&rule.extend_params)
                .ok()
                .and_then(|p| p.get("echoEnv").and_then(Value::as_bool))
                .unwrap_or(false);
            states.push(RuleState {
                rule,
                model,
                echo_env,
            });
        }
        xpud_sdk::debug!("session opened with {} rule(s)", states.len());
        Ok(Passthrough {
            rules: states,
            frames: 0,
        })
    }

    fn process(&mut self, frame: &Frame) -> Result<Vec<Event>, AnalyzerError> {
        self.frames += 1;
        let (width, height) = (frame.width(), frame.height());
        let patch = Rect {
            x: width.saturating_sub(PATCH) / 2,
            y: height.saturating_sub(PATCH) / 2,
            width: PATCH.min(width),
            height: PATCH.min(height),
        };
        let pixels = frame
            .read_region(patch)
            .map_err(|e| AnalyzerError::Processing(format!("read centre patch: {e}")))?;
        let brightness = if pixels.is_empty() {
            0.0
        } else {
            pixels.iter().map(|&b| f64::from(b)).sum::<f64>() / pixels.len() as f64
        };
        let mut events = Vec::with_capacity(self.rules.len());
        for state in &self.rules {
            let mut attributes = json!({
                "width": width,
                "height": height,
                "timestampMs": frame.timestamp_ms(),
                "frame": self.frames,
                "centreBrightness": (brightness * 100.0).round() / 100.0,
            });
            if state.echo_env {
                let env: Map<String, Value> = std::env::vars()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                attributes["env"] = Value::Object(env);
                attributes["args"] = json!(std::env::args().collect::<Vec<_>>());
            }
            if let Some((model, pre)) = &state.model {
                let tensors = model
                    .run(frame, *pre)
                    .map_err(|e| AnalyzerError::Processing(format!("inference: {e:?}")))?;
                let outputs: Map<String, Value> = tensors
                    .into_iter()
                    .map(|t| (t.name, json!({ "shape": t.shape, "data": t.data })))
                    .collect();
                attributes["model"] = json!({ "provider": model.provider(), "outputs": outputs });
            }
            events.push(Event {
                event_type: "FRAME_SEEN".into(),
                area_id: state.rule.areas.first().map(|a| a.id),
                bbox: None,
                label: state.rule.event_type.clone(),
                confidence: 1.0,
                attributes: attributes.to_string(),
            });
        }
        Ok(events)
    }
}

xpud_sdk::export_algorithm!(Passthrough);
