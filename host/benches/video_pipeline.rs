//! The video pipeline, stage by stage, in one run: a 1080p H.264 30 fps source
//! analysed at 5 fps through the real task pipeline (ffmpeg child, frame pool,
//! pipeline thread), with four kinds of analysis:
//!
//! - (a) none: ffmpeg decode alone at the same settings;
//! - (b) preprocess + ONNX Runtime on the host, no plugin;
//! - (c) the area-intrusion plugin as WebAssembly (its detector run by the host);
//! - (d) the same algorithm compiled natively into the host (the plugin's own
//!   analysis files, `#[path]`-included), with the same detector run.
//!
//! Each row is frames analysed per second of wall time (median of `RUNS`, the rows
//! run in interleaved rounds), the CPU it cost (this process and its ffmpeg
//! children) per analysed frame, and from that the streams one core carries at
//! 5 fps. Then the memory one more (c) stream
//! costs, from 4 at once: xpud's resident growth, and ffmpeg's proportional set
//! size (its shared libraries counted once across the streams).
//!
//! `cargo bench --bench video_pipeline` (after scripts/test, which builds the plugins
//! and the test models, and with ffmpeg installed). BENCHMARKS.md records a run.

#[path = "../../tests/support/mod.rs"]
mod support;

// The plugin's analysis, compiled natively: the baseline (d). Its files refer to
// each other as `super::...`: they sit side by side at the crate root here.
#[allow(dead_code, unused_imports)]
#[path = "../../plugins/area-intrusion/src/analysis.rs"]
mod analysis;
#[allow(dead_code, unused_imports)]
#[path = "../../plugins/area-intrusion/src/detect.rs"]
mod detect;
#[allow(dead_code, unused_imports)]
#[path = "../../plugins/area-intrusion/src/geometry.rs"]
mod geometry;
#[allow(dead_code, unused_imports)]
#[path = "../../plugins/area-intrusion/src/rules.rs"]
mod rules;
#[allow(dead_code, unused_imports)]
#[path = "../../plugins/area-intrusion/src/tracker.rs"]
mod tracker;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use support::*;
use xpud::pipeline::decode::Settings;
use xpud::pipeline::source::Source;
use xpud::pipeline::{Analyse, Pipeline, Report, Spec, State};
use xpud::runtime::bindings::analyzer::{self, Event};
use xpud::runtime::bindings::wit_inference::{ChannelOrder, Layout, Preprocess};
use xpud::runtime::frames::Frame;
use xpud::runtime::inference::NativeModel;
use xpud::runtime::Launch;

const RUNS: usize = 5;
const SECONDS: u32 = 30;
const FPS: f64 = 5.0;
const INPUT: (u32, u32) = (256, 144);

fn preprocess() -> Preprocess {
    Preprocess {
        crop: None,
        width: INPUT.0,
        height: INPUT.1,
        layout: Layout::Nchw,
        channel_order: ChannelOrder::Rgb,
        mean: (0.0, 0.0, 0.0),
        std: (1.0, 1.0, 1.0),
    }
}

/// The rules of the area-intrusion test: a line and a polygon.
fn rules() -> Vec<analyzer::Rule> {
    let point = |x, y| analyzer::Point { x, y };
    vec![analyzer::Rule {
        event_type: "AREA_INTRUSION".into(),
        areas: vec![
            analyzer::Area {
                id: 1,
                area_type: analyzer::AreaType::SingleLine,
                points: vec![point(0.5, 0.4), point(0.5, 0.0)],
            },
            analyzer::Area {
                id: 2,
                area_type: analyzer::AreaType::Polygon,
                points: vec![
                    point(0.05, 0.55),
                    point(0.95, 0.55),
                    point(0.95, 0.98),
                    point(0.05, 0.98),
                ],
            },
        ],
        masks: vec![],
        extend_params: r#"{"sensitivity": "中", "durationThreshold": 1}"#.into(),
    }]
}

