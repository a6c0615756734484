//! Plugins written against the WIT by someone who means harm: what they make the
//! host do is bounded, their broken answers are refused with the reason, and a
//! bystander plugin keeps answering.

use crate::support::*;
use xpud::plugins::driver::DriverFailure;
use xpud::plugins::supervisor::CallError;
use xpud::runtime::bindings::driver_types::{Isolation, PartitionSpec, Slicing};

/// This process's resident memory, in MiB, and its thread count.
pub fn rss_mib_and_threads() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:") / 1024, field("Threads:"))
}

/// CPU time this thread has used (user + system): a driver call runs on its
/// caller's thread, so this is what the call cost, whatever other tests do.
pub fn thread_cpu() -> std::time::Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the
    // 12th and 13th of them, in clock ticks (100 a second on Linux).
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    std::time::Duration::from_millis(ticks * 10)
}

fn chaos_beside_sim(mode: &str) -> (PluginDir, xpud::plugins::Registry) {
    let plugins = PluginDir::new();
    plugins.install("sim-xpu");
    plugins.install_as("chaos", "chaos", |m| set(m, "config", "mode", mode.into()));
    let registry = registry(&plugins, &fixture("empty-sysfs"));
    registry.scan();
    (plugins, registry)
}

fn refusal(result: Result<impl std::fmt::Debug, DriverFailure>) -> String {
    match result {
        Err(DriverFailure::Contract(reason)) => reason,
        // A string or list too large to even copy out of the guest stops at the
        // hostcall fuel: the call fails before the host holds the answer.
        Err(DriverFailure::Plugin(CallError::Trap(reason))) => reason,
        other => panic!("a broken answer was accepted: {other:?}"),
    }
}

#[test]
fn broken_driver_answers_are_refused_with_the_reason_and_the_bystander_answers() {
    // 200,000 devices or a 20 MB string are stopped while being copied out of the
    // guest (the hostcall fuel) before the host holds them; the count and length
    // limits catch what fits under it.
    let cases = [
        ("nan", "ai-utilization-pct is NaN"),
        ("many", "fuel"),
        ("huge", "fuel"),
        ("duplicate", "index reported twice"),
    ];
    for (mode, expected) in cases {
        let (_plugins, registry) = chaos_beside_sim(mode);
        let chaos = driver(&registry, "chaos");
        let sim = driver(&registry, "sim-xpu");
        let (rss_before, threads_before) = rss_mib_and_threads();
        let cpu_before = thread_cpu();
        let reason = match mode {
            "nan" => refusal(chaos.sample()),
            _ => refusal(chaos.devices()),
        };
        let cpu = thread_cpu() - cpu_before;
        assert!(
            cpu < std::time::Duration::from_secs(2),
            "{mode}: {cpu:?} of CPU"
        );
        assert!(reason.contains(expected), "{mode}: {reason}");
        // The reason is visible where an operator looks.
        let view = view(&registry, "chaos");
        if matches!(mode, "nan" | "duplicate") {
            assert_eq!(
                view.answer_refused.as_deref(),
                Some(reason.as_str()),
                "{mode}"
            );
            assert_eq!(view.answers_refused, 1, "{mode}");
        }
        // The bystander is untouched; the host did not balloon.
        assert_eq!(sim.sample().unwrap().metrics.cards.len(), 2, "{mode}");
        let (rss_after, threads_after) = rss_mib_and_threads();
        assert!(
            rss_after < rss_before + 256,
            "{mode}: RSS {rss_before} -> {rss_after} MiB"
        );
        assert!(
            threads_after < threads_before + 16,
            "{mode}: threads {threads_before} -> {threads_after}"
        );
    }
}

#[test]
fn a_driver_export_with_the_wrong_signature_is_refused_with_the_reason() {
    let plugins = PluginDir::new();
    plugins.install("sim-xpu");
    plugins.install_as("misfit", "misfit", |m| m);
    let registry = registry(&plugins, &fixture("empty-sysfs"));
    let report = registry.scan();
    assert_eq!(report.refused, vec!["misfit"]);
    let view = view(&registry, "misfit");
    let reason = view.refused.unwrap();
    assert!(
        reason.contains("does not have export `devices`"),
        "{reason}"
    );
    assert!(registry.get("sim-xpu").is_some());
}

