//! Turning a detector's output tensor into boxes, for the two heads the package
//! manifest can choose (`AREA_INTRUSION_HEAD`).

use super::geometry::BoxN;

/// One detected object, normalised to the frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    pub bbox: BoxN,
    pub class: usize,
    pub confidence: f32,
}

/// The detector's output convention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// `[1, 1, rows, cols]` objectness per cell: connected cells over the threshold
    /// make one object (class 0), its confidence the strongest cell.
    Grid,
    /// YOLOv8's detect head: `[1, 4 + classes, candidates]`, each candidate
    /// `cx, cy, w, h` in input pixels then one score per class; non-maximum
    /// suppression per class.
    YoloV8,
}

impl Head {
    pub fn parse(name: &str) -> Result<Head, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "grid" | "heatmap" => Ok(Head::Grid),
            "yolov8" | "yolo" => Ok(Head::YoloV8),
            other => Err(format!("AREA_INTRUSION_HEAD {other:?}: grid or yolov8")),
        }
    }
}

/// Boxes overlapping a stronger box of the same class by more than this go.
const NMS_IOU: f64 = 0.45;
/// Most candidates decoded (a YOLOv8 at 640x640 has 8400).
const MAX_CANDIDATES: usize = 100_000;

/// Decodes `data` of `shape` under `head`; `input` is the model's input size (w, h),
/// which YOLOv8 boxes are measured in. Only detections at or over `threshold`.
pub fn decode(
    head: Head,
    shape: &[u32],
    data: &[f32],
    input: (u32, u32),
    threshold: f32,
) -> Result<Vec<Detection>, String> {
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let expected: usize = dims.iter().product();
    if expected != data.len() {
        return Err(format!(
            "output shape {shape:?} does not match its {} values",
            data.len()
        ));
    }
    match head {
        Head::Grid => {
            let [1, 1, rows, cols] = dims[..] else {
                return Err(format!(
                    "grid head: output {shape:?} is not [1, 1, rows, cols]"
                ));
            };
            Ok(grid(data, rows, cols, threshold))
        }
        Head::YoloV8 => {
            let [1, rows, candidates] = dims[..] else {
                return Err(format!(
                    "yolov8 head: output {shape:?} is not [1, 4 + classes, N]"
                ));
            };
            if rows < 5 || candidates > MAX_CANDIDATES {
                return Err(format!(
                    "yolov8 head: output {shape:?} has no class scores or too many candidates"
                ));
            }
            Ok(yolov8(data, rows - 4, candidates, input, threshold))
        }
    }
}

fn grid(data: &[f32], rows: usize, cols: usize, threshold: f32) -> Vec<Detection> {
    let hot = |r: usize, c: usize| data[r * cols + c] >= threshold;
    let mut seen = vec![false; rows * cols];
    let mut found = Vec::new();
    for start in 0..rows * cols {
        if seen[start] || !hot(start / cols, start % cols) {
            continue;
        }
        // One connected component (4-neighbours), by flood fill.
        let (mut r0, mut c0, mut r1, mut c1) = (usize::MAX, usize::MAX, 0, 0);
        let mut best = 0.0f32;
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(cell) = stack.pop() {
            let (r, c) = (cell / cols, cell % cols);
            (r0, c0, r1, c1) = (r0.min(r), c0.min(c), r1.max(r), c1.max(c));
            best = best.max(data[cell]);
            let mut visit = |r: usize, c: usize| {
                let next = r * cols + c;
                if !seen[next] && hot(r, c) {
                    seen[next] = true;
                    stack.push(next);
                }
            };
            if r > 0 {
                visit(r - 1, c);
            }
            if r + 1 < rows {
                visit(r + 1, c);
            }
            if c > 0 {
                visit(r, c - 1);
            }
            if c + 1 < cols {
                visit(r, c + 1);
            }
        }
        found.push(Detection {
            bbox: BoxN {
                x: c0 as f64 / cols as f64,
                y: r0 as f64 / rows as f64,
                w: (c1 - c0 + 1) as f64 / cols as f64,
                h: (r1 - r0 + 1) as f64 / rows as f64,
            },
            class: 0,
            confidence: best.min(1.0),
        });
    }
    found
}

