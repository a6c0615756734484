//! `xpu:plugin/frames`: decoded frames live in the host; a plugin holds a handle.
//!
//! The pixels are shared (`Arc`), so handing one frame to several sessions copies
//! nothing. The only copy into guest memory is `read-region`, bounded by the region.

use std::sync::Arc;

use wasmtime::component::Resource;

use super::bindings::wit_frames::{Host, HostFrame, PixelFormat, Rect};
use super::PluginState;

/// A decoded frame, tightly packed rows.
#[derive(Clone, Debug)]
pub struct Frame {
    width: u32,
    height: u32,
    timestamp_ms: u64,
    format: PixelFormat,
    pixels: Arc<[u8]>,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(
        "frame is {width}x{height} {format:?}: expected {expected} bytes of pixels, got {got}"
    )]
    WrongSize {
        width: u32,
        height: u32,
        format: PixelFormat,
        expected: usize,
        got: usize,
    },
    #[error("frame has zero width or height")]
    Empty,
}

pub fn bytes_per_pixel(format: PixelFormat) -> usize {
    match format {
        PixelFormat::Rgb8 | PixelFormat::Bgr8 => 3,
        PixelFormat::Gray8 => 1,
    }
}

impl Frame {
    pub fn new(
        width: u32,
        height: u32,
        timestamp_ms: u64,
        format: PixelFormat,
        pixels: Arc<[u8]>,
    ) -> Result<Frame, FrameError> {
        if width == 0 || height == 0 {
            return Err(FrameError::Empty);
        }
        let expected = width as usize * height as usize * bytes_per_pixel(format);
        if pixels.len() != expected {
            return Err(FrameError::WrongSize {
                width,
                height,
                format,
                expected,
                got: pixels.len(),
            });
        }
        Ok(Frame {
            width,
            height,
            timestamp_ms,
            format,
            pixels,
        })
    }

    pub fn width(&self) -> u32 {
        self.width
    }
    pub fn height(&self) -> u32 {
        self.height
    }
    pub fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }
    pub fn format(&self) -> PixelFormat {
        self.format
    }
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// Copies a region out, row by row. Errors name what is out of bounds.
    pub fn read_region(&self, region: Rect) -> Result<Vec<u8>, String> {
        if region.width == 0 || region.height == 0 {
            return Err("region has zero width or height".into());
        }
        let fits = |start: u32, len: u32, limit: u32| {
            start.checked_add(len).is_some_and(|end| end <= limit)
        };
        if !fits(region.x, region.width, self.width) || !fits(region.y, region.height, self.height)
        {
            return Err(format!(
                "region {}x{} at ({}, {}) is outside the {}x{} frame",
                region.width, region.height, region.x, region.y, self.width, self.height
            ));
        }
        let bpp = bytes_per_pixel(self.format);
        let stride = self.width as usize * bpp;
        let row_len = region.width as usize * bpp;
        let mut out = Vec::with_capacity(row_len * region.height as usize);
        for row in region.y..region.y + region.height {
            let start = row as usize * stride + region.x as usize * bpp;
            out.extend_from_slice(&self.pixels[start..start + row_len]);
        }
        Ok(out)
    }
}

impl Host for PluginState {}

impl HostFrame for PluginState {
    fn width(&mut self, frame: Resource<Frame>) -> wasmtime::Result<u32> {
        Ok(self.table().get(&frame)?.width)
    }

    fn height(&mut self, frame: Resource<Frame>) -> wasmtime::Result<u32> {
        Ok(self.table().get(&frame)?.height)
    }

    fn timestamp_ms(&mut self, frame: Resource<Frame>) -> wasmtime::Result<u64> {
        Ok(self.table().get(&frame)?.timestamp_ms)
    }

    fn format(&mut self, frame: Resource<Frame>) -> wasmtime::Result<PixelFormat> {
        Ok(self.table().get(&frame)?.format)
    }

    fn read_region(
        &mut self,
        frame: Resource<Frame>,
        region: Rect,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        Ok(self.table().get(&frame)?.read_region(region))
    }

    fn drop(&mut self, frame: Resource<Frame>) -> wasmtime::Result<()> {
        self.table().delete(frame)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: u32, height: u32) -> Frame {
        let pixels: Vec<u8> = (0..width * height).map(|i| (i % 251) as u8).collect();
        Frame::new(width, height, 7, PixelFormat::Gray8, pixels.into()).unwrap()
    }

    #[test]
    fn read_region_copies_the_rows_asked_for() {
        let frame = gradient(8, 4);
        let got = frame
            .read_region(Rect {
                x: 2,
                y: 1,
                width: 3,
                height: 2,
            })
            .unwrap();
        assert_eq!(got, vec![10, 11, 12, 18, 19, 20]);
    }

    #[test]
    fn read_region_refuses_out_of_bounds_and_overflow() {
        let frame = gradient(8, 4);
        assert!(frame
            .read_region(Rect {
                x: 6,
                y: 0,
                width: 3,
                height: 1
            })
            .is_err());
        assert!(frame
            .read_region(Rect {
                x: u32::MAX,
                y: 0,
                width: 2,
                height: 1
            })
            .is_err());
        assert!(frame
            .read_region(Rect {
                x: 0,
                y: 0,
                width: 0,
                height: 1
            })
            .is_err());
    }

    #[test]
    fn new_checks_the_pixel_count() {
        let err = Frame::new(4, 4, 0, PixelFormat::Rgb8, vec![0u8; 10].into()).unwrap_err();
        assert!(err.to_string().contains("expected 48 bytes"), "{err}");
    }
}
