//! A plugin's stderr: the last bytes it wrote, kept for crash reports.
//!
//! Writes always succeed (a plugin must not fail, or panic in `eprintln!`, because
//! it was chatty); only the newest `capacity` bytes are kept, since what matters
//! after a crash is how it ended (a Rust panic message is written last).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Clone)]
pub struct StderrTail {
    capacity: usize,
    bytes: Arc<Mutex<VecDeque<u8>>>,
}

impl StderrTail {
    pub fn new(capacity: usize) -> StderrTail {
        StderrTail {
            capacity,
            bytes: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))),
        }
    }

    fn append(&self, data: &[u8]) {
        let mut bytes = crate::sync::lock(&self.bytes);
        let data = &data[data.len().saturating_sub(self.capacity)..];
        let overflow = (bytes.len() + data.len()).saturating_sub(self.capacity);
        bytes.drain(..overflow);
        bytes.extend(data);
    }

    /// The last `lines` lines, joined with " | ".
    pub fn last_lines(&self, lines: usize) -> String {
        let bytes = crate::sync::lock(&self.bytes);
        let (front, back) = bytes.as_slices();
        let text = String::from_utf8_lossy(&[front, back].concat()).into_owned();
        let mut tail: Vec<&str> = text
            .lines()
            .rev()
            .filter(|l| !l.trim().is_empty())
            .take(lines)
            .collect();
        tail.reverse();
        tail.join(" | ")
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrTail {
    async fn ready(&mut self) {}
}

impl OutputStream for StderrTail {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Any amount: older bytes make room.
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for StderrTail {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_bytes_and_never_refuses() {
        let mut tail = StderrTail::new(16);
        for i in 0..100 {
            tail.write(bytes::Bytes::from(format!("line {i}\n")))
                .unwrap();
        }
        assert_eq!(tail.last_lines(2), "line 98 | line 99");
        tail.write(bytes::Bytes::from(vec![b'x'; 100])).unwrap();
        assert_eq!(tail.last_lines(5), "x".repeat(16));
    }
}