fn yolov8(
    data: &[f32],
    classes: usize,
    candidates: usize,
    (width, height): (u32, u32),
    threshold: f32,
) -> Vec<Detection> {
    let at = |row: usize, n: usize| data[row * candidates + n];
    let (w_in, h_in) = (f64::from(width.max(1)), f64::from(height.max(1)));
    let mut found: Vec<Detection> = (0..candidates)
        .filter_map(|n| {
            let (class, score) = (0..classes)
                .map(|k| (k, at(4 + k, n)))
                .fold((0, f32::MIN), |best, c| if c.1 > best.1 { c } else { best });
            // NaN scores fail this too.
            if score.partial_cmp(&threshold).is_none_or(|o| o.is_lt()) {
                return None;
            }
            let (cx, cy, w, h) = (
                f64::from(at(0, n)),
                f64::from(at(1, n)),
                f64::from(at(2, n)),
                f64::from(at(3, n)),
            );
            let bbox = BoxN {
                x: ((cx - w / 2.0) / w_in).clamp(0.0, 1.0),
                y: ((cy - h / 2.0) / h_in).clamp(0.0, 1.0),
                w: (w / w_in).clamp(0.0, 1.0),
                h: (h / h_in).clamp(0.0, 1.0),
            };
            bbox.w.is_finite().then_some(Detection {
                bbox,
                class,
                confidence: score.min(1.0),
            })
        })
        .collect();
    found.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    let mut kept: Vec<Detection> = Vec::new();
    for detection in found {
        if kept
            .iter()
            .all(|k| k.class != detection.class || k.bbox.iou(&detection.bbox) <= NMS_IOU)
        {
            kept.push(detection);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_cell_cluster_is_one_object() {
        // 4x6 grid, one 2x2 hot block and one single hot cell.
        #[rustfmt::skip]
        let data = [
            0.0, 0.9, 0.8, 0.0, 0.0, 0.0,
            0.0, 0.7, 1.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.6,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        let found = decode(Head::Grid, &[1, 1, 4, 6], &data, (6, 4), 0.5).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(
            found[0].bbox,
            BoxN {
                x: 1.0 / 6.0,
                y: 0.0,
                w: 2.0 / 6.0,
                h: 0.5
            }
        );
        assert_eq!(found[0].confidence, 1.0);
        assert_eq!(
            found[1].bbox,
            BoxN {
                x: 5.0 / 6.0,
                y: 0.5,
                w: 1.0 / 6.0,
                h: 0.25
            }
        );
        // Over the threshold only.
        assert_eq!(
            decode(Head::Grid, &[1, 1, 4, 6], &data, (6, 4), 0.95)
                .unwrap()
                .len(),
            1
        );
    }

    /// The candidates of tests/models/make_models.py's yolo_known.onnx.
    pub const YOLO_KNOWN: [[f32; 6]; 4] = [
        [20.0, 20.0, 10.0, 10.0, 0.90, 0.05],
        [21.0, 21.0, 10.0, 10.0, 0.80, 0.05],
        [48.0, 40.0, 8.0, 16.0, 0.10, 0.70],
        [10.0, 50.0, 6.0, 6.0, 0.20, 0.10],
    ];

    #[test]
    fn yolov8_candidates_are_decoded_and_suppressed() {
        let data: Vec<f32> = (0..6)
            .flat_map(|row| YOLO_KNOWN.iter().map(move |c| c[row]))
            .collect();
        let found = decode(Head::YoloV8, &[1, 6, 4], &data, (64, 64), 0.5).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].class, 0);
        assert_eq!(found[0].confidence, 0.9);
        assert_eq!(
            found[0].bbox,
            BoxN {
                x: 15.0 / 64.0,
                y: 15.0 / 64.0,
                w: 10.0 / 64.0,
                h: 10.0 / 64.0
            }
        );
        assert_eq!(found[1].class, 1);
        assert_eq!(
            found[1].bbox,
            BoxN {
                x: 44.0 / 64.0,
                y: 32.0 / 64.0,
                w: 8.0 / 64.0,
                h: 16.0 / 64.0
            }
        );
        assert!(decode(Head::YoloV8, &[1, 6, 5], &data, (64, 64), 0.5).is_err());
        assert!(decode(Head::Grid, &[1, 6, 4], &data, (64, 64), 0.5).is_err());
    }
}