/// The same rules as the plugin reads them.
fn native_rules() -> Vec<rules::Rule> {
    use geometry::Pt;
    use rules::{Area, Kind, Rule};
    let pt = |x, y| Pt { x, y };
    vec![Rule {
        event_type: "AREA_INTRUSION".into(),
        areas: vec![
            Area {
                id: 1,
                kind: Kind::Line { both: false },
                points: vec![pt(0.5, 0.4), pt(0.5, 0.0)],
            },
            Area {
                id: 2,
                kind: Kind::Polygon,
                points: vec![
                    pt(0.05, 0.55),
                    pt(0.95, 0.55),
                    pt(0.95, 0.98),
                    pt(0.05, 0.98),
                ],
            },
        ],
        masks: vec![],
        threshold: 0.5,
        duration_ms: 1000,
        repeat_ms: 0,
    }]
}

/// (a): nothing.
struct Nothing;
impl Analyse for Nothing {
    fn analyse(&self, _: &Frame) -> Result<Vec<Event>, String> {
        Ok(Vec::new())
    }
}

/// (b): the detector on the host.
struct Detector(Arc<NativeModel>);
impl Analyse for Detector {
    fn analyse(&self, frame: &Frame) -> Result<Vec<Event>, String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        self.0
            .run(frame, &preprocess(), deadline)
            .map(|_| Vec::new())
            .map_err(|e| format!("{e:?}"))
    }
}

/// (d): the detector, then the plugin's analysis compiled natively.
struct NativeAlgorithm(Arc<NativeModel>, Mutex<analysis::Analysis>);
impl Analyse for NativeAlgorithm {
    fn analyse(&self, frame: &Frame) -> Result<Vec<Event>, String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let outputs = self
            .0
            .run(frame, &preprocess(), deadline)
            .map_err(|e| format!("{e:?}"))?;
        let output = &outputs[0];
        let alarms =
            self.1
                .lock()
                .unwrap()
                .step(&output.shape, &output.data, frame.timestamp_ms())?;
        Ok(alarms
            .into_iter()
            .map(|(alarm, track)| Event {
                event_type: "AREA_INTRUSION".into(),
                area_id: Some(alarm.area),
                bbox: Some(analyzer::BoundingBox {
                    x: track.bbox.x,
                    y: track.bbox.y,
                    width: track.bbox.w,
                    height: track.bbox.h,
                }),
                label: "object".into(),
                confidence: track.confidence,
                attributes: format!("{{\"trackId\": {}}}", track.id),
            })
            .collect())
    }
}

/// (c): the plugin's session in a worker.
struct Plugin(
    Arc<xpud::plugins::algorithm::AlgorithmWorker>,
    xpud::plugins::algorithm::SessionId,
);
impl Analyse for Plugin {
    fn analyse(&self, frame: &Frame) -> Result<Vec<Event>, String> {
        self.0.process(self.1, frame).map_err(|e| e.to_string())
    }
}

/// Waits for the pipeline to finish.
#[derive(Default)]
struct Done {
    finished: Mutex<Option<State>>,
    wake: Condvar,
}
impl Report for Done {
    fn state(&self, state: State) {
        if matches!(state, State::Finished | State::Failed(_)) {
            *self.finished.lock().unwrap() = Some(state);
            self.wake.notify_all();
        }
    }
    fn events(&self, _: &Frame, _: Vec<Event>) {}
}

/// CPU seconds used so far by this process and its reaped children.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime, stime, cutime, cstime: fields 14-17 of the file, 12-15 after the name.
    let ticks: f64 = fields[11..15]
        .iter()
        .map(|f| f.parse::<f64>().unwrap())
        .sum();
    ticks / 100.0
}

