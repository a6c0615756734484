//! A task's rules as this algorithm reads them, and the alarms they raise.
//!
//! Times are the frames' (the stream's own timeline), so a recorded file analysed
//! faster than real time raises the same alarms as the same scene live.

use std::collections::HashMap;

use serde_json::Value;

use super::geometry::{crossing, inside, Crossing, Pt};
use super::tracker::Track;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Polygon,
    /// Crossings left to right of the line as drawn (`both`: either way); a
    /// multi-line is a polyline whose every segment counts.
    Line {
        both: bool,
    },
}

#[derive(Clone, Debug)]
pub struct Area {
    pub id: i32,
    pub kind: Kind,
    pub points: Vec<Pt>,
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub event_type: String,
    pub areas: Vec<Area>,
    pub masks: Vec<Vec<Pt>>,
    /// Detections under this confidence are ignored.
    pub threshold: f32,
    /// How long an object stays in a polygon before it raises an alarm.
    pub duration_ms: u64,
    /// No new alarm for the same area and track within this time (0: a stay in a
    /// polygon alarms once).
    pub repeat_ms: u64,
}

/// `extendParams.sensitivity`: the text's 高/中/低 (or high/medium/low), or a
/// number 0-1 where 1 is the most sensitive. The confidence threshold it sets.
pub fn threshold(sensitivity: Option<&Value>) -> Result<f32, String> {
    match sensitivity {
        None | Some(Value::Null) => Ok(0.5),
        Some(Value::String(s)) => match s.trim() {
            "高" | "high" | "HIGH" => Ok(0.3),
            "中" | "medium" | "MEDIUM" => Ok(0.5),
            "低" | "low" | "LOW" => Ok(0.7),
            other => other
                .parse::<f64>()
                .map_err(|_| format!("extendParams.sensitivity {other:?}: 高, 中, 低 or 0-1"))
                .and_then(|n| threshold(Some(&Value::from(n)))),
        },
        Some(Value::Number(n)) => match n.as_f64() {
            Some(s) if (0.0..=1.0).contains(&s) => Ok((1.0 - s).clamp(0.05, 0.95) as f32),
            _ => Err(format!("extendParams.sensitivity {n}: 0-1")),
        },
        Some(other) => Err(format!(
            "extendParams.sensitivity {other}: 高, 中, 低 or 0-1"
        )),
    }
}

