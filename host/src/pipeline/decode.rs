//! Decoding: a supervised ffmpeg child process writing raw frames to a pipe
//! (Frigate's way).
//!
//! Why a child process and not libav bindings: a hostile or broken stream that
//! crashes the decoder kills a child, never xpud; the same command line takes
//! hardware decoders (`-hwaccel cuda`) where a driver exists and CPU decode where
//! not; and nothing native is linked into the server. The cost is one copy through
//! a pipe per analysed frame, which the sampling keeps small: ffmpeg drops frames to
//! the analysis rate (`fps` filter) before it scales and converts, so only analysed
//! frames are converted and copied.
//!
//! Frames land in a small pool of reusable buffers: at steady state no frame
//! allocates (a buffer is reused once every frame made from it is gone).
//!
//! A decoder that stays alive but gives no frame (a camera sending audio only, or
//! keep-alives, or data that never decodes: bytes keep coming, so no socket
//! timeout fires) is killed once a frame is overdue, and the run ends as failed
//! with that reason, as Frigate's watchdog restarts a camera's silent ffmpeg. A
//! task is reported running only while frames come.

use std::collections::VecDeque;
use std::io::{BufRead, ErrorKind, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::source::Source;
use crate::runtime::bindings::wit_frames::PixelFormat;
use crate::runtime::frames::Frame;

/// ffmpeg's stderr lines kept for the reason of a failure.
const STDERR_LINES: usize = 8;
/// Buffers a pool keeps: a frame in analysis, one being read, and slack.
const POOL_SIZE: usize = 4;

/// How long ffmpeg may take to exit once its output has ended.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// How long a running decoder may take to give its next frame, beyond three of
/// the analysis rate's frame intervals (a frame every 5 s is not late at 6 s).
/// The same as the sources' socket timeout (`source.rs`): a camera that says
/// nothing and one that says nothing decodable are given up alike.
pub const FRAME_OVERDUE: Duration = Duration::from_secs(10);
/// The first frame may take longer: connecting, ffmpeg's probe of the stream
/// (up to 5 s of it), waiting for a key frame (some cameras send one every 10 s).
pub const FIRST_FRAME_OVERDUE: Duration = Duration::from_secs(30);

/// What the pipeline asks of the decoder.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Frames analysed per second of the stream's timeline.
    pub fps: f64,
    pub width: u32,
    pub height: u32,
    /// Frames no other frame refers to (B-frames, mostly) are not decoded at all.
    /// At analysis rates well under the source's, the fps filter still finds a
    /// frame within a frame interval of each sampling instant; the benchmark
    /// measures what it saves (about 40 % of the decode for x264 with B-frames).
    pub skip_unreferenced: bool,
}

/// Analysis rates up to this skip unreferenced frames: cameras send 25-30 fps, so
/// there are decoded frames near every sampling instant.
pub const SKIP_UNREFERENCED_UP_TO_FPS: f64 = 10.0;

/// A hardware decoder ffmpeg is asked to use; frames come back to system memory
/// for the pipe either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hwaccel {
    /// NVDEC on the CUDA device with this ordinal (the replica's card's).
    Cuda { device: u32 },
    /// VA-API on a DRM render node (`/dev/dri/renderD128`).
    Vaapi { device: std::path::PathBuf },
}

impl Hwaccel {
    pub fn name(&self) -> &'static str {
        match self {
            Hwaccel::Cuda { .. } => "cuda",
            Hwaccel::Vaapi { .. } => "vaapi",
        }
    }

    fn ffmpeg_args(&self) -> Vec<String> {
        match self {
            Hwaccel::Cuda { device } => vec![
                "-hwaccel".into(),
                "cuda".into(),
                "-hwaccel_device".into(),
                device.to_string(),
            ],
            Hwaccel::Vaapi { device } => vec![
                "-hwaccel".into(),
                "vaapi".into(),
                "-hwaccel_device".into(),
                device.display().to_string(),
            ],
        }
    }
}

impl Settings {
    pub fn frame_bytes(&self) -> usize {
        self.width as usize * self.height as usize * 3
    }