/// A `/proc/PID/FILE` line's figure in KiB (`VmRSS:` of `status`, `Pss:` of
/// `smaps_rollup`: resident memory with shared pages, ffmpeg's libraries shared by
/// every ffmpeg, divided among the processes sharing them); 0 when absent.
fn proc_kib(pid: &str, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resident memory of this process, and the proportional memory of its ffmpeg
/// children together (KiB).
fn memory() -> (u64, u64) {
    let me = std::process::id().to_string();
    let children: u64 = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| c.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .map(|pid| proc_kib(&pid, "smaps_rollup", "Pss:"))
        .sum();
    (proc_kib(&me, "status", "VmRSS:"), children)
}

fn spec(video: &std::path::Path) -> Spec {
    Spec {
        task: "bench".into(),
        source: Source::parse(&format!("file://{}", video.display())).unwrap(),
        settings: Settings {
            fps: FPS,
            width: 1920,
            height: 1080,
            skip_unreferenced: true,
        },
        hwaccel: None,
        retry_forever: false,
        ffmpeg: "ffmpeg".into(),
    }
}

/// One pass over the source: frames analysed, wall seconds, CPU seconds.
fn pass(spec: Spec, analyse: Arc<dyn Analyse>) -> (u64, f64, f64) {
    let done = Arc::new(Done::default());
    let (cpu, wall) = (cpu_seconds(), Instant::now());
    let pipeline = Pipeline::start(spec, analyse, done.clone()).unwrap();
    let mut finished = done.finished.lock().unwrap();
    while finished.is_none() {
        finished = done.wake.wait(finished).unwrap();
    }
    assert_eq!(*finished, Some(State::Finished), "the pass failed");
    let frames = pipeline.stats.frames_analysed.load(Ordering::Relaxed);
    let failed = pipeline.stats.frames_failed.load(Ordering::Relaxed);
    assert_eq!(failed, 0, "frames failed");
    drop(finished);
    drop(pipeline);
    (frames, wall.elapsed().as_secs_f64(), cpu_seconds() - cpu)
}

/// One row of the table: how it decodes, what analyses.
struct Row<'a> {
    name: &'static str,
    spec: Box<dyn Fn() -> Spec + 'a>,
    analyse: Box<dyn Fn() -> Arc<dyn Analyse> + 'a>,
}

