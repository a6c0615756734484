//! What a plugin's calls do: counts, failures by kind and a latency histogram per
//! exported function, over every instance of the plugin (all the workers of an
//! algorithm). Kept by the supervisor around each call; read by `/metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::supervisor::CallError;
use crate::sync::lock;

/// Upper bounds of the latency buckets, seconds (the last one is +Inf).
pub const BUCKETS: [f64; 10] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// A latency histogram over `BUCKETS`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Latency {
    /// Observations per bucket (not cumulative), `BUCKETS` then +Inf.
    pub buckets: [u64; BUCKETS.len() + 1],
    pub count: u64,
    pub seconds: f64,
}

impl Latency {
    pub fn observe(&mut self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS.len());
        self.buckets[bucket] += 1;
        self.count += 1;
        self.seconds += seconds;
    }
}

/// One function's figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FunctionCalls {
    pub calls: u64,
    pub traps: u64,
    pub timeouts: u64,
    pub out_of_memory: u64,
    /// Refused before running (restarting, unhealthy, busy) or failed to start.
    pub refused: u64,
    pub latency: Latency,
}

#[derive(Debug, Default)]
pub struct CallStats {
    functions: Mutex<BTreeMap<&'static str, FunctionCalls>>,
}

impl CallStats {
    /// Records one call of `function` that took `elapsed` and ended in `outcome`.
    pub fn record(
        &self,
        function: &'static str,
        elapsed: Duration,
        outcome: Result<(), &CallError>,
    ) {
        let mut functions = lock(&self.functions);
        let figures = functions.entry(function).or_default();
        figures.calls += 1;
        match outcome {
            Ok(()) => {}
            Err(CallError::Trap(_)) => figures.traps += 1,
            Err(CallError::Timeout(_) | CallError::Abandoned(_)) => figures.timeouts += 1,
            Err(CallError::OutOfMemory) => figures.out_of_memory += 1,
            Err(
                CallError::Start(_)
                | CallError::Restarting(_)
                | CallError::Unhealthy(_)
                | CallError::Busy(_),
            ) => figures.refused += 1,
        }
        figures.latency.observe(elapsed);
    }

    /// Every function called so far, by name.
    pub fn snapshot(&self) -> Vec<(&'static str, FunctionCalls)> {
        lock(&self.functions)
            .iter()
            .map(|(name, figures)| (*name, figures.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_land_in_their_bucket_and_failures_are_told_apart() {
        let stats = CallStats::default();
        stats.record("sample", Duration::from_micros(300), Ok(()));
        stats.record(
            "sample",
            Duration::from_secs(9),
            Err(&CallError::Timeout(Duration::from_secs(1))),
        );
        stats.record(
            "devices",
            Duration::from_millis(2),
            Err(&CallError::Trap("x".into())),
        );
        let snapshot = stats.snapshot();
        let (name, sample) = &snapshot[1];
        assert_eq!(*name, "sample");
        assert_eq!((sample.calls, sample.timeouts, sample.traps), (2, 1, 0));
        assert_eq!(sample.latency.buckets[1], 1, "300 us is under 500 us");
        assert_eq!(
            sample.latency.buckets[BUCKETS.len()],
            1,
            "9 s is past the last bound"
        );
        assert_eq!(snapshot[0].1.traps, 1);
    }
}
