//! `xpu:plugin@0.2.0` (`wit/v0.2.0`): the 0.1 contract plus the `nvml` bridge a
//! driver may import, and a `sample` that says which devices it belongs to.
//!
//! The driver's types did not change, so they are the 0.1 types (`with:`) and a 0.2
//! driver's answers need no conversion. The interfaces imported under the new
//! version's name get host functions that delegate to the 0.1 implementations.

pub mod driver {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2.0",
        world: "driver-plugin",
        imports: { default: trappable },
        with: {
            "xpu:plugin/driver-types": crate::runtime::bindings::driver_types,
        },
    });
}

pub mod algorithm {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2.0",
        world: "algorithm-plugin",
        imports: { default: trappable },
        with: {
            "xpu:plugin/log": super::driver::xpu::plugin::log,
            "xpu:plugin/frames.frame": crate::runtime::frames::Frame,
            "xpu:plugin/inference.model": crate::runtime::inference::Model,
        },
    });
}

use wasmtime::component::Resource;

use super::{analyzer as v1_analyzer, wit_frames as v1_frames, wit_inference as v1_inference};
use crate::runtime::frames::Frame;
use crate::runtime::inference::Model;
use crate::runtime::PluginState;
use algorithm::exports::xpu::plugin::analyzer;
use algorithm::xpu::plugin::{frames, inference};
use driver::xpu::plugin::log;

impl log::Host for PluginState {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        use super::driver::xpu::plugin::log::{Host, Level};
        let level = match level {
            log::Level::Trace => Level::Trace,
            log::Level::Debug => Level::Debug,
            log::Level::Info => Level::Info,
            log::Level::Warn => Level::Warn,
            log::Level::Error => Level::Error,
        };
        Host::log(self, level, message)
    }
}

impl frames::Host for PluginState {}

impl frames::HostFrame for PluginState {
    fn width(&mut self, frame: Resource<Frame>) -> wasmtime::Result<u32> {
        v1_frames::HostFrame::width(self, frame)
    }
    fn height(&mut self, frame: Resource<Frame>) -> wasmtime::Result<u32> {
        v1_frames::HostFrame::height(self, frame)
    }
    fn timestamp_ms(&mut self, frame: Resource<Frame>) -> wasmtime::Result<u64> {
        v1_frames::HostFrame::timestamp_ms(self, frame)
    }
    fn format(&mut self, frame: Resource<Frame>) -> wasmtime::Result<frames::PixelFormat> {
        Ok(v1_frames::HostFrame::format(self, frame)?.into())
    }
    fn read_region(
        &mut self,
        frame: Resource<Frame>,
        region: frames::Rect,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        v1_frames::HostFrame::read_region(self, frame, region.into())
    }
    fn drop(&mut self, frame: Resource<Frame>) -> wasmtime::Result<()> {
        v1_frames::HostFrame::drop(self, frame)
    }
}

impl inference::Host for PluginState {}

impl inference::HostModel for PluginState {
    fn load(
        &mut self,
        path: String,
    ) -> wasmtime::Result<Result<Resource<Model>, inference::InferenceError>> {
        Ok(v1_inference::HostModel::load(self, path)?.map_err(Into::into))
    }
    fn provider(&mut self, model: Resource<Model>) -> wasmtime::Result<String> {
        v1_inference::HostModel::provider(self, model)
    }
    fn run(
        &mut self,
        model: Resource<Model>,
        input: Resource<Frame>,
        pre: inference::Preprocess,
    ) -> wasmtime::Result<Result<Vec<inference::Tensor>, inference::InferenceError>> {
        let answer = v1_inference::HostModel::run(self, model, input, pre.into())?;
        Ok(answer
            .map(|tensors| tensors.into_iter().map(Into::into).collect())
            .map_err(Into::into))
    }
    fn drop(&mut self, model: Resource<Model>) -> wasmtime::Result<()> {
        v1_inference::HostModel::drop(self, model)
    }
}