/// Runs every row `RUNS` times, interleaved (a round is one pass of each row, so
/// that drift of the machine touches every row alike), and prints each row's
/// median; returns each row's frames/s.
fn table(rows: &[Row]) -> Vec<f64> {
    let mut passes: Vec<Vec<(f64, f64)>> = rows.iter().map(|_| Vec::new()).collect();
    for _ in 0..RUNS {
        for (row, passes) in rows.iter().zip(passes.iter_mut()) {
            let (frames, wall, cpu) = pass((row.spec)(), (row.analyse)());
            passes.push((frames as f64 / wall, cpu / frames as f64));
        }
    }
    rows.iter()
        .zip(passes)
        .map(|(row, mut passes)| {
            passes.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (fps, cpu_per_frame) = passes[RUNS / 2];
            println!(
                "{:<46} {fps:>8.1} {:>12.2} {:>12.1}",
                row.name,
                cpu_per_frame * 1000.0,
                1.0 / (cpu_per_frame * FPS)
            );
            fps
        })
        .collect()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let video = dir.path().join("source.mp4");
    // The test scene's squares over a moving test pattern, 1080p30 H.264.
    let status = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(["-f", "lavfi", "-i"])
        .arg(format!(
            "testsrc2=size=1920x1080:rate=30:duration={SECONDS}"
        ))
        .args([
            "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
        ])
        .arg(&video)
        .status()
        .expect("ffmpeg");
    assert!(status.success());

    let plugins = PluginDir::new();
    plugins.install("area-intrusion");
    let assets = plugins.path().join("area-intrusion.d");
    std::fs::create_dir_all(&assets).unwrap();
    let model = repo().join("target/test-models/bright_grid.onnx");
    std::fs::copy(&model, assets.join("detector.onnx")).expect("scripts/test builds the models");
    let registry = registry(&plugins, std::path::Path::new("/"));
    registry.scan();
    let algorithm = registry
        .get("area-intrusion")
        .expect("area-intrusion loads")
        .algorithm()
        .unwrap()
        .clone();
    let inference = registry.runtime().inference().clone();
    let detector = Arc::new(
        inference
            .load_native(
                "detector.onnx",
                std::fs::read(&model).unwrap(),
                Default::default(),
            )
            .expect("ONNX Runtime (XPUD_ONNXRUNTIME)"),
    );
    let worker = || {
        let worker = algorithm.spawn_worker_with(Launch {
            env: vec![
                ("AREA_INTRUSION_HEAD".into(), "grid".into()),
                (
                    "AREA_INTRUSION_INPUT".into(),
                    format!("{}x{}", INPUT.0, INPUT.1),
                ),
            ],
            args: Vec::new(),
            device: Default::default(),
        });
        let session = worker.open_session(rules()).unwrap();
        (worker, session)
    };

    println!(
        "1080p H.264 30 fps, {SECONDS} s, analysed at {FPS} fps ({} frames), detector on {}; \
         median of {RUNS} runs; CPU is this process and its ffmpeg children",
        (f64::from(SECONDS) * FPS) as u64,
        detector.provider()
    );
    println!(
        "{:<46} {:>8} {:>12} {:>12}",
        "", "frames/s", "CPU ms/frame", "streams/core"
    );
    let every_frame = || {
        let mut spec = spec(&video);
        spec.settings.skip_unreferenced = false;
        spec
    };
    let sampled = || spec(&video);
    let rows = [
        Row {
            name: "(a0) decode alone, every frame decoded",
            spec: Box::new(every_frame),
            analyse: Box::new(|| Arc::new(Nothing)),
        },
        Row {
            name: "(a) decode alone, unreferenced frames skipped",
            spec: Box::new(sampled),
            analyse: Box::new(|| Arc::new(Nothing)),
        },
        Row {
            name: "(b) decode + preprocess + ORT, no plugin",
            spec: Box::new(sampled),
            analyse: Box::new(|| Arc::new(Detector(detector.clone()))),
        },
        Row {
            name: "(c) full pipeline, area-intrusion as WASM",
            spec: Box::new(sampled),
            analyse: Box::new(|| {
                let (worker, session) = worker();
                Arc::new(Plugin(worker, session))
            }),
        },
        Row {
            name: "(d) the same algorithm compiled natively",
            spec: Box::new(sampled),
            analyse: Box::new(|| {
                Arc::new(NativeAlgorithm(
                    detector.clone(),
                    Mutex::new(analysis::Analysis::new(
                        native_rules(),
                        detect::Head::Grid,
                        INPUT,
                    )),
                ))
            }),
        },
    ];
    let fps = table(&rows);
    let (b, c, d) = (fps[2], fps[3], fps[4]);
    println!(
        "(c) / (d): {:.1} % (target >= 95 %); (c) / (b): {:.1} % (target >= 90 %)",
        c / d * 100.0,
        c / b * 100.0
    );

    // Memory: one more (c) stream, from 4 at once.
    let (xpud_before, _) = memory();
    let streams: Vec<Pipeline> = (0..4)
        .map(|_| {
            let (worker, session) = worker();
            let mut looping = spec(&video);
            looping.retry_forever = true;
            Pipeline::start(
                looping,
                Arc::new(Plugin(worker, session)),
                Arc::new(Done::default()),
            )
            .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let (xpud_now, ffmpeg) = memory();
    drop(streams);
    println!(
        "memory per (c) stream, 4 running: xpud +{:.1} MiB resident, ffmpeg {:.1} MiB proportional",
        (xpud_now.saturating_sub(xpud_before)) as f64 / 4.0 / 1024.0,
        ffmpeg as f64 / 4.0 / 1024.0
    );
}
