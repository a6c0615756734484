//! The video pipeline of one task: source → decode (sampled to the analysis rate,
//! scaled to the task's resolution) → host frame → the algorithm's session → events.
//!
//! One supervised pipeline per task, on a thread of its own (Frigate runs a process
//! per camera): a task whose camera stalls, whose stream is garbage or whose plugin
//! crashes disturbs no other task. What a pipeline does is reported as it happens,
//! never assumed: waiting until the first frame, running while frames flow,
//! reconnecting with capped backoff (its attempt and ffmpeg's last words), finished
//! when a finite source ends, failed with the reason.
//!
//! - `source`: which URLs are read, and how ffmpeg is told to;
//! - `decode`: the ffmpeg child, its frames in a pool of reusable buffers;
//! - `snapshot`: JPEG images of analysed frames, for events that carry them;
//! - `deliver`: events out, through a durable queue.

pub mod decode;
pub mod deliver;
pub mod snapshot;
pub mod source;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use decode::{Decoder, Ended, FramePool, Hwaccel, Settings, Stopper};
use source::Source;

use crate::runtime::bindings::analyzer::Event;
use crate::runtime::frames::Frame;

/// First wait before a lost source is opened again; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run that gave frames this long resets the backoff.
const STEADY_RUN: Duration = MAX_BACKOFF;

/// What a pipeline is doing, as it reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// No frame analysed yet, or none for a while (opening the source, ffmpeg
    /// missing, the algorithm failing every frame): why.
    Waiting(String),
    /// Frames are analysed.
    Running,
    /// The source was lost; opening it again after a backoff.
    Reconnecting { attempt: u32, reason: String },
    /// A finite source ended (restart policy NEVER).
    Finished,
    /// Given up (restart policy NEVER): the reason.
    Failed(String),
}

/// What analyses a task's frames: its session in an algorithm worker.
pub trait Analyse: Send + Sync {
    fn analyse(&self, frame: &Frame) -> Result<Vec<Event>, String>;
}

/// Where a pipeline reports its state changes and its events.
pub trait Report: Send + Sync {
    fn state(&self, state: State);
    /// Events raised on `frame`; must not block on delivery.
    fn events(&self, frame: &Frame, events: Vec<Event>);
}

/// Counters of one pipeline, read by the task detail.
#[derive(Debug, Default)]
pub struct Stats {
    pub frames_decoded: AtomicU64,
    pub frames_analysed: AtomicU64,
    /// Frames of a live source replaced by a newer one before the algorithm was
    /// free to take them: analysis keeps up with the camera by skipping, instead
    /// of falling ever further behind it.
    pub frames_dropped: AtomicU64,
    /// Frames the algorithm failed on (a crash, a deadline, its own error).
    pub frames_failed: AtomicU64,
    pub events: AtomicU64,
    /// Frames read into a new buffer because every pooled one was held.
    pub buffer_overflow: AtomicU64,
    /// The last error of the algorithm on a frame.
    pub last_analysis_error: Mutex<Option<String>>,
    /// The decoder in use: `cpu`, `cuda`, `vaapi`, or `cpu` with why the hardware
    /// one was given up.
    pub decoder: Mutex<String>,
}

/// How a pipeline runs.
#[derive(Clone, Debug)]
pub struct Spec {
    pub task: String,
    pub source: Source,
    pub settings: Settings,
    /// A hardware decoder to try first; given up for CPU decode (said in the log
    /// and the stats) when it cannot deliver a frame.
    pub hwaccel: Option<Hwaccel>,
    /// ALWAYS: every failure and every end is followed by a reconnection.
    pub retry_forever: bool,
    pub ffmpeg: PathBuf,
}

/// A running pipeline; dropping it stops it.
pub struct Pipeline {
    stop: Arc<StopSignal>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<Stats>,
}

#[derive(Default)]
struct StopSignal {
    stopped: Mutex<bool>,
    wake: Condvar,
    /// The running decoder, to kill on stop (its read then ends).
    decoder: Mutex<Option<Stopper>>,
}

impl StopSignal {
    fn is_set(&self) -> bool {
        *crate::sync::lock(&self.stopped)
    }

