//! JPEG snapshots for events whose rule asks for images (G.2 `eventDest.imageDest`):
//! the analysed frame, or an object's box in it, encoded in the host from the
//! pixels the frame already holds. Only frames that raise such events pay for it.

use jpeg_encoder::{ColorType, Encoder};

use crate::runtime::bindings::wit_frames::{PixelFormat, Rect};
use crate::runtime::frames::Frame;

/// JPEG quality: what camera snapshots usually carry.
const QUALITY: u8 = 80;

/// The whole frame as a JPEG.
pub fn full(frame: &Frame) -> Result<Vec<u8>, String> {
    encode(
        frame.pixels(),
        frame.width(),
        frame.height(),
        frame.format(),
    )
}

/// The part of `frame` inside a normalised box (0-1, origin top-left) as a JPEG;
/// none when the box holds no pixel of the frame.
pub fn crop(
    frame: &Frame,
    x: f64,
    y: f64,
    width: f64,
    height: f64,
) -> Option<Result<Vec<u8>, String>> {
    let region = pixel_region(frame.width(), frame.height(), x, y, width, height)?;
    Some(
        frame
            .read_region(region)
            .and_then(|pixels| encode(&pixels, region.width, region.height, frame.format())),
    )
}

/// The pixels a normalised box covers, clamped to the frame (a box an algorithm
/// made may be partly outside, or not a box at all).
fn pixel_region(
    frame_w: u32,
    frame_h: u32,
    x: f64,
    y: f64,
    width: f64,
    height: f64,
) -> Option<Rect> {
    let span = |start: f64, len: f64, size: u32| {
        let size = f64::from(size);
        let from = (start * size).floor().clamp(0.0, size);
        let to = ((start + len) * size).ceil().clamp(0.0, size);
        // NaN compares false: no span.
        (len > 0.0 && to > from).then_some((from as u32, (to - from) as u32))
    };
    let (x, w) = span(x, width, frame_w)?;
    let (y, h) = span(y, height, frame_h)?;
    Some(Rect {
        x,
        y,
        width: w,
        height: h,
    })
}

fn encode(pixels: &[u8], width: u32, height: u32, format: PixelFormat) -> Result<Vec<u8>, String> {
    let (Ok(w), Ok(h)) = (u16::try_from(width), u16::try_from(height)) else {
        return Err(format!("{width}x{height} is too large for a JPEG"));
    };
    let color = match format {
        PixelFormat::Rgb8 => ColorType::Rgb,
        PixelFormat::Bgr8 => ColorType::Bgr,
        PixelFormat::Gray8 => ColorType::Luma,
    };
    let mut jpeg = Vec::new();
    Encoder::new(&mut jpeg, QUALITY)
        .encode(pixels, w, h, color)
        .map_err(|e| format!("cannot encode a JPEG snapshot: {e}"))?;
    Ok(jpeg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Frame {
        let pixels: Vec<u8> = (0..64 * 48 * 3).map(|i| (i % 251) as u8).collect();
        Frame::new(64, 48, 0, PixelFormat::Rgb8, pixels.into()).unwrap()
    }

    #[test]
    fn snapshots_are_jpegs_of_the_frame_and_of_the_box() {
        let jpeg = full(&frame()).unwrap();
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8], "a JPEG starts with SOI");
        assert_eq!(&jpeg[jpeg.len() - 2..], &[0xFF, 0xD9], "and ends with EOI");
        let crop = crop(&frame(), 0.25, 0.5, 0.5, 0.25).unwrap().unwrap();
        assert_eq!(&crop[..2], &[0xFF, 0xD8]);
        assert!(crop.len() < jpeg.len());
    }

    #[test]
    fn boxes_are_clamped_to_the_frame_and_empty_ones_give_nothing() {
        let r = pixel_region(64, 48, -0.5, 0.9, 1.0, 0.5).unwrap();
        assert_eq!((r.x, r.y, r.width, r.height), (0, 43, 32, 5));
        assert!(pixel_region(64, 48, 1.2, 0.0, 0.1, 0.1).is_none());
        assert!(pixel_region(64, 48, f64::NAN, 0.0, 0.1, 0.1).is_none());
        assert!(pixel_region(64, 48, 0.1, 0.1, 0.0, 0.5).is_none());
        assert!(pixel_region(64, 48, 0.0, 0.0, f64::INFINITY, 1.0).is_some());
    }
}
