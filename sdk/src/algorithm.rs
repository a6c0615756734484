//! Algorithm plugins: the `algorithm-plugin` world.
//!
//! A task's rules open a session; the host then hands the session one frame at a time.
//! Frames are host-side handles: reading their size and time costs nothing, pixels
//! are copied into the plugin only through [`Frame::read_region`], and
//! [`inference::Model::run`] feeds a frame to a model without any copy at all.
//!
//! ```no_run
//! use xpud_sdk::algorithm::*;
//!
//! struct Counter { rules: Vec<Rule>, frames: u64 }
//!
//! impl Analyzer for Counter {
//!     fn open(rules: Vec<Rule>) -> Result<Self, AnalyzerError> {
//!         Ok(Counter { rules, frames: 0 })
//!     }
//!     fn process(&mut self, frame: &Frame) -> Result<Vec<Event>, AnalyzerError> {
//!         self.frames += 1;
//!         Ok(vec![])
//!     }
//! }
//!
//! xpud_sdk::export_algorithm!(Counter);
//! ```

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit/v0.2.0",
        world: "algorithm-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_algorithm_world",
        default_bindings_module: "xpud_sdk::algorithm::bindings",
        runtime_path: "xpud_sdk::__wit_bindgen::rt",
    });
}

pub use bindings::exports::xpu::plugin::analyzer::{
    AnalyzerError, Area, AreaType, BoundingBox, Event, Point, Rule,
};
pub use bindings::xpu::plugin::frames::{Frame, PixelFormat, Rect};

/// Native inference on the host (`xpu:plugin/inference`).
pub mod inference {
    pub use super::bindings::xpu::plugin::inference::{
        ChannelOrder, InferenceError, Layout, Model, Preprocess, Tensor,
    };
}

#[doc(hidden)]
pub use bindings::exports::xpu::plugin::analyzer::{
    Guest as __Guest, GuestSession as __GuestSession, Session as __Session,
};

/// What an analysis algorithm does: one value per session (a task on one stream).
pub trait Analyzer: Sized + 'static {
    /// Validates the task's rules and sets up the session's state.
    fn open(rules: Vec<Rule>) -> Result<Self, AnalyzerError>;

    /// Analyses one frame and returns the events it raises (often none).
    fn process(&mut self, frame: &Frame) -> Result<Vec<Event>, AnalyzerError>;
}

/// Exports an [`Analyzer`] implementation as the plugin's `xpu:plugin/analyzer` interface.
#[macro_export]
macro_rules! export_algorithm {
    ($analyzer:ty) => {
        struct __XpudAlgorithmExport;

        struct __XpudSession(::std::cell::RefCell<$analyzer>);

        impl $crate::algorithm::__Guest for __XpudAlgorithmExport {
            type Session = __XpudSession;
        }

        impl $crate::algorithm::__GuestSession for __XpudSession {
            fn open(
                rules: ::std::vec::Vec<$crate::algorithm::Rule>,
            ) -> ::std::result::Result<$crate::algorithm::__Session, $crate::algorithm::AnalyzerError>
            {
                let analyzer = <$analyzer as $crate::algorithm::Analyzer>::open(rules)?;
                Ok($crate::algorithm::__Session::new(__XpudSession(
                    ::std::cell::RefCell::new(analyzer),
                )))
            }

            fn process(
                &self,
                frame: &$crate::algorithm::Frame,
            ) -> ::std::result::Result<
                ::std::vec::Vec<$crate::algorithm::Event>,
                $crate::algorithm::AnalyzerError,
            > {
                <$analyzer as $crate::algorithm::Analyzer>::process(&mut self.0.borrow_mut(), frame)
            }
        }

        $crate::algorithm::bindings::__export_algorithm_world!(
            __XpudAlgorithmExport with_types_in $crate::algorithm::bindings
        );
    };
}