    /// Sleeps `duration` unless stopped first; true when stopped.
    fn sleep(&self, duration: Duration) -> bool {
        let stopped = crate::sync::lock(&self.stopped);
        let (stopped, _) = self
            .wake
            .wait_timeout_while(stopped, duration, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        *stopped
    }

    fn set(&self) {
        *crate::sync::lock(&self.stopped) = true;
        self.wake.notify_all();
        if let Some(decoder) = crate::sync::lock(&self.decoder).as_ref() {
            decoder.stop();
        }
    }
}

impl Pipeline {
    /// Starts the pipeline on a thread of its own.
    pub fn start(
        spec: Spec,
        analyse: Arc<dyn Analyse>,
        report: Arc<dyn Report>,
    ) -> std::io::Result<Pipeline> {
        let stop = Arc::new(StopSignal::default());
        let stats = Arc::new(Stats::default());
        let thread = {
            let (stop, stats) = (stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name(format!("task-{}", short(&spec.task)))
                .spawn(move || {
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run(&spec, &*analyse, &*report, &stop, &stats)
                    }));
                    // A bug here must not leave the task saying what it did last.
                    if let Err(panic) = ran {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::error!(task = %spec.task, "the pipeline panicked: {what}");
                        report.state(State::Failed(format!(
                            "internal error in the pipeline: {what}"
                        )));
                    }
                })?
        };
        Ok(Pipeline {
            stop,
            thread: Some(thread),
            stats,
        })
    }

    /// Stops decoding and analysis and waits for the thread (a frame in analysis
    /// finishes first; the plugin's deadline bounds it).
    pub fn stop(&mut self) {
        self.stop.set();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One frame through the algorithm, counted, its events reported.
fn analyse_frame(
    task: &str,
    frame: &Frame,
    analyse: &dyn Analyse,
    report: &dyn Report,
    stats: &Stats,
) -> Result<(), String> {
    match analyse.analyse(frame) {
        Ok(events) => {
            stats.frames_analysed.fetch_add(1, Ordering::Relaxed);
            if !events.is_empty() {
                stats
                    .events
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
                report.events(frame, events);
            }
            Ok(())
        }
        Err(e) => {
            // The worker's supervisor restarts a crashed plugin and the session
            // reopens on the next frame: go on.
            stats.frames_failed.fetch_add(1, Ordering::Relaxed);
            let mut last = crate::sync::lock(&stats.last_analysis_error);
            if last.as_deref() != Some(e.as_str()) {
                tracing::warn!(%task, "frame not analysed: {e}");
            }
            *last = Some(e.clone());
            Err(e)
        }
    }
}

/// Failing analysis for this long makes a running task pending again, with the
/// error: one failed frame (a plugin restarting, its session reopening) does not.
pub const NOT_ANALYSING_AFTER: Duration = Duration::from_secs(5);

/// Whether a run's frames are analysed, as last reported: RUNNING means frames
/// are analysed, not merely decoded (a plugin marked unhealthy fails every frame
/// while the stream flows on).
#[derive(Default)]
struct Analysing {
    running: bool,
    /// Since when every frame has failed, and whether that was reported.
    failing: Option<(Instant, bool)>,
}

impl Analysing {
    fn analysed(&mut self, report: &dyn Report) {
        self.failing = None;
        if !self.running {
            self.running = true;
            report.state(State::Running);
        }
    }

    fn failed(&mut self, error: &str, report: &dyn Report) {
        let now = Instant::now();
        let (since, reported) = self.failing.get_or_insert((now, false));
        // Not yet running: pending already, now with the reason.
        if *reported || (self.running && now.duration_since(*since) < NOT_ANALYSING_AFTER) {
            return;
        }
        *reported = true;
        self.running = false;
        report.state(State::Waiting(format!(
            "frames arrive but are not analysed: {error}"
        )));
    }
}

/// The newest frame of a live source, between the thread that reads the stream
/// and the one that analyses: a frame not yet taken is replaced by the next.
#[derive(Default)]
struct Latest {
    slot: Mutex<Slot>,
    ready: Condvar,
}

#[derive(Default)]
struct Slot {
    frame: Option<Frame>,
    ended: Option<Ended>,
}

impl Latest {
    /// Offers the newest frame; true when it replaced one never taken.
    fn put(&self, frame: Frame) -> bool {
        let replaced = crate::sync::lock(&self.slot).frame.replace(frame).is_some();
        self.ready.notify_one();
        replaced
    }

    /// No frame will come after those already offered.
    fn end(&self, ended: Ended) {
        crate::sync::lock(&self.slot).ended = Some(ended);
        self.ready.notify_one();
    }

    /// The newest frame, waiting for one; why there are no more once the last
    /// was taken.
    fn take(&self) -> Result<Frame, Ended> {
        let mut slot = crate::sync::lock(&self.slot);
        loop {
            if let Some(frame) = slot.frame.take() {
                return Ok(frame);
            }
            if let Some(ended) = &slot.ended {
                return Err(ended.clone());
            }
            slot = self.ready.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Runs its closure when dropped while its thread panics: what the other thread
/// of a live run waits on is ended, so that the panic reaches the task.
struct OnUnwind<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnUnwind<F> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            (self.0)();
        }
    }
}

/// The start of a task's id, for a thread's name (cut at a character, whatever
/// the id is made of).
fn short(task: &str) -> String {
    task.chars().take(8).collect()
}

fn backoff(attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(16);
    (FIRST_BACKOFF * factor).min(MAX_BACKOFF)
}

fn run(spec: &Spec, analyse: &dyn Analyse, report: &dyn Report, stop: &StopSignal, stats: &Stats) {
    let task = spec.task.as_str();
    let source = spec.source.redacted();
    let mut pool = FramePool::new(spec.settings.frame_bytes());
    let mut attempt: u32 = 0;
    let mut hwaccel = spec.hwaccel.clone();
    // A hardware decoder given up for the run going on: it is blamed only if the
    // CPU decodes what it could not.
    let mut on_trial: Option<Hwaccel> = None;
    *crate::sync::lock(&stats.decoder) = hwaccel.as_ref().map_or("cpu", Hwaccel::name).into();
    // Where the next run starts on the task's timeline: times go on across
    // reconnections, so durations measured by the algorithm stay right.
    let mut origin_ms = 0;
    report.state(State::Waiting(format!("opening {source}")));
    while !stop.is_set() {
        let started = Decoder::start(
            &spec.ffmpeg,
            &spec.source,
            spec.settings,
            hwaccel.as_ref(),
            origin_ms,
        );
        let mut decoder = match started {
            Ok(decoder) => decoder,
            // No ffmpeg (yet): the task waits for it, whatever its restart policy.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let why = format!(
                    "{} not found: video tasks need ffmpeg (apt-get install ffmpeg)",
                    spec.ffmpeg.display()
                );
                tracing::warn!(%task, "{why}");
                report.state(State::Waiting(why));
                if stop.sleep(MAX_BACKOFF) {
                    break;
                }
                continue;
            }
            Err(e) => {
                let reason = format!("cannot start ffmpeg: {e}");
                if !retry(spec, report, stop, &mut attempt, reason) {
                    break;
                }
                continue;
            }
        };
        *crate::sync::lock(&stop.decoder) = Some(decoder.stopper());
        if stop.is_set() {
            break;
        }
        tracing::info!(%task, %source, decoder = decoder.decoder, fps = spec.settings.fps, width = spec.settings.width, height = spec.settings.height, "decoding");
        let mut first_frame_at: Option<Instant> = None;
        let mut analysing = Analysing::default();
        let mut analyse_one = |frame: Frame| {
            first_frame_at.get_or_insert_with(Instant::now);
            match analyse_frame(task, &frame, analyse, report, stats) {
                Ok(()) => analysing.analysed(report),
                Err(e) => analysing.failed(&e, report),
            }
        };
        let ended = if spec.source.is_live() {
            // The camera does not wait: frames are read as they come, and the
            // algorithm takes the newest when it is free.
            let latest = Latest::default();
            let stopper = decoder.stopper();
            std::thread::scope(|scope| {
                // The scope waits for the reader when it ends, unwinding too: a
                // panic here stops ffmpeg, so that the reader's read ends.
                let _unblock = OnUnwind(|| stopper.stop());
                let reader = std::thread::Builder::new()
                    .name(format!("read-{}", short(task)))
                    .spawn_scoped(scope, || {
                        // A panic here ends the run for the analysing thread.
                        let _end = OnUnwind(|| {
                            latest.end(Ended::Failed("the stream's reader failed".into()))
                        });
                        let ended = loop {
                            match decoder.next_frame(&mut pool) {
                                Ok(frame) => {
                                    stats.frames_decoded.fetch_add(1, Ordering::Relaxed);
                                    if latest.put(frame) {
                                        stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                Err(ended) => break ended,
                            }
                        };
                        latest.end(ended);
                    });
                if let Err(e) = reader {
                    latest.end(Ended::Failed(format!(
                        "cannot start the reader thread: {e}"
                    )));
                }
                loop {
                    match latest.take() {
                        Ok(frame) => analyse_one(frame),
                        Err(ended) => break ended,
                    }
                }
            })
        } else {
            // A file (or what may be one) is read no faster than it is analysed:
            // every frame is analysed.
            loop {
                match decoder.next_frame(&mut pool) {
                    Ok(frame) => {
                        stats.frames_decoded.fetch_add(1, Ordering::Relaxed);
                        analyse_one(frame);
                    }
                    Err(ended) => break ended,
                }
            }
        };
        stats
            .buffer_overflow
            .store(pool.overflow, Ordering::Relaxed);
        origin_ms = decoder.position_ms();
        let decoded = decoder.decoded();
        crate::sync::lock(&stop.decoder).take();
        drop(decoder);
        if stop.is_set() {
            break;
        }
        // A run that gave frames for a while proved the source: reconnections
        // start over. One that fails soon after its first frame (a camera that
        // sends one and hangs up) backs off as if it had given none, instead of
        // restarting ffmpeg twice a second.
        if first_frame_at.is_some_and(|at| at.elapsed() >= STEADY_RUN) {
            attempt = 0;
        }
        // A hardware decoder that could not give one frame is given up: the
        // same source is opened again at once, decoded on the CPU. Unless the CPU
        // gives no frame either: then the source failed (a camera down, a wrong
        // URL), not the hardware decoder, which decodes again from the next try.
        if let (Some(hw), 0, Ended::Failed(reason)) = (&hwaccel, decoded, &ended) {
            tracing::warn!(%task, decoder = hw.name(), "hardware decode failed, decoding on the CPU: {reason}");
            *crate::sync::lock(&stats.decoder) =
                format!("cpu ({} unavailable: {reason})", hw.name());
            on_trial = hwaccel.take();
            continue;
        }
        if let Some(hw) = on_trial.take() {
            if decoded == 0 {
                tracing::info!(%task, decoder = hw.name(), "the CPU gave no frame either: the source failed, not the hardware decoder");
                *crate::sync::lock(&stats.decoder) = hw.name().into();
                hwaccel = Some(hw);
            }
        }
        match ended {
            Ended::Finished if !spec.retry_forever => {
                tracing::info!(%task, %source, "source ended");
                report.state(State::Finished);
                break;
            }
            Ended::Finished => {
                // ALWAYS: a file that ends starts again; a source that ended
                // without a single frame is retried with backoff.
                if decoded == 0 {
                    let reason = "the source ended without a frame".to_string();
                    if !retry(spec, report, stop, &mut attempt, reason) {
                        break;
                    }
                }
            }
            Ended::Failed(reason) => {
                if !retry(spec, report, stop, &mut attempt, reason) {
                    break;
                }
            }
        }
    }
}

/// After a failure: ERROR under NEVER (false), else reports the reconnection and
/// waits its backoff (false when stopped meanwhile).
fn retry(
    spec: &Spec,
    report: &dyn Report,
    stop: &StopSignal,
    attempt: &mut u32,
    reason: String,
) -> bool {
    let task = spec.task.as_str();
    if !spec.retry_forever {
        tracing::warn!(%task, "source failed: {reason}");
        report.state(State::Failed(reason));
        return false;
    }
    *attempt += 1;
    let wait = backoff(*attempt);
    tracing::warn!(%task, attempt = *attempt, wait_ms = wait.as_millis() as u64, "source lost, reconnecting: {reason}");
    report.state(State::Reconnecting {
        attempt: *attempt,
        reason,
    });
    !stop.sleep(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(timestamp_ms: u64) -> Frame {
        use crate::runtime::bindings::wit_frames::PixelFormat;
        Frame::new(1, 1, timestamp_ms, PixelFormat::Rgb8, Arc::from([0u8; 3])).unwrap()
    }

    #[test]
    fn the_newest_frame_replaces_one_not_taken_and_the_end_comes_last() {
        let latest = Latest::default();
        assert!(!latest.put(frame(0)));
        assert!(latest.put(frame(200)), "frame 0 was never taken");
        latest.end(Ended::Finished);
        // The frame offered before the end is still taken, then the end.
        assert_eq!(latest.take().unwrap().timestamp_ms(), 200);
        assert_eq!(latest.take().unwrap_err(), Ended::Finished);
    }

    #[test]
    fn reconnection_backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