impl From<v1_frames::PixelFormat> for frames::PixelFormat {
    fn from(format: v1_frames::PixelFormat) -> Self {
        match format {
            v1_frames::PixelFormat::Rgb8 => frames::PixelFormat::Rgb8,
            v1_frames::PixelFormat::Bgr8 => frames::PixelFormat::Bgr8,
            v1_frames::PixelFormat::Gray8 => frames::PixelFormat::Gray8,
        }
    }
}

impl From<frames::Rect> for v1_frames::Rect {
    fn from(r: frames::Rect) -> Self {
        v1_frames::Rect {
            x: r.x,
            y: r.y,
            width: r.width,
            height: r.height,
        }
    }
}

impl From<inference::Preprocess> for v1_inference::Preprocess {
    fn from(p: inference::Preprocess) -> Self {
        v1_inference::Preprocess {
            crop: p.crop.map(Into::into),
            width: p.width,
            height: p.height,
            layout: match p.layout {
                inference::Layout::Nchw => v1_inference::Layout::Nchw,
                inference::Layout::Nhwc => v1_inference::Layout::Nhwc,
            },
            channel_order: match p.channel_order {
                inference::ChannelOrder::Rgb => v1_inference::ChannelOrder::Rgb,
                inference::ChannelOrder::Bgr => v1_inference::ChannelOrder::Bgr,
            },
            mean: p.mean,
            std: p.std,
        }
    }
}

impl From<v1_inference::Tensor> for inference::Tensor {
    fn from(t: v1_inference::Tensor) -> Self {
        inference::Tensor {
            name: t.name,
            shape: t.shape,
            data: t.data,
        }
    }
}

impl From<v1_inference::InferenceError> for inference::InferenceError {
    fn from(e: v1_inference::InferenceError) -> Self {
        use inference::InferenceError as E;
        match e {
            v1_inference::InferenceError::ModelNotFound(m) => E::ModelNotFound(m),
            v1_inference::InferenceError::InvalidModel(m) => E::InvalidModel(m),
            v1_inference::InferenceError::InvalidInput(m) => E::InvalidInput(m),
            v1_inference::InferenceError::Unavailable(m) => E::Unavailable(m),
            v1_inference::InferenceError::Runtime(m) => E::Runtime(m),
        }
    }
}

impl From<&v1_analyzer::Rule> for analyzer::Rule {
    fn from(rule: &v1_analyzer::Rule) -> Self {
        let area = |a: &v1_analyzer::Area| analyzer::Area {
            id: a.id,
            area_type: match a.area_type {
                v1_analyzer::AreaType::Polygon => analyzer::AreaType::Polygon,
                v1_analyzer::AreaType::SingleLine => analyzer::AreaType::SingleLine,
                v1_analyzer::AreaType::SingleLineBoth => analyzer::AreaType::SingleLineBoth,
                v1_analyzer::AreaType::MultiLine => analyzer::AreaType::MultiLine,
                v1_analyzer::AreaType::MultiLineBoth => analyzer::AreaType::MultiLineBoth,
            },
            points: a
                .points
                .iter()
                .map(|p| analyzer::Point { x: p.x, y: p.y })
                .collect(),
        };
        analyzer::Rule {
            event_type: rule.event_type.clone(),
            areas: rule.areas.iter().map(area).collect(),
            masks: rule.masks.iter().map(area).collect(),
            extend_params: rule.extend_params.clone(),
        }
    }
}

impl From<analyzer::Event> for v1_analyzer::Event {
    fn from(e: analyzer::Event) -> Self {
        v1_analyzer::Event {
            event_type: e.event_type,
            area_id: e.area_id,
            bbox: e.bbox.map(|b| v1_analyzer::BoundingBox {
                x: b.x,
                y: b.y,
                width: b.width,
                height: b.height,
            }),
            label: e.label,
            confidence: e.confidence,
            attributes: e.attributes,
        }
    }
}

impl From<analyzer::AnalyzerError> for v1_analyzer::AnalyzerError {
    fn from(e: analyzer::AnalyzerError) -> Self {
        match e {
            analyzer::AnalyzerError::InvalidRules(m) => v1_analyzer::AnalyzerError::InvalidRules(m),
            analyzer::AnalyzerError::Processing(m) => v1_analyzer::AnalyzerError::Processing(m),
        }
    }
}
