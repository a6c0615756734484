//! Logging into the host's log stream (the `xpu:plugin/log` import).
//!
//! Use the macros: `xpud_sdk::info!("found {} cards", n)`. Messages go to the host's
//! structured log, tagged with the plugin's name.

#[cfg(all(feature = "driver", target_arch = "wasm32"))]
use crate::driver::bindings::xpu::plugin::log as wit;

#[cfg(all(feature = "algorithm", not(feature = "driver"), target_arch = "wasm32"))]
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

/// Sends one line to the host. Built for anything but wasm (a plugin's native unit
/// tests) there is no host: the line goes to stderr. Without a world feature there
/// is no host to send to and the line is dropped.
pub fn log(level: Level, message: &str) {
    #[cfg(all(
        any(feature = "driver", feature = "algorithm"),
        not(target_arch = "wasm32")
    ))]
    eprintln!("[{level:?}] {message}");
    #[cfg(all(any(feature = "driver", feature = "algorithm"), target_arch = "wasm32"))]
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
