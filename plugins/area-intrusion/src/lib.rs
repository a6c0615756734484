//! area-intrusion: the reference analytics algorithm.
//!
//! Each frame goes through a detector run natively by the host (`inference`), an
//! IoU tracker, and the task's rules: every G.2 area type (a stay in a POLYGON for
//! `durationThreshold` seconds; SINGLE_LINE crossed left to right of the line as
//! drawn, SINGLE_LINE_BOTH either way; MULTI_LINE(_BOTH) the same on any segment of
//! a polyline), `masks` that hide what is inside them, `extendParams.sensitivity`
//! (高/中/低 or 0-1) as the confidence threshold and `repeatAlarmIntervalThreshold`
//! (seconds) between alarms of the same area and track. An alarm is an event whose
//! type is the rule's `eventType`, with the track id and, for lines, the direction.
//!
//! The package chooses the detector through its environment (package.toml `env`):
//! - `AREA_INTRUSION_MODEL`: the model file in the package (default `detector.onnx`);
//! - `AREA_INTRUSION_HEAD`: `grid` (an objectness heatmap `[1, 1, rows, cols]`) or
//!   `yolov8` (`[1, 4 + classes, N]`, with non-maximum suppression);
//! - `AREA_INTRUSION_INPUT`: the model's input size `WIDTHxHEIGHT` (default 256x144
//!   for grid, 640x640 for yolov8);
//! - `AREA_INTRUSION_LABELS`: class names, comma-separated (default `object`).

pub mod analysis;
pub mod detect;
pub mod geometry;
pub mod rules;
pub mod tracker;

use std::cell::RefCell;
use std::rc::Rc;

use serde_json::{json, Value};
use xpud_sdk::algorithm::inference::{ChannelOrder, Layout, Model, Preprocess};
use xpud_sdk::algorithm::*;

use analysis::Analysis;
use detect::Head;
use geometry::Pt;
use rules::Kind;

/// The detector this instance runs: loaded once, shared by its sessions.
struct Detector {
    model: Model,
    head: Head,
    input: (u32, u32),
    labels: Vec<String>,
}

thread_local! {
    static DETECTOR: RefCell<Option<Rc<Detector>>> = const { RefCell::new(None) };
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

fn detector() -> Result<Rc<Detector>, AnalyzerError> {
    if let Some(d) = DETECTOR.with(|d| d.borrow().clone()) {
        return Ok(d);
    }
    let invalid = AnalyzerError::InvalidRules;
    let head = Head::parse(&env("AREA_INTRUSION_HEAD").unwrap_or_else(|| "grid".into()))
        .map_err(invalid)?;
    let input = match env("AREA_INTRUSION_INPUT") {
        Some(size) => size
            .split_once('x')
            .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)))
            .filter(|&(w, h): &(u32, u32)| (1..=4096).contains(&w) && (1..=4096).contains(&h))
            .ok_or_else(|| {
                AnalyzerError::InvalidRules(format!("AREA_INTRUSION_INPUT {size:?}: WIDTHxHEIGHT"))
            })?,
        None if head == Head::Grid => (256, 144),
        None => (640, 640),
    };
    let path = env("AREA_INTRUSION_MODEL").unwrap_or_else(|| "detector.onnx".into());
    let model = Model::load(&path)
        .map_err(|e| AnalyzerError::InvalidRules(format!("detector model {path}: {e:?}")))?;
    xpud_sdk::info!(
        "detector {path} ({head:?}, {}x{}) runs on {}",
        input.0,
        input.1,
        model.provider()
    );
    let labels = env("AREA_INTRUSION_LABELS")
        .map(|l| l.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_else(|| vec!["object".to_string()]);
    let detector = Rc::new(Detector {
        model,
        head,
        input,
        labels,
    });
    DETECTOR.with(|d| *d.borrow_mut() = Some(detector.clone()));
    Ok(detector)
}

fn points(area: &Area) -> Vec<Pt> {
    area.points.iter().map(|p| Pt { x: p.x, y: p.y }).collect()
}

