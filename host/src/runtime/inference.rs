//! `xpu:plugin/inference`: models run natively in ONNX Runtime, never in the guest.
//!
//! The runtime library is loaded once per process from the configured path
//! (`[inference] onnxruntime`, else `XPUD_ONNXRUNTIME`). Each model session tries the
//! configured execution providers in order (CUDA, then CPU by default), each told to
//! fail rather than fall back silently, and logs which one runs it. Without a usable
//! library, `load` answers `unavailable` and the host says so once, at start.
//!
//! Model files come from the plugin's package directory through a cap-std `Dir`:
//! a path cannot climb out of it.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use ort::session::Session;
use wasmtime::component::Resource;

use super::bindings::wit_inference::{Host, HostModel, InferenceError, Preprocess, Tensor};
use super::frames::Frame;
use super::preprocess::input_tensor;
use super::PluginState;

/// Largest model file read into memory.
const MAX_MODEL_BYTES: u64 = 2 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cuda,
    Cpu,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cuda => "cuda",
            Provider::Cpu => "cpu",
        }
    }
}

#[derive(Clone, Debug)]
pub struct InferenceOptions {
    /// Path of `libonnxruntime.so`; `None`: inference unavailable.
    pub library: Option<PathBuf>,
    /// Execution providers to try, in order.
    pub providers: Vec<Provider>,
}

/// The process's inference backend.
pub struct Inference {
    backend: Result<ort::environment::Environment, String>,
    providers: Vec<Provider>,
}

/// ONNX Runtime can be loaded once per process: the first configuration wins.
static INFERENCE: OnceLock<Arc<Inference>> = OnceLock::new();

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inference")
            .field("available", &self.backend.is_ok())
            .field("providers", &self.providers)
            .finish()
    }
}

impl Inference {
    pub fn get_or_init(options: &InferenceOptions) -> Arc<Inference> {
        INFERENCE
            .get_or_init(|| {
                let backend = match &options.library {
                    None => Err("no ONNX Runtime library configured (set [inference] onnxruntime \
                                 or XPUD_ONNXRUNTIME)"
                        .to_string()),
                    Some(path) => ort::init_from(path)
                        .map_err(|e| format!("cannot load {}: {e}", path.display()))
                        .and_then(|builder| {
                            builder
                                .with_name("xpud")
                                .build()
                                .map_err(|e| format!("cannot start ONNX Runtime: {e}"))
                        }),
                };
                match &backend {
                    Ok(_) => tracing::info!(
                        library = %options.library.as_deref().unwrap_or_else(|| "".as_ref()).display(),
                        providers = ?options.providers,
                        "inference: ONNX Runtime loaded"
                    ),
                    Err(reason) => tracing::warn!(
                        "inference unavailable: {reason}; algorithm plugins cannot run models"
                    ),
                }
                Arc::new(Inference {
                    backend,
                    providers: options.providers.clone(),
                })
            })
            .clone()
    }

    pub fn available(&self) -> bool {
        self.backend.is_ok()
    }

    /// A session for `bytes` on the first provider that accepts it.
    fn session(&self, bytes: &[u8]) -> Result<(Session, Provider), InferenceError> {
        let env = self
            .backend
            .as_ref()
            .map_err(|reason| InferenceError::Unavailable(reason.clone()))?;
        let runtime = |e: ort::Error| InferenceError::Runtime(e.to_string());
        let mut refusals = Vec::new();
        for &provider in &self.providers {
            let builder = Session::builder(env).map_err(runtime)?;
            let builder = match provider {
                Provider::Cpu => Ok(builder),
                Provider::Cuda => builder
                    .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
                    .map_err(|e| e.to_string()),
            };
            let mut builder = match builder {
                Ok(builder) => builder,
                Err(reason) => {
                    refusals.push(format!("{}: {reason}", provider.name()));
                    continue;
                }
            };
            match builder.commit_from_memory(bytes) {
                Ok(session) => {
                    if !refusals.is_empty() {
                        tracing::info!(provider = provider.name(), skipped = ?refusals, "inference provider fallback");
                    }
                    return Ok((session, provider));
                }
                Err(e) => return Err(InferenceError::InvalidModel(e.to_string())),
            }
        }
        Err(InferenceError::Unavailable(format!(
            "no execution provider accepted the model: {}",
            refusals.join("; ")
        )))
    }
}

