//! `xpu:plugin/log`: plugin log lines go into the host's tracing stream, tagged with
//! the plugin's name, under the `plugin` target.
//!
//! A plugin's words are untrusted input to the operator's log: each line is cut to
//! `MAX_LINE`, its control characters (newlines above all: a plugin must not forge a
//! line of the host's) and bidirectional overrides are escaped, and a plugin writes
//! at most `[plugin-limits] log-lines-per-s` lines a second. Lines past that are
//! dropped and counted; the count is logged when the plugin may write again, and
//! shown in `GET /plugins`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::bindings::driver::xpu::plugin::log::{Host, Level};
use super::PluginState;
use crate::sync::lock;

/// Longest line kept from a plugin; a plugin cannot flood the log with one call.
const MAX_LINE: usize = 4096;

/// Seconds of the rate a plugin may write at once, after a quiet while.
const BURST_S: f64 = 10.0;

/// The log rate of one plugin, shared by all its instances (a token bucket).
#[derive(Debug)]
pub struct LogBudget {
    per_s: f64,
    bucket: Mutex<Bucket>,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Dropped since the last line that was let through.
    unreported: u64,
}

impl LogBudget {
    pub fn new(lines_per_s: u32) -> LogBudget {
        let per_s = f64::from(lines_per_s.max(1));
        LogBudget {
            per_s,
            bucket: Mutex::new(Bucket {
                tokens: per_s * BURST_S,
                at: Instant::now(),
                unreported: 0,
            }),
            dropped: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: the line may be written, `n` lines were dropped before it.
    /// `None`: drop it.
    fn admit(&self) -> Option<u64> {
        let mut bucket = lock(&self.bucket);
        let now = Instant::now();
        let refill = now.duration_since(bucket.at).as_secs_f64() * self.per_s;
        bucket.tokens = (bucket.tokens + refill).min(self.per_s * BURST_S);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Some(std::mem::take(&mut bucket.unreported))
        } else {
            bucket.unreported += 1;
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Lines dropped since the plugin was loaded.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A plugin's message as one safe line: at most `MAX_LINE` bytes of it, control
/// characters and bidirectional overrides escaped (`\n`, `\u{202e}`).
pub fn sanitize(message: &str) -> String {
    let mut cut = message.len().min(MAX_LINE);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut line = String::with_capacity(cut + 16);
    for c in message[..cut].chars() {
        if crate::text::is_hidden_control(c) {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    if cut < message.len() {
        line.push_str(" [truncated]");
    }
    line
}

impl Host for PluginState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let plugin = &*self.plugin;
        let Some(dropped) = self.log.admit() else {
            return Ok(());
        };
        if dropped > 0 {
            tracing::warn!(target: "plugin", plugin, dropped, "plugin log rate limit: {dropped} lines dropped");
        }
        let message = sanitize(&message);
        match level {
            Level::Trace => tracing::trace!(target: "plugin", plugin, "{message}"),
            Level::Debug => tracing::debug!(target: "plugin", plugin, "{message}"),
            Level::Info => tracing::info!(target: "plugin", plugin, "{message}"),
            Level::Warn => tracing::warn!(target: "plugin", plugin, "{message}"),
            Level::Error => tracing::error!(target: "plugin", plugin, "{message}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_cannot_forge_a_line_or_reorder_text() {
        let forged =
            "ok\n2026-01-01T00:00:00Z ERROR plugin marked unhealthy plugin=sim-xpu\r\x1b[2J";
        let line = sanitize(forged);
        assert!(!line.contains('\n') && !line.contains('\r') && !line.contains('\x1b'));
        assert!(line.starts_with("ok\\n2026"), "{line}");
        assert_eq!(sanitize("a\u{202e}b"), "a\\u{202e}b");
        assert_eq!(sanitize("grüße"), "grüße");
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let line = sanitize(&"é".repeat(MAX_LINE));
        assert!(line.ends_with(" [truncated]"));
        assert!(line.len() <= MAX_LINE + " [truncated]".len());
    }

    #[test]
    fn past_the_burst_lines_are_dropped_and_counted() {
        let budget = LogBudget::new(10);
        let admitted = (0..1000).filter(|_| budget.admit().is_some()).count();
        // The burst (ten seconds' worth), plus what refilled during the loop.
        assert!((100..=102).contains(&admitted), "{admitted}");
        assert_eq!(budget.dropped(), 1000 - admitted as u64);
        std::thread::sleep(std::time::Duration::from_millis(150));
        // The next line let through carries the count of those dropped before it.
        assert_eq!(budget.admit(), Some(1000 - admitted as u64));
    }
}
