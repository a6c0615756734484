//! A memory region xpud shares with one of its inference workers: a memfd both
//! map, through which tensors cross without the socket between them. Over the
//! socket a 1.8 MB input tensor was copied four times (to bytes, into the kernel,
//! out of it, back to floats), and as many for the outputs: more time than the
//! model's run on this machine. Through the region it is copied once each way.
//!
//! The host creates the region and gives the worker its descriptor once, over
//! their socket (`SCM_RIGHTS`). Only the host grows it, never shrinking it (the
//! memfd is sealed against shrinking, so neither side can make the other's
//! mapping point past the end of the file), and each request says how long it is
//! now: the worker maps it again when it grew. One side touches it at a time: the
//! host before it sends a request and after the answer, the worker in between.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The region grows by whole steps, so that slightly larger tensors do not each
/// cost a new mapping.
const STEP: usize = 1 << 20;

pub struct Region {
    fd: OwnedFd,
    /// The mapping of the first `len` bytes; null while nothing is mapped.
    ptr: *mut std::ffi::c_void,
    len: usize,
}

// SAFETY: the mapping belongs to the region alone, wherever it moves; the
// pointer is used only through `&self`/`&mut self`.
unsafe impl Send for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        self.unmap();
    }
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

impl Region {
    /// A new, empty region (the host's side).
    pub fn create() -> std::io::Result<Region> {
        let fd = rustix::fs::memfd_create(
            "xpud-worker-tensors",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::SEAL)?;
        Ok(Region {
            fd,
            ptr: std::ptr::null_mut(),
            len: 0,
        })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes room for at least `bytes` (the host's side, before it writes).
    pub fn grow(&mut self, bytes: usize) -> std::io::Result<()> {
        if bytes <= self.len {
            return Ok(());
        }
        let len = bytes.div_ceil(STEP) * STEP;
        rustix::fs::ftruncate(&self.fd, len as u64)?;
        self.map(len)
    }

    /// Maps the first `len` bytes, as the host said the region now is (the
    /// worker's side). A length the file does not have is refused: touching a
    /// page past its end would kill the process.
    pub fn map(&mut self, len: usize) -> std::io::Result<()> {
        if len <= self.len {
            return Ok(());
        }
        let size = rustix::fs::fstat(&self.fd)?.st_size;
        if (size as u64) < len as u64 {
            return Err(invalid(format!(
                "the region is {size} bytes, not the {len} said"
            )));
        }
        self.unmap();
        // SAFETY: a new shared mapping of a file at least `len` long, which
        // cannot shrink (sealed); nothing else refers to the old one.
        self.ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &self.fd,
                0,
            )?
        };
        self.len = len;
        Ok(())
    }

    fn unmap(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: the mapping made in `map`, `len` long, no longer borrowed
            // (`&mut self`).
            let _ = unsafe { rustix::mm::munmap(self.ptr, self.len) };
            self.ptr = std::ptr::null_mut();
            self.len = 0;
        }
    }

    /// Whether `count` floats from float `at` lie inside the region.
    fn holds(&self, at: usize, count: usize) -> bool {
        at.checked_add(count)
            .and_then(|end| end.checked_mul(4))
            .is_some_and(|end| end <= self.len)
    }

    /// Writes `values` from float `at` on.
    pub fn write(&mut self, at: usize, values: &[f32]) -> std::io::Result<()> {
        if !self.holds(at, values.len()) {
            return Err(invalid(format!(
                "{} values from {at} do not fit in {} bytes",
                values.len(),
                self.len
            )));
        }
        // SAFETY: in bounds (checked), f32-aligned (page-aligned mapping), and
        // the other process does not touch the region now (the protocol).
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                (self.ptr as *mut f32).add(at),
                values.len(),
            );
        }
        Ok(())
    }

    /// `count` floats from float `at` on, copied out.
    pub fn read(&self, at: usize, count: usize) -> std::io::Result<Vec<f32>> {
        Ok(self.view(at, count)?.to_vec())
    }

    /// `count` floats from float `at` on, in place: valid while the other
    /// process leaves the region alone (until this side answers).
    pub fn view(&self, at: usize, count: usize) -> std::io::Result<&[f32]> {
        if !self.holds(at, count) {
            return Err(invalid(format!(
                "{count} values from {at} are past the region's {} bytes",
                self.len
            )));
        }
        if count == 0 {
            return Ok(&[]);
        }
        // SAFETY: in bounds (checked), aligned, and any bits are a valid f32.
        Ok(unsafe { std::slice::from_raw_parts((self.ptr as *const f32).add(at), count) })
    }

    /// Gives the region to the process at the other end of `socket`.
    pub fn send(&self, socket: impl AsFd) -> std::io::Result<()> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds = [self.fd.as_fd()];
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(invalid("no room for the region's descriptor".into()));
        }
        rustix::net::sendmsg(
            socket,
            &[IoSlice::new(b"R")],
            &mut control,
            SendFlags::empty(),
        )?;
        Ok(())
    }

    /// The region the process at the other end of `socket` gave (its first
    /// message), not yet mapped.
    pub fn receive(socket: impl AsFd) -> std::io::Result<Region> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut byte = [0u8; 1];
        rustix::net::recvmsg(
            socket,
            &mut [IoSliceMut::new(&mut byte)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        let mut received = None;
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                for fd in fds {
                    received.get_or_insert(fd);
                }
            }
        }
        match (byte, received) {
            ([b'R'], Some(fd)) => Ok(Region {
                fd,
                ptr: std::ptr::null_mut(),
                len: 0,
            }),
            _ => Err(invalid("the first message carries no region".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_one_side_writes_the_other_reads_and_nothing_past_the_end() {
        let (host_end, worker_end) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut host = Region::create().unwrap();
        host.send(&host_end).unwrap();
        let mut worker = Region::receive(&worker_end).unwrap();

        host.grow(10).unwrap();
        assert_eq!(host.len(), STEP);
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        host.write(0, &values).unwrap();
        // Not told yet: nothing mapped, nothing readable.
        assert!(worker.view(0, 1).is_err());
        worker.map(host.len()).unwrap();
        assert_eq!(worker.view(0, 1000).unwrap(), values.as_slice());
        worker.write(1000, &[7.0, 8.0]).unwrap();
        assert_eq!(host.read(1000, 2).unwrap(), [7.0, 8.0]);

        // Past the end, or a length the file does not have: refused.
        let floats = STEP / 4;
        assert!(host.write(floats - 1, &[1.0, 2.0]).is_err());
        assert!(host.read(usize::MAX, 2).is_err());
        assert!(worker.map(2 * STEP).is_err());
        // Grown: the old contents stay, the worker maps the new length.
        host.grow(STEP + 1).unwrap();
        assert_eq!(host.len(), 2 * STEP);
        assert_eq!(host.read(0, 3).unwrap(), [0.0, 0.5, 1.0]);
        worker.map(host.len()).unwrap();
        worker.write(floats, &[9.0]).unwrap();
        assert_eq!(host.read(floats, 1).unwrap(), [9.0]);
        // Sealed: the file cannot shrink under the other side's mapping.
        assert!(rustix::fs::ftruncate(&worker.fd, 0).is_err());
    }

    #[test]
    fn a_first_message_without_a_descriptor_is_not_a_region() {
        use std::io::Write;
        let (mut host_end, worker_end) = std::os::unix::net::UnixStream::pair().unwrap();
        host_end.write_all(b"R").unwrap();
        assert!(Region::receive(&worker_end).is_err());
    }
}