/// A loaded model, owned by the plugin instance that loaded it.
pub struct Model {
    path: String,
    provider: Provider,
    input: String,
    session: Session,
}

impl Host for PluginState {}

impl HostModel for PluginState {
    fn load(&mut self, path: String) -> wasmtime::Result<Result<Resource<Model>, InferenceError>> {
        let Some(assets) = self.assets.clone() else {
            return Ok(Err(InferenceError::ModelNotFound(format!(
                "{path}: the plugin has no package directory"
            ))));
        };
        let bytes = match assets.metadata(&path) {
            Ok(meta) if meta.len() > MAX_MODEL_BYTES => {
                return Ok(Err(InferenceError::InvalidModel(format!(
                    "{path}: {} bytes, above the {MAX_MODEL_BYTES} limit",
                    meta.len()
                ))))
            }
            Ok(_) => match assets.read(&path) {
                Ok(bytes) => bytes,
                Err(e) => return Ok(Err(InferenceError::ModelNotFound(format!("{path}: {e}")))),
            },
            Err(e) => return Ok(Err(InferenceError::ModelNotFound(format!("{path}: {e}")))),
        };
        let (session, provider) = match self.inference.session(&bytes) {
            Ok(found) => found,
            Err(e) => return Ok(Err(e)),
        };
        let Some(input) = session.inputs().first().map(|i| i.name().to_string()) else {
            return Ok(Err(InferenceError::InvalidModel(format!(
                "{path}: the model has no input"
            ))));
        };
        tracing::info!(plugin = &*self.plugin, model = %path, provider = provider.name(), "model loaded");
        let model = Model {
            path,
            provider,
            input,
            session,
        };
        Ok(Ok(self.table().push(model)?))
    }

    fn provider(&mut self, model: Resource<Model>) -> wasmtime::Result<String> {
        Ok(self.table().get(&model)?.provider.name().to_string())
    }

    fn run(
        &mut self,
        model: Resource<Model>,
        input: Resource<Frame>,
        pre: Preprocess,
    ) -> wasmtime::Result<Result<Vec<Tensor>, InferenceError>> {
        let frame = self.table().get(&input)?.clone();
        let budget = self.limiter.limit();
        let model = self.table().get_mut(&model)?;
        Ok(run(model, &frame, &pre, budget))
    }

    fn drop(&mut self, model: Resource<Model>) -> wasmtime::Result<()> {
        self.table().delete(model)?;
        Ok(())
    }
}

/// Runs a model on a frame. `budget` bounds the bytes handed back to the guest,
/// which must fit them in its own memory.
fn run(
    model: &mut Model,
    frame: &Frame,
    pre: &Preprocess,
    budget: usize,
) -> Result<Vec<Tensor>, InferenceError> {
    let input = input_tensor(frame, pre).map_err(InferenceError::InvalidInput)?;
    let runtime = |e: ort::Error| InferenceError::Runtime(format!("{}: {e}", model.path));
    let tensor = ort::value::TensorRef::from_array_view((input.shape, input.data.as_slice()))
        .map_err(runtime)?;
    let outputs = model
        .session
        .run(ort::inputs![model.input.as_str() => tensor])
        .map_err(runtime)?;
    let mut tensors = Vec::new();
    let mut bytes = 0usize;
    for (name, value) in outputs.iter() {
        let (shape, data) = value.try_extract_tensor::<f32>().map_err(|e| {
            InferenceError::InvalidModel(format!(
                "output {name}: {e} (only f32 outputs are supported)"
            ))
        })?;
        bytes += data.len() * 4;
        if bytes > budget / 2 {
            return Err(InferenceError::Runtime(format!(
                "outputs exceed {} bytes, half the plugin's memory limit",
                budget / 2
            )));
        }
        tensors.push(Tensor {
            name: name.to_string(),
            shape: shape.iter().map(|&d| d.max(0) as u32).collect(),
            data: data.to_vec(),
        });
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_library_models_are_unavailable_and_say_why() {
        let inference = Inference {
            backend: Err("no ONNX Runtime library configured".into()),
            providers: vec![Provider::Cuda, Provider::Cpu],
        };
        assert!(!inference.available());
        match inference.session(b"whatever") {
            Err(InferenceError::Unavailable(reason)) => assert!(reason.contains("no ONNX Runtime")),
            other => panic!("{:?}", other.map(|(_, p)| p)),
        }
    }
}