    /// How long the next frame may take, the first or a later one.
    fn overdue_after(&self, first: bool) -> Duration {
        let base = if first {
            FIRST_FRAME_OVERDUE
        } else {
            FRAME_OVERDUE
        };
        // Packages' rates are 0.1-60 fps; whatever else comes, an hour at most.
        let most = Duration::from_secs(3600);
        let intervals = Duration::try_from_secs_f64(3.0 / self.fps).map_or(most, |d| d.min(most));
        base + intervals
    }
}

/// Reusable frame buffers.
pub struct FramePool {
    bytes: usize,
    buffers: Vec<Arc<[u8]>>,
    /// Buffers allocated past the pool because every pooled one was still held.
    pub overflow: u64,
}

impl FramePool {
    pub fn new(bytes: usize) -> FramePool {
        FramePool {
            bytes,
            buffers: Vec::with_capacity(POOL_SIZE),
            overflow: 0,
        }
    }

    /// Fills a free buffer from `read`; a buffer is free when no frame holds it.
    fn fill(
        &mut self,
        read: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<Arc<[u8]>> {
        let free = self
            .buffers
            .iter_mut()
            .position(|b| Arc::get_mut(b).is_some());
        let index = match free {
            Some(i) => i,
            None if self.buffers.len() < POOL_SIZE => {
                self.buffers.push(Arc::from(vec![0u8; self.bytes]));
                self.buffers.len() - 1
            }
            None => {
                self.overflow += 1;
                let mut buffer: Arc<[u8]> = Arc::from(vec![0u8; self.bytes]);
                read(Arc::get_mut(&mut buffer).expect("a new buffer is unshared"))?;
                return Ok(buffer);
            }
        };
        let buffer = &mut self.buffers[index];
        read(Arc::get_mut(buffer).expect("checked free above"))?;
        Ok(buffer.clone())
    }
}

/// Why decoding stopped. (A stop asked for also ends a run, as a failure here:
/// the pipeline that asked knows it for what it is.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The source ended cleanly (a file played out).
    Finished,
    /// ffmpeg failed (could not open, lost the source, bad data, crashed, was
    /// killed): its own words, else how it ended.
    Failed(String),
}

/// One run of ffmpeg over a source.
pub struct Decoder {
    child: Arc<Mutex<Child>>,
    stdout: ChildStdout,
    stderr: Arc<Mutex<VecDeque<String>>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
    settings: Settings,
    decoded: u64,
    /// Added to every timestamp: where this run starts on the task's timeline.
    origin_ms: u64,
    /// The decoder ffmpeg was told to use, for the task detail.
    pub decoder: &'static str,
}

/// A handle that stops a running decoder from another thread.
#[derive(Clone)]
pub struct Stopper(Arc<Mutex<Child>>);

impl Stopper {
    pub fn stop(&self) {
        // Killing the child closes its stdout: the reading thread sees the end.
        let _ = crate::sync::lock(&self.0).kill();
    }
}

/// Whether `ffmpeg` runs here: `ffmpeg -version` answers.
pub fn ffmpeg_available(ffmpeg: &Path) -> Result<String, String> {
    match Command::new(ffmpeg)
        .arg("-version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("ffmpeg")
            .to_string()),
        Ok(out) => Err(format!(
            "{} -version failed: {}",
            ffmpeg.display(),
            out.status
        )),
        Err(e) => Err(format!(
            "{} not found ({e}): video tasks need ffmpeg (apt-get install ffmpeg)",
            ffmpeg.display()
        )),
    }
}

/// Decoding threads per stream.
const DECODE_THREADS: &str = "2";
/// The largest picture decoded, in pixels: 8192 x 8192 (8K cameras and
/// panoramic ones fit).
const MAX_PIXELS: &str = "67108864";

