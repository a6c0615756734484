//! An IoU tracker with a centroid fallback: each detection joins the track it
//! overlaps most (or, for small fast objects that overlap nothing, the nearest
//! whose centre is within one and a half box sizes); the rest start new tracks. A
//! track unseen for `MAX_UNSEEN_MS` of stream time is dropped.

use super::detect::Detection;
use super::geometry::{BoxN, Pt};

const MIN_IOU: f64 = 0.2;
/// Stream time a track survives without a detection.
pub const MAX_UNSEEN_MS: u64 = 1000;

#[derive(Clone, Debug)]
pub struct Track {
    pub id: u64,
    pub bbox: BoxN,
    pub class: usize,
    pub confidence: f32,
    /// Where its centre was at the previous detection (none on the first).
    pub previous: Option<Pt>,
    pub last_seen_ms: u64,
}

impl Track {
    pub fn centre(&self) -> Pt {
        self.bbox.centre()
    }
}

#[derive(Default)]
pub struct Tracker {
    tracks: Vec<Track>,
    next_id: u64,
}

impl Tracker {
    /// Folds one frame's detections in; returns the tracks seen on this frame.
    pub fn update(&mut self, detections: Vec<Detection>, now_ms: u64) -> Vec<Track> {
        self.tracks
            .retain(|t| now_ms.saturating_sub(t.last_seen_ms) <= MAX_UNSEEN_MS);
        // Pairs by score, best first: IoU, else closeness of centres.
        let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
        for (d, detection) in detections.iter().enumerate() {
            for (t, track) in self.tracks.iter().enumerate() {
                if track.class != detection.class {
                    continue;
                }
                let iou = track.bbox.iou(&detection.bbox);
                let score = if iou >= MIN_IOU {
                    1.0 + iou
                } else {
                    let (a, b) = (track.centre(), detection.bbox.centre());
                    let distance = ((a.x - b.x).powi(2) + (a.y - b.y).powi(2)).sqrt();
                    let reach = 1.5 * track.bbox.w.max(track.bbox.h);
                    if distance > reach || reach == 0.0 {
                        continue;
                    }
                    1.0 - distance / reach
                };
                pairs.push((score, d, t));
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut detection_taken = vec![false; detections.len()];
        let mut track_taken = vec![false; self.tracks.len()];
        for (_, d, t) in pairs {
            if detection_taken[d] || track_taken[t] {
                continue;
            }
            detection_taken[d] = true;
            track_taken[t] = true;
            let track = &mut self.tracks[t];
            track.previous = Some(track.centre());
            track.bbox = detections[d].bbox;
            track.confidence = detections[d].confidence;
            track.last_seen_ms = now_ms;
        }
        for (d, detection) in detections.into_iter().enumerate() {
            if detection_taken[d] {
                continue;
            }
            self.next_id += 1;
            self.tracks.push(Track {
                id: self.next_id,
                bbox: detection.bbox,
                class: detection.class,
                confidence: detection.confidence,
                previous: None,
                last_seen_ms: now_ms,
            });
        }
        self.tracks
            .iter()
            .filter(|t| t.last_seen_ms == now_ms)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(x: f64) -> Detection {
        Detection {
            bbox: BoxN {
                x,
                y: 0.1,
                w: 0.05,
                h: 0.05,
            },
            class: 0,
            confidence: 0.9,
        }
    }

    #[test]
    fn tracks_keep_their_ids_and_are_dropped_when_unseen() {
        let mut tracker = Tracker::default();
        let first = tracker.update(vec![at(0.1), at(0.6)], 0);
        assert_eq!(first.iter().map(|t| t.id).collect::<Vec<_>>(), vec![1, 2]);
        // Moved a little (overlapping) and a lot (no overlap, within reach).
        let second = tracker.update(vec![at(0.62), at(0.16)], 200);
        let mut ids: Vec<(u64, bool)> = second
            .iter()
            .map(|t| (t.id, t.previous.is_some()))
            .collect();
        ids.sort();
        assert_eq!(ids, vec![(1, true), (2, true)]);
        // Unseen past the limit: gone; what comes next is new.
        let third = tracker.update(vec![at(0.2)], 200 + MAX_UNSEEN_MS + 1);
        assert_eq!(third[0].id, 3);
    }
}
