//! Cross-stream batching, measured: S streams (threads, each with its own 1080p
//! frame) run one model as fast as they can, through the host's inference path
//! (preprocess on the stream's thread, the session shared), with batching as
//! configured by default (up to 8 runs, 4 ms window) beside the baseline of the
//! same run without batching (one run at a time), for two models with a dynamic
//! batch: `bright_grid` (the tests' detector: almost no work per run) and
//! `conv_grid` (three convolutions over 512x288: work per run that a batch can
//! share out better).
//!
//! Each row: frames/s over all streams, unbatched and batched (median of `RUNS`),
//! their ratio, the mean batch size, and the latency of one run (median and p99
//! over all streams' runs).
//!
//! Last, the price of a partition's worker (a MIG instance, a time slice): one
//! stream running each model in xpud's process beside the same run in an
//! inference worker (the input tensor and the outputs cross a shared memory
//! region; `runtime/worker.rs`), on the same provider.
//!
//! `cargo bench --bench inference_batching` (after scripts/test, which builds the
//! test models; XPUD_ONNXRUNTIME names the ONNX Runtime library). The providers
//! tried are CUDA then CPU: the one that runs is printed. BENCHMARKS.md records a
//! run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use xpud::runtime::batching::Batching;
use xpud::runtime::bindings::wit_frames::PixelFormat;
use xpud::runtime::bindings::wit_inference::{ChannelOrder, Layout, Preprocess};
use xpud::runtime::frames::Frame;
use xpud::runtime::inference::{
    Device, Inference, InferenceOptions, NativeModel, PartitionDevice, Provider,
};

const RUNS: usize = 3;
const SECONDS: f64 = 2.0;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Outcome {
    fps: f64,
    batch: f64,
    latencies: Vec<Duration>,
}