impl Decoder {
    /// Starts ffmpeg on `source`, its first frame at `origin_ms` on the task's
    /// timeline.
    pub fn start(
        ffmpeg: &Path,
        source: &Source,
        settings: Settings,
        hwaccel: Option<&Hwaccel>,
        origin_ms: u64,
    ) -> std::io::Result<Decoder> {
        let mut command = Command::new(ffmpeg);
        command
            .args(["-hide_banner", "-nostdin", "-loglevel", "error"])
            .args(hwaccel.map(Hwaccel::ffmpeg_args).unwrap_or_default())
            // ffmpeg's default is a decoding thread per core, each with its own
            // frames (about 10 MiB each at 1080p): 17 threads and 220 MiB per
            // stream on a 16-core machine. Two keep a 4K stream real-time and a
            // stream's memory independent of the machine it runs on.
            .args(["-threads", DECODE_THREADS, "-filter_threads", "1"])
            // A stream may declare any picture size, and the decoder allocates
            // what it declares: pictures past 8K are refused ("exceeds specified
            // max pixel count"), not decoded into gigabytes.
            .args(["-max_pixels", MAX_PIXELS])
            .args(if settings.skip_unreferenced {
                &["-skip_frame", "noref"][..]
            } else {
                &[][..]
            })
            .args(source.ffmpeg_input())
            // Video only; frames dropped to the analysis rate first, so that only
            // those are scaled and converted.
            .args(["-an", "-sn", "-dn", "-vf"])
            .arg(format!(
                "fps={},scale={}:{}:flags=bilinear",
                settings.fps, settings.width, settings.height
            ))
            .args(["-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn()?;
        // Should memory run out anyway, a decoder goes first: the pipeline
        // reports it and starts it again.
        crate::children::prefer_for_oom_kill(child.id(), crate::children::DECODER_OOM_SCORE);
        let stdout = child.stdout.take().expect("stdout is piped");
        // Frames are read against a deadline: a read that would block waits in
        // poll(2), which has a timeout, rather than in read(2), which has none.
        if let Err(e) = rustix::fs::fcntl_getfl(&stdout).and_then(|flags| {
            rustix::fs::fcntl_setfl(&stdout, flags | rustix::fs::OFlags::NONBLOCK)
        }) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.into());
        }
        let stderr_pipe = child.stderr.take().expect("stderr is piped");
        let stderr = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_LINES)));
        let stderr_reader = {
            let stderr = stderr.clone();
            let source = source.clone();
            std::thread::Builder::new()
                .name("ffmpeg-stderr".into())
                .spawn(move || {
                    // Bounded lines: a stream that makes ffmpeg complain forever
                    // costs a few lines of memory.
                    let mut reader = std::io::BufReader::new(stderr_pipe);
                    let mut line = Vec::new();
                    loop {
                        line.clear();
                        match (&mut reader).take(4096).read_until(b'\n', &mut line) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                let text = String::from_utf8_lossy(&line);
                                let text = source.scrub(text.trim_end());
                                let mut lines = crate::sync::lock(&stderr);
                                if lines.len() == STDERR_LINES {
                                    lines.pop_front();
                                }
                                lines.push_back(crate::runtime::log::sanitize(&text));
                            }
                        }
                    }
                })?
        };
        Ok(Decoder {
            child: Arc::new(Mutex::new(child)),
            stdout,
            stderr,
            stderr_reader: Some(stderr_reader),
            settings,
            decoded: 0,
            origin_ms,
            decoder: hwaccel.map_or("cpu", Hwaccel::name),
        })
    }

    pub fn stopper(&self) -> Stopper {
        Stopper(self.child.clone())
    }

    /// Frames read so far in this run.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    /// Where the next frame falls on the task's timeline.
    pub fn position_ms(&self) -> u64 {
        self.origin_ms + (self.decoded as f64 * 1000.0 / self.settings.fps).round() as u64
    }

    /// The next frame, or why there is none. Timestamps follow the stream's own
    /// timeline at the analysis rate (ffmpeg's fps filter emits frames at exact
    /// multiples of 1/fps), so a file analysed faster than real time gives the same
    /// times as the same scene live.
    pub fn next_frame(&mut self, pool: &mut FramePool) -> Result<Frame, Ended> {
        let timestamp_ms = self.position_ms();
        let overdue_after = self.settings.overdue_after(self.decoded == 0);
        let deadline = Instant::now() + overdue_after;
        let stdout = &mut self.stdout;
        match pool.fill(|buffer| read_by(stdout, buffer, deadline)) {
            Err(e) if e.kind() == ErrorKind::TimedOut => {
                let _ = crate::sync::lock(&self.child).kill();
                let _ = self.reap();
                let said = match self.last_words() {
                    said if said.is_empty() => said,
                    said => format!(" (ffmpeg said: {said})"),
                };
                let which = if self.decoded == 0 { "first" } else { "next" };
                Err(Ended::Failed(format!(
                    "no {which} frame from the source in {} s: the decoder was stopped{said}",
                    overdue_after.as_secs()
                )))
            }
            Ok(pixels) => {
                self.decoded += 1;
                Frame::new(
                    self.settings.width,
                    self.settings.height,
                    timestamp_ms,
                    PixelFormat::Rgb8,
                    pixels,
                )
                .map_err(|e| Ended::Failed(format!("frame: {e}")))
            }
            Err(_) => Err(self.finish()),
        }
    }

    /// Waits for ffmpeg to exit and says why it did. A run that did not end
    /// cleanly is a failure whatever ended it (a crash on a hostile stream, the
    /// kernel's OOM killer): a stop asked for is told apart by the pipeline, which
    /// asked.
    fn finish(&mut self) -> Ended {
        let status = self.reap();
        let said = self.last_words();
        match status {
            Ok(status) if status.success() => Ended::Finished,
            Ok(status) if said.is_empty() => Ended::Failed(format!("ffmpeg exited with {status}")),
            Ok(_) => Ended::Failed(said),
            Err(e) => Ended::Failed(format!("ffmpeg: {e}")),
        }
    }

    /// ffmpeg's exit status. Polled, so that a stop from another thread can still
    /// kill it meanwhile; an ffmpeg still there `EXIT_GRACE` after its output ended
    /// is killed.
    fn reap(&self) -> std::io::Result<ExitStatus> {
        let give_up = Instant::now() + EXIT_GRACE;
        loop {
            {
                let mut child = crate::sync::lock(&self.child);
                if let Some(status) = child.try_wait()? {
                    return Ok(status);
                }
                if Instant::now() >= give_up {
                    let _ = child.kill();
                    return child.wait();
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// ffmpeg's last stderr lines, once it has exited.
    fn last_words(&mut self) -> String {
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        let said: Vec<String> = crate::sync::lock(&self.stderr).iter().cloned().collect();
        said.join(" | ")
    }
}

/// Fills `buffer` from the non-blocking `stdout`, or fails with `TimedOut` once
/// `deadline` passes first (`UnexpectedEof` where ffmpeg's output ends first).
fn read_by(stdout: &mut ChildStdout, buffer: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buffer.len() {
        match stdout.read(&mut buffer[filled..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ErrorKind::TimedOut.into());
                }
                let timeout = rustix::event::Timespec::try_from(left)
                    .map_err(|_| std::io::Error::from(ErrorKind::InvalidInput))?;
                let mut fds = [rustix::event::PollFd::new(
                    &*stdout,
                    rustix::event::PollFlags::IN,
                )];
                match rustix::event::poll(&mut fds, Some(&timeout)) {
                    // Readable, closed, or the time is up: the read above says which.
                    Ok(_) | Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Drop for Decoder {
    fn drop(&mut self) {
        let mut child = crate::sync::lock(&self.child);
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that fills the buffer with `byte`.
    fn fill(byte: u8) -> impl FnOnce(&mut [u8]) -> std::io::Result<()> {
        move |buffer| {
            buffer.fill(byte);
            Ok(())
        }
    }

    #[test]
    fn pooled_buffers_are_reused_once_their_frames_are_gone() {
        let mut pool = FramePool::new(8);
        let first = pool.fill(fill(1)).unwrap();
        let pointer = first.as_ptr();
        drop(first);
        let again = pool.fill(fill(2)).unwrap();
        assert_eq!(again.as_ptr(), pointer, "the free buffer is reused");
        assert_eq!(&again[..], &[2u8; 8]);
        // Held frames force new buffers, up to the pool, then overflow.
        let held: Vec<_> = (0..POOL_SIZE)
            .map(|_| pool.fill(fill(3)).unwrap())
            .collect();
        assert_eq!(pool.overflow, 1);
        drop(held);
        drop(again);
        pool.fill(fill(4)).unwrap();
        assert_eq!(pool.overflow, 1);
    }
}