#[test]
fn a_partition_that_is_not_the_one_asked_for_is_undone_and_refused() {
    let (_plugins, registry) = chaos_beside_sim("bogus-partition");
    let chaos = driver(&registry, "chaos");
    chaos.devices().unwrap();
    let asked = PartitionSpec {
        device_index: 0,
        isolation: Isolation::Soft,
        slicing: Slicing::Time,
        memory_quota_mib: 256,
        compute_share_pct: 25,
    };
    let reason = refusal(chaos.create_partition(asked));
    assert!(reason.contains("does not cover"), "{reason}");
    // What the driver made was destroyed, and the host's ledger holds nothing.
    assert!(chaos.partitions().unwrap().is_empty());
}

#[test]
fn a_log_flood_is_cut_to_the_rate_and_counted() {
    let plugins = PluginDir::new();
    plugins.install_as("chaos", "chaos", |m| {
        set(m, "config", "mode", "log-flood".into())
    });
    let limits = xpud::runtime::PluginLimits {
        log_lines_per_s: 10,
        ..Default::default()
    };
    let registry = registry_with(&plugins, &fixture("empty-sysfs"), limits);
    registry.scan();
    let chaos = driver(&registry, "chaos");
    chaos.sample().unwrap();
    let view = view(&registry, "chaos");
    // 3,000 lines against a burst of 100 (ten seconds at 10 a second).
    assert!(
        (2_890..=2_900).contains(&view.log_lines_dropped),
        "{}",
        view.log_lines_dropped
    );
}

mod algorithms {
    use std::time::{Duration, Instant};

    use super::rss_mib_and_threads;
    use crate::support::*;
    use xpud::plugins::algorithm::{AlgorithmFailure, AlgorithmWorker};
    use xpud::runtime::bindings::analyzer::{AnalyzerError, Rule};
    use xpud::runtime::bindings::wit_frames::PixelFormat;
    use xpud::runtime::frames::Frame;

    /// passthrough with the test models in its package, `timeout_ms` per call.
    fn passthrough(timeout_ms: i64) -> (PluginDir, xpud::plugins::Registry) {
        let (plugins, _) = passthrough_with_models(&["channel_mean.onnx", "endless.onnx"], |m| {
            set(m, "limits", "call-timeout-ms", timeout_ms.into())
        });
        let registry = registry(&plugins, &fixture("empty-sysfs"));
        registry.scan();
        (plugins, registry)
    }

    fn worker(registry: &xpud::plugins::Registry) -> std::sync::Arc<AlgorithmWorker> {
        registry
            .get("passthrough")
            .unwrap()
            .algorithm()
            .unwrap()
            .spawn_worker()
    }

    fn rule(params: &str) -> Rule {
        Rule {
            event_type: "MEAN".into(),
            areas: vec![],
            masks: vec![],
            extend_params: params.into(),
        }
    }

    fn frame() -> Frame {
        let pixels: Vec<u8> = vec![128; 32 * 16 * 3];
        Frame::new(32, 16, 5, PixelFormat::Rgb8, pixels.into()).unwrap()
    }

    #[test]
    fn models_loaded_in_a_loop_share_one_session_and_are_bounded_per_instance() {
        let (_plugins, registry) = passthrough(5000);
        let worker = worker(&registry);
        let (_, threads_before) = rss_mib_and_threads();
        let mean = r#"{"model": "channel_mean.onnx", "inputWidth": 8, "inputHeight": 8}"#;
        // One session per rule set, each holding its model: the ninth load is one
        // too many for this instance.
        let mut opened = 0;
        let refusal = loop {
            match worker.open_session(vec![rule(mean)]) {
                Ok(_) => opened += 1,
                Err(AlgorithmFailure::Analyzer(AnalyzerError::InvalidRules(m))) => break m,
                Err(other) => panic!("{other:?}"),
            }
            assert!(opened <= 8, "more models than the limit were loaded");
        };
        assert_eq!(opened, 8);
        assert!(refusal.contains("max-models-per-instance"), "{refusal}");
        // Eight loads, one session in the process (other tests may hold the
        // other test model), and no thread pool per load.
        let sessions = registry.runtime().inference().sessions();
        assert!((1..=2).contains(&sessions), "{sessions} sessions");
        let (_, threads_after) = rss_mib_and_threads();
        assert!(
            threads_after < threads_before + 16,
            "threads {threads_before} -> {threads_after}"
        );
        // A bystander instance still runs the shared model.
        let other = super::algorithms::worker(&registry);
        let session = other.open_session(vec![rule(mean)]).unwrap();
        assert_eq!(other.process(session, &frame()).unwrap().len(), 1);
    }

