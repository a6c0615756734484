//! Turning a frame into a model's input tensor, natively: crop, bilinear resize,
//! normalise, lay out. The guest only describes what it wants (`preprocess`).

use super::bindings::wit_frames::{PixelFormat, Rect};
use super::bindings::wit_inference::{ChannelOrder, Layout, Preprocess};
use super::frames::{bytes_per_pixel, Frame};

/// Largest input side accepted: bounds the host memory one call can take.
pub const MAX_SIDE: u32 = 8192;

/// A dense f32 tensor and its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    pub shape: [i64; 4],
    pub data: Vec<f32>,
}

/// Builds the `[1, 3, H, W]` (NCHW) or `[1, H, W, 3]` (NHWC) input for `pre`.
pub fn input_tensor(frame: &Frame, pre: &Preprocess) -> Result<InputTensor, String> {
    let (out_w, out_h) = (pre.width, pre.height);
    if out_w == 0 || out_h == 0 || out_w > MAX_SIDE || out_h > MAX_SIDE {
        return Err(format!(
            "preprocess size {out_w}x{out_h}: each side must be within 1-{MAX_SIDE}"
        ));
    }
    let crop = pre.crop.unwrap_or(Rect {
        x: 0,
        y: 0,
        width: frame.width(),
        height: frame.height(),
    });
    let fits = |start: u32, len: u32, limit: u32| {
        len > 0 && start.checked_add(len).is_some_and(|end| end <= limit)
    };
    if !fits(crop.x, crop.width, frame.width()) || !fits(crop.y, crop.height, frame.height()) {
        return Err(format!(
            "crop {}x{} at ({}, {}) is outside the {}x{} frame",
            crop.width,
            crop.height,
            crop.x,
            crop.y,
            frame.width(),
            frame.height()
        ));
    }
    let std = [pre.std.0, pre.std.1, pre.std.2];
    if std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
        return Err("preprocess std must be finite and non-zero".into());
    }
    let mean = [pre.mean.0, pre.mean.1, pre.mean.2];

    // Where each output channel comes from in the frame's pixel.
    let source: [usize; 3] = match (frame.format(), pre.channel_order) {
        (PixelFormat::Rgb8, ChannelOrder::Rgb) | (PixelFormat::Bgr8, ChannelOrder::Bgr) => {
            [0, 1, 2]
        }
        (PixelFormat::Rgb8, ChannelOrder::Bgr) | (PixelFormat::Bgr8, ChannelOrder::Rgb) => {
            [2, 1, 0]
        }
        (PixelFormat::Gray8, _) => [0, 0, 0],
    };
    let bpp = bytes_per_pixel(frame.format());
    let stride = frame.width() as usize * bpp;
    let pixels = frame.pixels();
    let (ow, oh) = (out_w as usize, out_h as usize);
    let mut data = vec![0f32; 3 * ow * oh];
    let scale_x = crop.width as f32 / out_w as f32;
    let scale_y = crop.height as f32 / out_h as f32;
    for oy in 0..oh {
        // Pixel centres aligned (as OpenCV's INTER_LINEAR), clamped to the crop.
        let fy = ((oy as f32 + 0.5) * scale_y - 0.5).clamp(0.0, (crop.height - 1) as f32);
        let y0 = fy.floor() as usize;
        let y1 = (y0 + 1).min(crop.height as usize - 1);
        let wy = fy - y0 as f32;
        for ox in 0..ow {
            let fx = ((ox as f32 + 0.5) * scale_x - 0.5).clamp(0.0, (crop.width - 1) as f32);
            let x0 = fx.floor() as usize;
            let x1 = (x0 + 1).min(crop.width as usize - 1);
            let wx = fx - x0 as f32;
            let at = |x: usize, y: usize, c: usize| {
                let offset = (crop.y as usize + y) * stride + (crop.x as usize + x) * bpp + c;
                f32::from(pixels[offset])
            };
            for (channel, &c) in source.iter().enumerate() {
                let top = at(x0, y0, c) * (1.0 - wx) + at(x1, y0, c) * wx;
                let bottom = at(x0, y1, c) * (1.0 - wx) + at(x1, y1, c) * wx;
                let value = top * (1.0 - wy) + bottom * wy;
                let normalised = (value / 255.0 - mean[channel]) / std[channel];
                let index = match pre.layout {
                    Layout::Nchw => channel * oh * ow + oy * ow + ox,
                    Layout::Nhwc => (oy * ow + ox) * 3 + channel,
                };
                data[index] = normalised;
            }
        }
    }
    let shape = match pre.layout {
        Layout::Nchw => [1, 3, out_h as i64, out_w as i64],
        Layout::Nhwc => [1, out_h as i64, out_w as i64, 3],
    };
    Ok(InputTensor { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre(width: u32, height: u32, layout: Layout, order: ChannelOrder) -> Preprocess {
        Preprocess {
            crop: None,
            width,
            height,
            layout,
            channel_order: order,
            mean: (0.0, 0.0, 0.0),
            std: (1.0, 1.0, 1.0),
        }
    }

    /// 4x2 RGB frame: left half (255, 0, 0), right half (0, 0, 255).
    fn halves() -> Frame {
        let mut px = Vec::new();
        for _y in 0..2 {
            for x in 0..4 {
                px.extend_from_slice(if x < 2 { &[255, 0, 0] } else { &[0, 0, 255] });
            }
        }
        Frame::new(4, 2, 0, PixelFormat::Rgb8, px.into()).unwrap()
    }

    #[test]
    fn identity_size_keeps_pixels_in_nchw_planes() {
        let t = input_tensor(&halves(), &pre(4, 2, Layout::Nchw, ChannelOrder::Rgb)).unwrap();
        assert_eq!(t.shape, [1, 3, 2, 4]);
        // Red plane, first row.
        assert_eq!(&t.data[0..4], &[1.0, 1.0, 0.0, 0.0]);
        // Blue plane, first row.
        assert_eq!(&t.data[16..20], &[0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn bgr_order_and_nhwc_layout() {
        let t = input_tensor(&halves(), &pre(4, 2, Layout::Nhwc, ChannelOrder::Bgr)).unwrap();
        assert_eq!(t.shape, [1, 2, 4, 3]);
        // First pixel is red: in BGR order (0, 0, 1).
        assert_eq!(&t.data[0..3], &[0.0, 0.0, 1.0]);
    }

    #[test]
    fn downscale_averages_and_crop_selects() {
        // 2x1 output from 4 wide: each output pixel samples between two inputs of one half.
        let t = input_tensor(&halves(), &pre(2, 1, Layout::Nchw, ChannelOrder::Rgb)).unwrap();
        assert_eq!(t.data, vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        let mut cropped = pre(1, 1, Layout::Nchw, ChannelOrder::Rgb);
        cropped.crop = Some(Rect {
            x: 2,
            y: 0,
            width: 2,
            height: 2,
        });
        let t = input_tensor(&halves(), &cropped).unwrap();
        assert_eq!(t.data, vec![0.0, 0.0, 1.0]);
    }

    #[test]
    fn normalisation_applies_mean_and_std() {
        let mut p = pre(1, 1, Layout::Nchw, ChannelOrder::Rgb);
        p.crop = Some(Rect {
            x: 0,
            y: 0,
            width: 1,
            height: 1,
        });
        p.mean = (0.5, 0.0, 0.0);
        p.std = (0.5, 1.0, 2.0);
        let t = input_tensor(&halves(), &p).unwrap();
        assert_eq!(t.data, vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn bad_requests_are_refused() {
        let frame = halves();
        assert!(input_tensor(&frame, &pre(0, 1, Layout::Nchw, ChannelOrder::Rgb)).is_err());
        assert!(input_tensor(
            &frame,
            &pre(MAX_SIDE + 1, 1, Layout::Nchw, ChannelOrder::Rgb)
        )
        .is_err());
        let mut p = pre(1, 1, Layout::Nchw, ChannelOrder::Rgb);
        p.crop = Some(Rect {
            x: 3,
            y: 0,
            width: 2,
            height: 1,
        });
        assert!(input_tensor(&frame, &p).unwrap_err().contains("outside"));
        let mut p = pre(1, 1, Layout::Nchw, ChannelOrder::Rgb);
        p.std = (1.0, 0.0, 1.0);
        assert!(input_tensor(&frame, &p).is_err());
    }
}
