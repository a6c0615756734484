//! `/metrics` render time for 8 cards x 16 instances (the size), beside
//! writing the same samples with nothing but `write!` into a `String`: what
//! prometheus-client's encoder and the per-scrape collection cost over the text
//! itself. The server is a real one (sim-xpu with 8 cards, 128 partitions made
//! through the driver), so the render reads the same sources a scrape does.
//!
//! `cargo bench --bench metrics_render` (after scripts/test, which builds the
//! plugins). BENCHMARKS.md records a run. Target: a render <= 1 ms.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use support::*;
use xpud::runtime::bindings::driver_types::{Isolation, PartitionSpec, Slicing};

const RENDERS: usize = 2000;

/// Median time of `f` over `RENDERS` calls, after 100 to warm up.
fn median(mut f: impl FnMut() -> usize) -> (Duration, usize) {
    let mut bytes = 0;
    for _ in 0..100 {
        bytes = f();
    }
    let mut times: Vec<Duration> = (0..RENDERS)
        .map(|_| {
            let started = Instant::now();
            bytes = std::hint::black_box(f());
            started.elapsed()
        })
        .collect();
    times.sort_unstable();
    (times[RENDERS / 2], bytes)
}

/// The samples of an OpenMetrics text: (name, labels text, value text) per line.
fn samples(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name.to_string(), labels.to_string(), value.to_string()))
        })
        .collect()
}

fn main() {
    let server = TestServer::start(&[]);
    server.plugins.install_as("sim-xpu", "sim-xpu", |m| {
        let m = set(m, "config", "cards", "8".into());
        set(m, "config", "max-partitions-per-card", "16".into())
    });
    let driver = || {
        server
            .app
            .registry
            .get("sim-xpu")
            .and_then(|p| p.driver().cloned())
    };
    assert!(wait_for(Duration::from_secs(20), || driver()
        .is_some_and(|d| d.devices().is_ok_and(|d| d.len() == 8))));
    let driver = driver().unwrap();
    for card in 0..8 {
        for _ in 0..16 {
            driver
                .create_partition(PartitionSpec {
                    device_index: card,
                    isolation: Isolation::Soft,
                    slicing: Slicing::Time,
                    memory_quota_mib: 512,
                    compute_share_pct: 6,
                })
                .expect("a partition");
        }
    }
    let metrics = server.app.metrics.clone();
    let instances = |text: &str| text.matches("xpud_instance_memory_quota_mib{").count();
    assert!(
        wait_for(Duration::from_secs(10), || instances(
            &metrics.render().unwrap()
        ) == 128),
        "the sampler never showed the 128 instances"
    );
    let text = metrics.render().unwrap();
    let parsed = samples(&text);

    let (render, bytes) = median(|| metrics.render().unwrap().len());
    let (plain, plain_bytes) = median(|| {
        let mut out = String::with_capacity(64 * 1024);
        let mut last = "";
        for (name, labels, value) in &parsed {
            if name != last {
                let _ = writeln!(out, "# TYPE {name} gauge");
                last = name;
            }
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
        out.push_str("# EOF\n");
        out.len()
    });
    println!(
        "/metrics for 8 cards x 16 instances: {} samples, {bytes} bytes; median of {RENDERS}",
        parsed.len()
    );
    println!(
        "  xpud render (collect + prometheus-client): {:>8.1} us (target <= 1000 us)",
        render.as_secs_f64() * 1e6
    );
    println!(
        "  the same samples written with write! alone: {:>8.1} us ({plain_bytes} bytes)",
        plain.as_secs_f64() * 1e6
    );
    println!(
        "  ratio: {:.2}x",
        render.as_secs_f64() / plain.as_secs_f64()
    );
}
