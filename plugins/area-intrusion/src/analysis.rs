//! One session's per-frame work after inference, free of the component's types:
//! decode the detector's output, track, evaluate the rules. The plugin runs it in
//! WebAssembly; the host's benchmark compiles the same file natively, so that the
//! two are compared doing exactly the same work.

use super::detect::{self, Head};
use super::rules::{Alarm, Memory, Rule};
use super::tracker::{Track, Tracker, MAX_UNSEEN_MS};

pub struct Analysis {
    pub rules: Vec<Rule>,
    head: Head,
    input: (u32, u32),
    tracker: Tracker,
    memory: Memory,
    /// The lowest threshold of the rules: what the detector keeps.
    threshold: f32,
}

impl Analysis {
    pub fn new(rules: Vec<Rule>, head: Head, input: (u32, u32)) -> Analysis {
        let threshold = rules.iter().map(|r| r.threshold).fold(1.0f32, f32::min);
        Analysis {
            rules,
            head,
            input,
            tracker: Tracker::default(),
            memory: Memory::default(),
            threshold,
        }
    }

    /// One frame at `now_ms`, from the detector's output `data` of `shape`: the
    /// alarms it raises, each with its track.
    pub fn step(
        &mut self,
        shape: &[u32],
        data: &[f32],
        now_ms: u64,
    ) -> Result<Vec<(Alarm, Track)>, String> {
        let detections = detect::decode(self.head, shape, data, self.input, self.threshold)?;
        let tracks = self.tracker.update(detections, now_ms);
        let alarms = self.memory.evaluate(&self.rules, &tracks, now_ms);
        let live: Vec<u64> = tracks.iter().map(|t| t.id).collect();
        let keep = self
            .rules
            .iter()
            .map(|r| r.repeat_ms)
            .max()
            .unwrap_or(0)
            .max(MAX_UNSEEN_MS);
        self.memory.forget_except(&live, now_ms, keep);
        Ok(alarms
            .into_iter()
            .filter_map(|alarm| {
                let track = tracks.iter().find(|t| t.id == alarm.track)?.clone();
                Some((alarm, track))
            })
            .collect())
    }
}