    #[test]
    fn preprocess_sizes_are_bounded_by_the_frame() {
        let (_plugins, registry) = passthrough(5000);
        let worker = worker(&registry);
        let session = worker
            .open_session(vec![rule(
                r#"{"model": "channel_mean.onnx", "inputWidth": 8192, "inputHeight": 8192}"#,
            )])
            .unwrap();
        let (rss_before, _) = rss_mib_and_threads();
        let started = Instant::now();
        match worker.process(session, &frame()) {
            Err(AlgorithmFailure::Analyzer(AnalyzerError::Processing(m))) => {
                assert!(m.contains("more pixels than the 32x16 frame"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        let (rss_after, _) = rss_mib_and_threads();
        assert!(
            rss_after < rss_before + 128,
            "RSS {rss_before} -> {rss_after} MiB"
        );
    }

    #[test]
    fn a_model_that_never_returns_is_stopped_at_the_call_deadline() {
        let (_plugins, registry) = passthrough(1000);
        let worker = worker(&registry);
        let endless = r#"{"model": "endless.onnx", "inputWidth": 8, "inputHeight": 8}"#;
        // The first load may still be building when the call's second is up:
        // loading goes on off the call path, and a later load finds it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let session = loop {
            match worker.open_session(vec![rule(endless)]) {
                Ok(session) => break session,
                Err(e) if Instant::now() < deadline => {
                    assert!(format!("{e:?}").contains("still loading"), "{e:?}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("{e:?}"),
            }
        };
        for _ in 0..2 {
            let (result, done) = std::sync::mpsc::channel();
            let w = worker.clone();
            let started = Instant::now();
            std::thread::spawn(move || {
                let _ = result.send(w.process(session, &frame()));
            });
            let outcome = done
                .recv_timeout(Duration::from_secs(20))
                .expect("the run was not stopped at its deadline");
            let message = format!("{outcome:?}");
            assert!(message.contains("deadline"), "{message}");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{:?}",
                started.elapsed()
            );
        }
    }
}

#[test]
fn a_crashed_instance_returns_its_memory_at_once() {
    // Up to its cap, then out of memory: the pool slot's pages go back to the
    // kernel when the instance is dropped, not when 31 more have been.
    let plugins = PluginDir::new();
    plugins.install_as("chaos", "chaos", |m| {
        let m = set(m, "config", "mode", "oom".into());
        set(m, "limits", "memory-mib", 200.into())
    });
    let registry = registry(&plugins, &fixture("empty-sysfs"));
    registry.scan();
    let chaos = driver(&registry, "chaos");
    let (before, _) = rss_mib_and_threads();
    assert!(matches!(
        chaos.sample(),
        Err(DriverFailure::Plugin(CallError::OutOfMemory))
    ));
    let (after, _) = rss_mib_and_threads();
    assert!(
        after < before + 100,
        "RSS {before} -> {after} MiB after a 200 MiB crash"
    );
}

#[test]
fn a_call_timeout_above_the_operators_ceiling_is_refused() {
    let plugins = PluginDir::new();
    plugins.install_as("chaos", "chaos", |m| {
        set(m, "limits", "call-timeout-ms", 40_000.into())
    });
    let registry = registry(&plugins, &fixture("empty-sysfs"));
    assert_eq!(registry.scan().refused, vec!["chaos"]);
    let reason = registry.views()[0].refused.clone().unwrap();
    assert!(reason.contains("max-call-timeout-ms"), "{reason}");
}

#[test]
fn a_server_beside_hostile_drivers_keeps_answering_and_reports_only_good_figures() {
    let server = TestServer::start(&["sim-xpu"]);
    for (name, mode) in [("chaos-nan", "nan"), ("chaos-many", "many")] {
        server
            .plugins
            .install_as("chaos", name, |m| set(m, "config", "mode", mode.into()));
    }
    server.app.registry.scan();
    // A few sampling rounds with both misbehaving.
    std::thread::sleep(std::time::Duration::from_millis(500));
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let (status, _) = server.get("/healthz");
        assert_eq!(status, 200);
        let (status, body) = server.get("/CAP/Status");
        assert_eq!(status, 200, "{body}");
        assert!(started.elapsed() < std::time::Duration::from_millis(500));
        // sim-xpu's two cards, and nothing of the broken drivers.
        assert_eq!(body["data"]["basicInfos"][0]["gpu"], 2, "{body}");
    }
    let (_, body) = server.get("/plugins");
    let nan = body["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "chaos-nan")
        .unwrap();
    assert!(
        nan["answer_refused"].as_str().unwrap().contains("NaN"),
        "{nan}"
    );
    assert!(nan["answers_refused"].as_u64().unwrap() >= 1, "{nan}");
}