/// `streams` threads running `model` for `SECONDS`.
fn measure(model: &NativeModel, streams: usize, input: (u32, u32)) -> Outcome {
    let pre = Preprocess {
        crop: None,
        width: input.0,
        height: input.1,
        layout: Layout::Nchw,
        channel_order: ChannelOrder::Rgb,
        mean: (0.0, 0.0, 0.0),
        std: (1.0, 1.0, 1.0),
    };
    let (runs_before, requests_before) = model.runs();
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(SECONDS);
    let threads: Vec<_> = (0..streams)
        .map(|stream| {
            let (model, pre) = (model.clone(), pre);
            std::thread::spawn(move || {
                let pixels: Vec<u8> = (0..1920 * 1080 * 3)
                    .map(|i| ((i / 3 + stream * 37) % 251) as u8)
                    .collect();
                let frame = Frame::new(1920, 1080, 0, PixelFormat::Rgb8, pixels.into()).unwrap();
                let mut latencies = Vec::new();
                while Instant::now() < until {
                    let began = Instant::now();
                    model
                        .run(&frame, &pre, began + Duration::from_secs(10))
                        .expect("the model runs");
                    latencies.push(began.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for thread in threads {
        latencies.extend(thread.join().unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (runs, requests) = model.runs();
    Outcome {
        fps: latencies.len() as f64 / elapsed,
        batch: (requests - requests_before) as f64 / (runs - runs_before).max(1) as f64,
        latencies,
    }
}

fn median_of(mut outcomes: Vec<Outcome>) -> Outcome {
    outcomes.sort_by(|a, b| a.fps.total_cmp(&b.fps));
    outcomes.swap_remove(outcomes.len() / 2)
}

fn percentile(latencies: &mut [Duration], p: f64) -> f64 {
    latencies.sort_unstable();
    let at = ((latencies.len() as f64 - 1.0) * p).round() as usize;
    latencies[at].as_secs_f64() * 1000.0
}

fn main() {
    let library = std::env::var_os("XPUD_ONNXRUNTIME")
        .map(PathBuf::from)
        .expect("XPUD_ONNXRUNTIME names the ONNX Runtime library (scripts/install-onnxruntime)");
    let inference = Inference::get_or_init(&InferenceOptions {
        library: Some(library),
        providers: vec![Provider::Cuda, Provider::Cpu],
        batching: Batching::default(),
        worker: Some(PathBuf::from(env!("CARGO_BIN_EXE_xpud"))),
    });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("cross-stream batching: {cores} cores, {SECONDS} s per measure, median of {RUNS}");
    for (name, input) in [("bright_grid", (256, 144)), ("conv_grid", (512, 288))] {
        let path = repo().join(format!("target/test-models/{name}.onnx"));
        let bytes = std::fs::read(&path).expect("scripts/test builds the test models");
        let load = |batching| {
            inference
                .load_native(name, bytes.clone(), batching)
                .expect("the model loads")
        };
        let unbatched = load(Batching {
            max: 1,
            on_cpu: true,
        });
        // What an accelerator gets by default, forced on the CPU too here.
        let batched = load(Batching {
            on_cpu: true,
            ..Batching::default()
        });
        println!(
            "\n{name} ({}x{} input, provider {}):",
            input.0,
            input.1,
            batched.provider()
        );
        println!(
            "{:>8} {:>14} {:>14} {:>7} {:>7} {:>18} {:>18}",
            "streams",
            "unbatched f/s",
            "batched f/s",
            "ratio",
            "batch",
            "p50/p99 ms unb.",
            "p50/p99 ms bat."
        );
        for streams in [1, 2, 4, 8] {
            let mut base = median_of(
                (0..RUNS)
                    .map(|_| measure(&unbatched, streams, input))
                    .collect(),
            );
            let mut with = median_of(
                (0..RUNS)
                    .map(|_| measure(&batched, streams, input))
                    .collect(),
            );
            println!(
                "{streams:>8} {:>14.1} {:>14.1} {:>7.2} {:>7.2} {:>8.2} / {:>7.2} {:>8.2} / {:>7.2}",
                base.fps,
                with.fps,
                with.fps / base.fps,
                with.batch,
                percentile(&mut base.latencies, 0.5),
                percentile(&mut base.latencies, 0.99),
                percentile(&mut with.latencies, 0.5),
                percentile(&mut with.latencies, 0.99),
            );
        }
    }
    worker_overhead(&inference);
}

/// One stream, each model run in this process and in a worker process.
fn worker_overhead(inference: &Inference) {
    println!("\na partition's worker: one stream, in xpud's process and in a worker");
    println!(
        "{:<12} {:>10} {:>16} {:>16} {:>12}",
        "model", "input", "p50/p99 ms here", "p50/p99 ms worker", "per run"
    );
    for (name, input) in [("bright_grid", (256, 144)), ("conv_grid", (512, 288))] {
        let path = repo().join(format!("target/test-models/{name}.onnx"));
        let bytes = std::fs::read(&path).expect("scripts/test builds the test models");
        let unbatched = Batching {
            max: 1,
            on_cpu: false,
        };
        let here = inference
            .load_native(name, bytes.clone(), unbatched)
            .expect("the model loads");
        let there = inference
            .load_native_on(
                Device::Partition(std::sync::Arc::new(PartitionDevice {
                    driver: "bench".into(),
                    partition: format!("mig-{name}"),
                    visible: "MIG-bench".into(),
                    card_ordinal: None,
                    memory_quota_mib: None,
                })),
                name,
                bytes,
                Duration::from_secs(60),
            )
            .expect("the model loads in a worker");
        let mut here = median_of((0..RUNS).map(|_| measure(&here, 1, input)).collect());
        let mut there = median_of((0..RUNS).map(|_| measure(&there, 1, input)).collect());
        let (p50_here, p50_there) = (
            percentile(&mut here.latencies, 0.5),
            percentile(&mut there.latencies, 0.5),
        );
        println!(
            "{name:<12} {:>7.2} MB {p50_here:>7.2} / {:>6.2} {p50_there:>7.2} / {:>6.2} {:>+9.2} ms",
            f64::from(input.0 * input.1 * 3 * 4) / 1e6,
            percentile(&mut here.latencies, 0.99),
            percentile(&mut there.latencies, 0.99),
            p50_there - p50_here,
        );
    }
}