fn rule(index: usize, rule: &Rule) -> Result<rules::Rule, AnalyzerError> {
    let at = |what: String| AnalyzerError::InvalidRules(format!("rulesParams[{index}]: {what}"));
    let params: Value =
        serde_json::from_str(&rule.extend_params).map_err(|e| at(format!("extendParams: {e}")))?;
    let areas = rule
        .areas
        .iter()
        .map(|area| {
            let kind = match area.area_type {
                AreaType::Polygon => Kind::Polygon,
                AreaType::SingleLine => Kind::Line { both: false },
                AreaType::SingleLineBoth => Kind::Line { both: true },
                AreaType::MultiLine => Kind::Line { both: false },
                AreaType::MultiLineBoth => Kind::Line { both: true },
            };
            let mut points = points(area);
            // A single line is its first segment.
            if matches!(
                area.area_type,
                AreaType::SingleLine | AreaType::SingleLineBoth
            ) {
                points.truncate(2);
            }
            let needed = if kind == Kind::Polygon { 3 } else { 2 };
            if points.len() < needed {
                return Err(at(format!("area {}: needs {needed} points", area.id)));
            }
            Ok(rules::Area {
                id: area.id,
                kind,
                points,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rules::Rule {
        event_type: rule.event_type.clone(),
        areas,
        masks: rule.masks.iter().map(points).collect(),
        threshold: rules::threshold(params.get("sensitivity")).map_err(at)?,
        duration_ms: rules::seconds(&params, "durationThreshold").map_err(at)?,
        repeat_ms: rules::seconds(&params, "repeatAlarmIntervalThreshold").map_err(at)?,
    })
}

struct AreaIntrusion {
    detector: Rc<Detector>,
    analysis: Analysis,
}

impl Analyzer for AreaIntrusion {
    fn open(rules: Vec<Rule>) -> Result<Self, AnalyzerError> {
        if rules.is_empty() {
            return Err(AnalyzerError::InvalidRules("no rules".into()));
        }
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule(i, r))
            .collect::<Result<Vec<_>, _>>()?;
        let detector = detector()?;
        let analysis = Analysis::new(rules, detector.head, detector.input);
        Ok(AreaIntrusion { detector, analysis })
    }

    fn process(&mut self, frame: &Frame) -> Result<Vec<Event>, AnalyzerError> {
        let detector = &self.detector;
        let pre = Preprocess {
            crop: None,
            width: detector.input.0,
            height: detector.input.1,
            layout: Layout::Nchw,
            channel_order: ChannelOrder::Rgb,
            mean: (0.0, 0.0, 0.0),
            std: (1.0, 1.0, 1.0),
        };
        let outputs = detector
            .model
            .run(frame, pre)
            .map_err(|e| AnalyzerError::Processing(format!("detector: {e:?}")))?;
        let output = outputs
            .first()
            .ok_or_else(|| AnalyzerError::Processing("detector: no output".into()))?;
        let alarms = self
            .analysis
            .step(&output.shape, &output.data, frame.timestamp_ms())
            .map_err(|e| AnalyzerError::Processing(format!("detector: {e}")))?;
        Ok(alarms
            .into_iter()
            .map(|(alarm, track)| {
                let label = detector
                    .labels
                    .get(track.class)
                    .cloned()
                    .unwrap_or_else(|| format!("class{}", track.class));
                let mut attributes = json!({ "trackId": track.id });
                if let Some(direction) = alarm.direction {
                    attributes["direction"] = json!(direction.as_str());
                }
                Event {
                    event_type: self.analysis.rules[alarm.rule].event_type.clone(),
                    area_id: Some(alarm.area),
                    bbox: Some(BoundingBox {
                        x: track.bbox.x,
                        y: track.bbox.y,
                        width: track.bbox.w,
                        height: track.bbox.h,
                    }),
                    label,
                    confidence: track.confidence,
                    attributes: attributes.to_string(),
                }
            })
            .collect())
    }
}

xpud_sdk::export_algorithm!(AreaIntrusion);