/// Seconds in `extendParams[key]` (a number, or a string holding one), as ms.
pub fn seconds(params: &Value, key: &str) -> Result<u64, String> {
    let value = match params.get(key) {
        None | Some(Value::Null) => return Ok(0),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match value {
        Some(s) if s.is_finite() && (0.0..=86_400.0 * 365.0).contains(&s) => {
            Ok((s * 1000.0).round() as u64)
        }
        _ => Err(format!("extendParams.{key}: seconds, 0 or more")),
    }
}

/// One alarm: which rule and area, about which track, how.
#[derive(Clone, Debug, PartialEq)]
pub struct Alarm {
    pub rule: usize,
    pub area: i32,
    pub track: u64,
    pub direction: Option<Crossing>,
}

/// What the rules remember between frames.
#[derive(Default)]
pub struct Memory {
    /// (rule, area, track) -> since when the track is inside the polygon.
    inside_since: HashMap<(usize, i32, u64), u64>,
    /// (rule, area, track) -> when it last alarmed.
    last_alarm: HashMap<(usize, i32, u64), u64>,
}

impl Memory {
    /// Evaluates every rule on this frame's tracks.
    pub fn evaluate(&mut self, rules: &[Rule], tracks: &[Track], now_ms: u64) -> Vec<Alarm> {
        let mut alarms = Vec::new();
        for (r, rule) in rules.iter().enumerate() {
            for track in tracks {
                if track.confidence < rule.threshold {
                    continue;
                }
                let centre = track.centre();
                if rule.masks.iter().any(|mask| inside(centre, mask)) {
                    continue;
                }
                for area in &rule.areas {
                    let key = (r, area.id, track.id);
                    let alarm = match area.kind {
                        Kind::Polygon => {
                            if !inside(centre, &area.points) {
                                self.inside_since.remove(&key);
                                continue;
                            }
                            let since = *self.inside_since.entry(key).or_insert(now_ms);
                            now_ms - since >= rule.duration_ms
                        }
                        Kind::Line { both } => {
                            let Some(from) = track.previous else {
                                continue;
                            };
                            let crossed = area
                                .points
                                .windows(2)
                                .find_map(|segment| crossing(segment[0], segment[1], from, centre));
                            match crossed {
                                Some(Crossing::LeftToRight) => true,
                                Some(Crossing::RightToLeft) => both,
                                None => false,
                            }
                        }
                    };
                    if !alarm {
                        continue;
                    }
                    let quiet = match self.last_alarm.get(&key) {
                        None => false,
                        // A stay in a polygon alarms once, unless repeats are asked for.
                        Some(_) if rule.repeat_ms == 0 && area.kind == Kind::Polygon => true,
                        Some(&last) => now_ms - last < rule.repeat_ms,
                    };
                    if quiet {
                        continue;
                    }
                    self.last_alarm.insert(key, now_ms);
                    let direction = match area.kind {
                        Kind::Polygon => None,
                        Kind::Line { .. } => area
                            .points
                            .windows(2)
                            .find_map(|s| crossing(s[0], s[1], track.previous?, centre)),
                    };
                    alarms.push(Alarm {
                        rule: r,
                        area: area.id,
                        track: track.id,
                        direction,
                    });
                }
            }
        }
        alarms
    }

    /// Forgets tracks that are gone (bounded memory on an endless stream).
    pub fn forget_except(&mut self, live: &[u64], now_ms: u64, keep_ms: u64) {
        self.inside_since.retain(|k, _| live.contains(&k.2));
        self.last_alarm
            .retain(|k, at| live.contains(&k.2) || now_ms.saturating_sub(*at) < keep_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::super::geometry::BoxN;
    use super::*;

    fn pt(x: f64, y: f64) -> Pt {
        Pt { x, y }
    }

    fn track(id: u64, from: Option<Pt>, at: Pt) -> Track {
        Track {
            id,
            bbox: BoxN {
                x: at.x - 0.01,
                y: at.y - 0.01,
                w: 0.02,
                h: 0.02,
            },
            class: 0,
            confidence: 0.9,
            previous: from,
            last_seen_ms: 0,
        }
    }

    fn rule(kind: Kind, points: Vec<Pt>) -> Rule {
        Rule {
            event_type: "X".into(),
            areas: vec![Area {
                id: 1,
                kind,
                points,
            }],
            masks: vec![],
            threshold: 0.5,
            duration_ms: 1000,
            repeat_ms: 0,
        }
    }

    #[test]
    fn a_stay_in_a_polygon_alarms_once_after_the_duration() {
        let rules = [rule(
            Kind::Polygon,
            vec![pt(0.5, 0.5), pt(1.0, 0.5), pt(1.0, 1.0), pt(0.5, 1.0)],
        )];
        let mut memory = Memory::default();
        let stay = [track(1, None, pt(0.7, 0.7))];
        let mut inside_at = |ms| memory.evaluate(&rules, &stay, ms).len();
        assert_eq!(inside_at(0), 0);
        assert_eq!(inside_at(800), 0);
        assert_eq!(inside_at(1000), 1);
        assert_eq!(inside_at(1200), 0);
        assert_eq!(inside_at(60_000), 0);
    }

    #[test]
    fn repeats_wait_for_the_interval_and_masks_hide() {
        let mut line = rule(Kind::Line { both: true }, vec![pt(0.5, 0.0), pt(0.5, 1.0)]);
        line.repeat_ms = 5000;
        let mut memory = Memory::default();
        let across = |from: f64, to: f64| track(1, Some(pt(from, 0.5)), pt(to, 0.5));
        let rules = [line.clone()];
        assert_eq!(memory.evaluate(&rules, &[across(0.4, 0.6)], 0).len(), 1);
        assert_eq!(memory.evaluate(&rules, &[across(0.6, 0.4)], 1000).len(), 0);
        let back = memory.evaluate(&rules, &[across(0.6, 0.4)], 6000);
        assert_eq!(back[0].direction, Some(Crossing::LeftToRight));
        // Drawn downwards, screen-right to screen-left is left to right... of the
        // line as drawn; a single line only counts that way.
        let single = [rule(
            Kind::Line { both: false },
            vec![pt(0.5, 0.0), pt(0.5, 1.0)],
        )];
        let mut memory = Memory::default();
        assert_eq!(memory.evaluate(&single, &[across(0.4, 0.6)], 0).len(), 0);
        assert_eq!(memory.evaluate(&single, &[across(0.6, 0.4)], 200).len(), 1);
        // A mask over the crossing hides it.
        let mut masked = line;
        masked.masks = vec![vec![
            pt(0.55, 0.4),
            pt(0.7, 0.4),
            pt(0.7, 0.6),
            pt(0.55, 0.6),
        ]];
        let mut memory = Memory::default();
        assert_eq!(memory.evaluate(&[masked], &[across(0.4, 0.6)], 0).len(), 0);
    }

    #[test]
    fn sensitivity_and_seconds() {
        assert_eq!(threshold(Some(&Value::from("低"))), Ok(0.7));
        assert_eq!(threshold(Some(&Value::from("高"))), Ok(0.3));
        assert_eq!(threshold(None), Ok(0.5));
        assert!((threshold(Some(&Value::from(0.8))).unwrap() - 0.2).abs() < 1e-6);
        assert!(threshold(Some(&Value::from(3))).is_err());
        let params =
            serde_json::json!({ "durationThreshold": 1, "repeatAlarmIntervalThreshold": "720" });
        assert_eq!(seconds(&params, "durationThreshold"), Ok(1000));
        assert_eq!(
            seconds(&params, "repeatAlarmIntervalThreshold"),
            Ok(720_000)
        );
        assert_eq!(seconds(&params, "missing"), Ok(0));
        assert!(seconds(&serde_json::json!({ "d": -1 }), "d").is_err());
    }
}
