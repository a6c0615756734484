//! Logging into the host's log stream (the `xpu:plugin/log` import).
//!
//! Use the macros: `xpud_sdk::info!("found {} cards", n)`. Messages go to the host's
//! structured log, tagged with the plugin's name.

#[cfg(feature = "driver")]
use crate::driver::bindings::xpu::plugin::log as wit;

#[cfg(all(feature = "algorithm", not(feature = "driver")))]
use crate::algorithm::bindings::xpu::plugin::log as wit;

/// Severity of a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Sends one line to the host. Without a world feature there is no host to send to
/// and the line is dropped.
pub fn log(level: Level, message: &str) {
    #[cfg(any(feature = "driver", feature = "algorithm"))]
    {
        let level = match level {
            Level::Trace => wit::Level::Trace,
            Level::Debug => wit::Level::Debug,
            Level::Info => wit::Level::Info,
            Level::Warn => wit::Level::Warn,
            Level::Error => wit::Level::Error,
        };
        wit::log(level, message);
    }
    #[cfg(not(any(feature = "driver", feature = "algorithm")))]
    let _ = (level, message);
}

#[macro_export]
macro_rules! trace { ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Trace, &format!($($arg)*)) } }
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Debug, &format!($($arg)*)) } }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Info, &format!($($arg)*)) } }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Warn, &format!($($arg)*)) } }
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log::log($crate::log::Level::Error, &format!($($arg)*)) } }
