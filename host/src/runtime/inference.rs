//! `xpu:plugin/inference`: models run natively in ONNX Runtime, never in the guest.
//!
//! The runtime library is loaded once per process from the configured path
//! (`[inference] onnxruntime`, else `XPUD_ONNXRUNTIME`), with one thread pool for
//! every session (sized to the machine, not multiplied by the models loaded). Each
//! model session tries the configured execution providers in order (CUDA, then CPU
//! by default), each told to fail rather than fall back silently, and logs which
//! one runs it. Without a usable library, `load` answers `unavailable` and the host
//! says so once, at start.
//!
//! Model files come from the plugin's package directory through a cap-std `Dir`:
//! a path cannot climb out of it. Sessions are shared and bounded (`models`): what a
//! plugin can make the host spend is limited by `[plugin-limits]`, not only by its
//! own memory cap.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ort::session::{RunOptions, Session};
use sha2::{Digest, Sha256};
use wasmtime::component::Resource;

use super::batching::{split, stack, Batching};
use super::bindings::wit_inference::{Host, HostModel, InferenceError, Layout, Preprocess, Tensor};
use super::frames::Frame;
use super::models::{Backend, Build, ModelCache, Remote, SharedModel, Watchdog};
use super::preprocess::{input_tensor, InputTensor};
use super::worker::{Launcher, Worker, Workers};
use super::PluginState;
use crate::files::{read_open_file, FileError};

/// Pixels a model input of dynamic size may always have, whatever the frame: a crop
/// may be scaled up, but not to more than this or the frame's own size.
const MIN_DYNAMIC_PIXELS: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// NVIDIA TensorRT (engines built per model and card: slow first load).
    Tensorrt,
    Cuda,
    Cpu,
}

impl std::str::FromStr for Provider {
    type Err = String;

    fn from_str(name: &str) -> Result<Provider, String> {
        [Provider::Tensorrt, Provider::Cuda, Provider::Cpu]
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| format!("no execution provider {name:?} (tensorrt, cuda, cpu)"))
    }
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Tensorrt => "tensorrt",
            Provider::Cuda => "cuda",
            Provider::Cpu => "cpu",
        }
    }
}

/// Where an instance's models run: its replica's card, or the CPU. One session per
/// (model, device): instances on different cards never share one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU only (a replica placed without a card, or on a card no execution
    /// provider drives).
    Cpu,
    /// The configured providers, the accelerator ones on this CUDA device (an
    /// ordinal: `cuda` maps cards to them), the CPU where the configuration falls
    /// back to it.
    Card(u32),
    /// A partition whose models run in a worker process of its own (`worker`),
    /// shown only the partition's device. A MIG instance needs one: no process
    /// can use it beside other GPUs. A time slice gets one so that what the
    /// driver measures of that process is the partition's usage.
    Partition(Arc<PartitionDevice>),
}

/// A partition, and its device as its worker process is shown it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PartitionDevice {
    /// The driver plugin that made the partition.
    pub driver: String,
    /// The partition's id, as the host's ledger keeps it.
    pub partition: String,
    /// What `CUDA_VISIBLE_DEVICES` says to the worker: a MIG instance's uuid,
    /// or the card's.
    pub visible: String,
    /// For a time slice, its card's CUDA ordinal in xpud's own process: where no
    /// worker can be started, its models run there, not measured apart.
    pub card_ordinal: Option<u32>,
    /// The partition's memory quota: the most each of the worker's sessions may
    /// hold in its device arena.
    pub memory_quota_mib: Option<u64>,
}

/// `driver/partition`: how figures and logs name a partition.
impl std::fmt::Display for PartitionDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.driver, self.partition)
    }
}

/// The first card: where an instance placed by no scheduler runs (a process with
/// one accelerator).
impl Default for Device {
    fn default() -> Device {
        Device::Card(0)
    }
}

/// As the figures name it: `cpu`, `cuda:N`, or the partition (`driver/partition`).
impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Card(ordinal) => write!(f, "cuda:{ordinal}"),
            Device::Partition(partition) => partition.fmt(f),
        }
    }
}

impl Device {
    /// The device a replica on `card` (driver, index) of `xpu_type` runs models
    /// on: NVIDIA cards are the only ones an execution provider here drives.
    pub fn for_card(card: Option<(&str, u32)>, xpu_type: &str) -> Device {
        match card {
            Some((driver, index)) if Device::drives(xpu_type) => {
                match super::cuda::ordinal(index) {
                    Some(ordinal) => Device::Card(ordinal),
                    None => {
                        tracing::warn!(
                            card = %format!("{driver}/{index}"),
                            "the card is in MIG mode, and this process has no CUDA device \
                             for it: models placed on it outside a MIG instance run on the CPU"
                        );
                        Device::Cpu
                    }
                }
            }
            _ => Device::Cpu,
        }
    }

    /// Whether an execution provider here drives cards of `xpu_type`: NVIDIA's.
    pub fn drives(xpu_type: &str) -> bool {
        xpu_type.to_ascii_uppercase().starts_with("NVIDIA")
    }

    fn ordinal(&self) -> i32 {
        match self {
            Device::Card(ordinal) => *ordinal as i32,
            Device::Cpu | Device::Partition(_) => 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct InferenceOptions {
    /// Path of `libonnxruntime.so`; `None`: inference unavailable.
    pub library: Option<PathBuf>,
    /// Execution providers to try, in order.
    pub providers: Vec<Provider>,
    /// How runs of one model from several instances are batched.
    pub batching: Batching,
    /// The executable that runs inference workers (`xpud`, which has the
    /// `inference-worker` command). `None`: models placed on a partition run in
    /// this process, on a time slice's card or, for a MIG instance, the CPU.
    pub worker: Option<PathBuf>,
}

/// What one model session has done.
pub struct SessionFigures {
    pub model: String,
    pub device: String,
    pub provider: &'static str,
    pub runs: u64,
    pub requests: u64,
    pub latency: crate::plugins::calls::Latency,
}

/// The process's inference backend.
pub struct Inference {
    backend: Result<ort::environment::Environment, String>,
    providers: Vec<Provider>,
    batching: Batching,
    models: Arc<ModelCache>,
    /// How to start a worker process, where one can be.
    launcher: Option<Launcher>,
    workers: Workers,
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
                            let pool = global_thread_pool()
                                .map_err(|e| format!("cannot size ONNX Runtime's thread pool: {e}"))?;
                            builder
                                .with_name("xpud")
                                .with_global_thread_pool(pool)
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
                let launcher = match (&options.worker, &options.library) {
                    (Some(executable), Some(library)) => Some(Launcher {
                        executable: executable.clone(),
                        library: library.clone(),
                        providers: options.providers.clone(),
                    }),
                    _ => None,
                };
                Arc::new(Inference {
                    backend,
                    providers: options.providers.clone(),
                    batching: options.batching,
                    models: Arc::default(),
                    launcher,
                    workers: Workers::default(),
                })
            })
            .clone()
    }

    pub fn available(&self) -> bool {
        self.backend.is_ok()
    }

    /// Model sessions alive in the process.
    pub fn sessions(&self) -> usize {
        self.models.sessions()
    }

    /// The inference workers of the partitions models are placed on.
    pub fn worker_figures(&self) -> Vec<super::worker::WorkerFigures> {
        self.workers.figures()
    }

    /// The process each partition's models run in now, where a worker runs.
    pub fn worker_processes(&self) -> Vec<(Arc<PartitionDevice>, u32)> {
        self.workers.processes()
    }

    /// Each session's model (its hash's first 12 digits), device, provider, runs
    /// and the requests they served.
    pub fn session_figures(&self) -> Vec<SessionFigures> {
        self.models
            .ready()
            .into_iter()
            .map(|(key, model)| {
                let (hash, device) = key.split_once('@').unwrap_or((&key, ""));
                SessionFigures {
                    model: hash.chars().take(12).collect(),
                    device: device.to_string(),
                    provider: model.provider.name(),
                    runs: model.runs.load(Ordering::Relaxed),
                    requests: model.requests.load(Ordering::Relaxed),
                    latency: crate::sync::lock(&model.latency).clone(),
                }
            })
            .collect()
    }

    /// The shared session of the model in `bytes`: built (off the caller's thread)
    /// unless some instance loaded the same model already. Waits until `wait_until`.
    fn model(
        &self,
        bytes: Vec<u8>,
        device: Device,
        wait_until: Instant,
        build_timeout: Duration,
    ) -> Result<Arc<SharedModel>, InferenceError> {
        let env = self
            .backend
            .as_ref()
            .map_err(|reason| InferenceError::Unavailable(reason.clone()))?
            .clone();
        let device = match (device, &self.launcher) {
            (Device::Partition(partition), None) => {
                // Said once: a plugin's every load comes here.
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    tracing::warn!(
                        %partition,
                        "no inference worker can be started (no executable or no library \
                         configured): models placed on a time slice run in this process, \
                         on a MIG instance on the CPU"
                    )
                });
                partition.card_ordinal.map_or(Device::Cpu, Device::Card)
            }
            (device, _) => device,
        };
        // One session per (model, device): instances on other cards have their own.
        let hash = hex::encode(Sha256::digest(&bytes));
        let key = format!("{hash}@{device}");
        let (providers, batching) = (self.providers.clone(), self.batching);
        let worker = match (&device, &self.launcher) {
            (Device::Partition(partition), Some(launcher)) => {
                Some(self.workers.get(launcher, partition))
            }
            _ => None,
        };
        let build = move || -> Build {
            Box::new(move || match worker {
                Some(worker) => worker_model(worker, hash, bytes.into(), batching, build_timeout),
                None => build_model(&env, &providers, &device, &bytes, batching, None),
            })
        };
        self.models
            .get_or_build(&key, build, wait_until, build_timeout)
    }

    /// A session of `bytes` in this process, on the first device its providers
    /// drive, its device arena at most `arena_mib` where given: what an
    /// inference worker holds.
    pub(crate) fn in_process(
        &self,
        bytes: &[u8],
        arena_mib: Option<u64>,
    ) -> Result<SharedModel, InferenceError> {
        let env = self
            .backend
            .as_ref()
            .map_err(|reason| InferenceError::Unavailable(reason.clone()))?;
        build_model(
            env,
            &self.providers,
            &Device::default(),
            bytes,
            self.batching,
            arena_mib,
        )
    }
}

/// A model loaded into `worker`, named there by its hash.
fn worker_model(
    worker: Arc<Worker>,
    key: String,
    bytes: Arc<[u8]>,
    batching: Batching,
    load_timeout: Duration,
) -> Result<SharedModel, InferenceError> {
    // The worker logs the load, with its device and provider.
    let loaded = worker.load(&key, &bytes, Instant::now() + load_timeout)?;
    Ok(SharedModel::new(
        loaded.provider,
        loaded.input,
        loaded.input_shape,
        Backend::Worker(Remote {
            worker,
            key,
            bytes,
            load_timeout,
        }),
        // A worker runs inputs one at a time: nothing to batch here.
        false,
        batching,
    ))
}

/// A session for `bytes`, with what runs need to know of its input and outputs.
fn build_model(
    env: &ort::environment::Environment,
    providers: &[Provider],
    device: &Device,
    bytes: &[u8],
    batching: Batching,
    arena_mib: Option<u64>,
) -> Result<SharedModel, InferenceError> {
    let (session, provider) = session(env, providers, device, bytes, arena_mib)?;
    let shape_of = |outlet: &ort::value::Outlet| match outlet.dtype() {
        ort::value::ValueType::Tensor { shape, .. } => Ok(shape.to_vec()),
        other => Err(InferenceError::InvalidModel(format!(
            "{}: {other:?}, not a tensor",
            outlet.name()
        ))),
    };
    let input = session
        .inputs()
        .first()
        .ok_or_else(|| InferenceError::InvalidModel("the model has no input".into()))?;
    let input_shape = shape_of(input)?;
    let dynamic_first = |shape: &[i64]| shape.first().is_some_and(|d| *d < 0);
    let mut batchable = dynamic_first(&input_shape);
    for output in session.outputs() {
        batchable &= shape_of(output).is_ok_and(|shape| dynamic_first(&shape));
    }
    let input = input.name().to_string();
    Ok(SharedModel::new(
        provider,
        input,
        input_shape,
        Backend::InProcess(Mutex::new(session)),
        batchable,
        batching,
    ))
}

/// One pool of intra-op threads for every session, as many as the machine has
/// cores: without it each session starts a pool of its own.
fn global_thread_pool() -> ort::Result<ort::environment::GlobalThreadPoolOptions> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    ort::environment::GlobalThreadPoolOptions::default()
        .with_intra_threads(cores)?
        .with_inter_threads(1)?
        .with_spin_control(false)
}

/// A session for `bytes` on `device`, by the first provider that accepts it. The
/// CUDA provider's memory arena holds at most `arena_mib` where given (a time
/// slice's quota: the runtime bounds what the ledger admitted); its CUDA context,
/// and TensorRT's engines, are outside it.
fn session(
    env: &ort::environment::Environment,
    providers: &[Provider],
    device: &Device,
    bytes: &[u8],
    arena_mib: Option<u64>,
) -> Result<(Session, Provider), InferenceError> {
    let runtime = |e: ort::Error| InferenceError::Runtime(e.to_string());
    let mut refusals = Vec::new();
    let ordinal = device.ordinal();
    for &provider in providers {
        if *device == Device::Cpu && provider != Provider::Cpu {
            continue;
        }
        let builder = Session::builder(env).map_err(runtime)?;
        let builder = match provider {
            Provider::Cpu => Ok(builder),
            Provider::Cuda => {
                let mut cuda = ort::ep::CUDA::default().with_device_id(ordinal);
                if let Some(mib) = arena_mib {
                    cuda = cuda.with_memory_limit(
                        usize::try_from(mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
                    );
                }
                builder
                    .with_execution_providers([cuda.build().error_on_failure()])
                    .map_err(|e| e.to_string())
            }
            Provider::Tensorrt => builder
                .with_execution_providers([ort::ep::TensorRT::default()
                    .with_device_id(ordinal)
                    .build()
                    .error_on_failure()])
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

/// A model as one plugin instance holds it: its path there, and the shared session.
pub struct Model {
    path: String,
    shared: Arc<SharedModel>,
}

impl Model {
    fn new(path: String, shared: Arc<SharedModel>) -> Model {
        Model { path, shared }
    }
}

impl Host for PluginState {}

impl PluginState {
    /// When the current call must end (its deadline, or now if none is armed).
    fn deadline(&self) -> Instant {
        self.call_deadline.unwrap_or_else(Instant::now)
    }
}

impl HostModel for PluginState {
    fn load(&mut self, path: String) -> wasmtime::Result<Result<Resource<Model>, InferenceError>> {
        let Some(assets) = self.assets.clone() else {
            return Ok(Err(InferenceError::ModelNotFound(format!(
                "{path}: the plugin has no package directory"
            ))));
        };
        let max_models = self.limits.max_models_per_instance;
        if self.models_loaded >= max_models {
            return Ok(Err(InferenceError::Runtime(format!(
                "{path}: this instance holds {max_models} models already, the limit \
                 ([plugin-limits] max-models-per-instance); drop one first"
            ))));
        }
        let max_bytes = self.limits.max_model_bytes;
        let bytes = match assets
            .open(&path)
            .map_err(|e| FileError::Io(path.clone(), e))
            .and_then(|file| read_open_file(file.into_std(), &path, max_bytes))
        {
            Ok(bytes) => bytes,
            Err(FileError::TooLarge(_, size, max)) => {
                return Ok(Err(InferenceError::InvalidModel(format!(
                    "{path}: {size} bytes, above the {max} limit ([plugin-limits] max-model-bytes)"
                ))))
            }
            Err(e) => return Ok(Err(InferenceError::ModelNotFound(e.to_string()))),
        };
        let build_timeout = Duration::from_millis(self.limits.model_load_timeout_ms);
        let shared =
            match self
                .inference
                .model(bytes, self.device.clone(), self.deadline(), build_timeout)
            {
                Ok(shared) => shared,
                Err(e) => return Ok(Err(prefixed(&path, e))),
            };
        tracing::info!(plugin = &*self.plugin, model = %path, provider = shared.provider.name(), "model loaded");
        crate::sync::lock(&self.providers).insert(shared.provider.name());
        self.models_loaded += 1;
        Ok(Ok(self.table().push(Model::new(path, shared))?))
    }

    fn provider(&mut self, model: Resource<Model>) -> wasmtime::Result<String> {
        Ok(self.table().get(&model)?.shared.provider.name().to_string())
    }

    fn run(
        &mut self,
        model: Resource<Model>,
        input: Resource<Frame>,
        pre: Preprocess,
    ) -> wasmtime::Result<Result<Vec<Tensor>, InferenceError>> {
        let frame = self.table().get(&input)?.clone();
        let budget = self.limiter.limit();
        let deadline = self.deadline();
        let model = self.table().get(&model)?;
        Ok(run(model, &frame, &pre, budget, deadline))
    }

    fn drop(&mut self, model: Resource<Model>) -> wasmtime::Result<()> {
        self.table().delete(model)?;
        self.models_loaded = self.models_loaded.saturating_sub(1);
        Ok(())
    }
}

/// A model loaded by the host for its own use, outside any plugin: the baselines
/// the benchmarks compare plugins against. The same shared session, preprocessing
/// and run as a plugin's `model`.
pub struct NativeModel(Model);

impl Inference {
    /// Loads `bytes` (named `name` in errors) for the host's own use: a session of
    /// its own (not the plugins' shared one), batched as `batching` says.
    pub fn load_native(
        &self,
        name: &str,
        bytes: Vec<u8>,
        batching: Batching,
    ) -> Result<NativeModel, InferenceError> {
        let env = self
            .backend
            .as_ref()
            .map_err(|reason| InferenceError::Unavailable(reason.clone()))?;
        let shared = build_model(
            env,
            &self.providers,
            &Device::default(),
            &bytes,
            batching,
            None,
        )?;
        Ok(NativeModel(Model::new(name.to_string(), Arc::new(shared))))
    }

    /// Loads `bytes` (named `name` in errors) as a plugin instance on `device`
    /// would: the session shared with the plugins on that device, in its worker
    /// process where it is a device of its own.
    pub fn load_native_on(
        &self,
        device: Device,
        name: &str,
        bytes: Vec<u8>,
        build_timeout: Duration,
    ) -> Result<NativeModel, InferenceError> {
        let deadline = Instant::now() + build_timeout;
        let shared = self.model(bytes, device, deadline, build_timeout)?;
        Ok(NativeModel(Model::new(name.to_string(), shared)))
    }
}

/// A handle on a native model, for another thread (another stream): runs through
/// any handle may be batched together.
impl Clone for NativeModel {
    fn clone(&self) -> NativeModel {
        NativeModel(Model::new(self.0.path.clone(), self.0.shared.clone()))
    }
}

impl NativeModel {
    /// Session runs so far, and the requests they served (more requests than runs:
    /// batches).
    pub fn runs(&self) -> (u64, u64) {
        let shared = &self.0.shared;
        (
            shared.runs.load(Ordering::Relaxed),
            shared.requests.load(Ordering::Relaxed),
        )
    }

    /// Which execution provider runs it.
    pub fn provider(&self) -> &'static str {
        self.0.shared.provider.name()
    }

    /// The process its session runs in, where that is a worker's.
    pub fn worker_pid(&self) -> Option<u32> {
        match &self.0.shared.backend {
            Backend::Worker(remote) => remote.worker.pid(),
            Backend::InProcess(_) => None,
        }
    }

    /// Runs the model on `frame`, stopped at `deadline`.
    pub fn run(
        &self,
        frame: &Frame,
        pre: &Preprocess,
        deadline: Instant,
    ) -> Result<Vec<Tensor>, InferenceError> {
        run(&self.0, frame, pre, usize::MAX, deadline)
    }
}

/// Names the model file in an error that came from its session.
fn prefixed(path: &str, error: InferenceError) -> InferenceError {
    match error {
        InferenceError::InvalidModel(m) => InferenceError::InvalidModel(format!("{path}: {m}")),
        InferenceError::Runtime(m) => InferenceError::Runtime(format!("{path}: {m}")),
        other => other,
    }
}

/// The input size `pre` asks for, checked against what the model declares and the
/// frame: a static input must be asked for at its size; a dynamic one no larger
/// than the frame (or `MIN_DYNAMIC_PIXELS`). Host memory for the tensor is bounded
/// by the frame, not by what a plugin asks.
fn check_input_size(
    declared: &[i64],
    pre: &Preprocess,
    frame: &Frame,
) -> Result<(), InferenceError> {
    let (h, w) = match (pre.layout, declared) {
        (Layout::Nchw, [_, _, h, w]) | (Layout::Nhwc, [_, h, w, _]) => (*h, *w),
        _ => (-1, -1),
    };
    for (side, asked, name) in [(w, pre.width, "width"), (h, pre.height, "height")] {
        if side > 0 && i64::from(asked) != side {
            return Err(InferenceError::InvalidInput(format!(
                "preprocess {name} {asked}: the model's input is {side}"
            )));
        }
    }
    let asked = u64::from(pre.width) * u64::from(pre.height);
    let frame_pixels = u64::from(frame.width()) * u64::from(frame.height());
    let allowed = frame_pixels.max(MIN_DYNAMIC_PIXELS);
    if (w <= 0 || h <= 0) && asked > allowed {
        return Err(InferenceError::InvalidInput(format!(
            "preprocess size {}x{}: more pixels than the {}x{} frame (or {MIN_DYNAMIC_PIXELS})",
            pre.width,
            pre.height,
            frame.width(),
            frame.height()
        )));
    }
    Ok(())
}

/// Runs a model on a frame, stopped at `deadline`: in a batch with other
/// instances' runs where the model batches. `budget` bounds the bytes handed back
/// to the guest, which must fit them in its own memory.
fn run(
    model: &Model,
    frame: &Frame,
    pre: &Preprocess,
    budget: usize,
    deadline: Instant,
) -> Result<Vec<Tensor>, InferenceError> {
    let shared = &model.shared;
    check_input_size(&shared.input_shape, pre, frame)?;
    let input = input_tensor(frame, pre).map_err(InferenceError::InvalidInput)?;
    if Instant::now() >= deadline {
        return Err(InferenceError::Runtime(format!(
            "{}: the call's deadline passed before the run could start",
            model.path
        )));
    }
    let outputs = match (&shared.backend, &shared.combiner) {
        (Backend::Worker(remote), _) => shared.run_in_worker(remote, &input, deadline),
        (Backend::InProcess(session), Some(combiner)) => combiner.run(
            session,
            shared.batching.max,
            &|session, inputs, deadline| shared.execute(session, inputs, deadline),
            input,
            deadline,
        ),
        (Backend::InProcess(_), None) => shared.run_alone(&input, deadline),
    }
    .map_err(|e| prefixed(&model.path, e))?;
    let bytes: usize = outputs.iter().map(|t| t.data.len() * 4).sum();
    if bytes > budget / 2 {
        return Err(InferenceError::Runtime(format!(
            "{}: outputs exceed {} bytes, half the plugin's memory limit",
            model.path,
            budget / 2
        )));
    }
    Ok(outputs)
}

/// Largest output a run may produce, all outputs together: bounds what one run
/// makes the host allocate, whatever the model (the guest's own limit is checked
/// on its share afterwards).
const MAX_OUTPUT_BYTES: usize = 256 << 20;

impl SharedModel {
    /// Runs the model in this process on `input` alone.
    pub(crate) fn run_alone(
        &self,
        input: &InputTensor,
        deadline: Instant,
    ) -> Result<Vec<Tensor>, InferenceError> {
        self.run_view(input.shape, &input.data, deadline)
    }

    /// Runs the model in this process on `data` of `shape` as it lies (a worker's
    /// input in the region it shares with the host).
    pub(crate) fn run_view(
        &self,
        shape: [i64; 4],
        data: &[f32],
        deadline: Instant,
    ) -> Result<Vec<Tensor>, InferenceError> {
        let Backend::InProcess(session) = &self.backend else {
            return Err(InferenceError::Runtime(
                "the model's session is in a worker process".into(),
            ));
        };
        let mut session = crate::sync::lock(session);
        self.execute_stacked(&mut session, shape, data, 1, deadline)
            .map(|mut per_input| per_input.swap_remove(0))
    }

    /// Runs the model in its device's worker process, counted as a run here.
    fn run_in_worker(
        &self,
        remote: &Remote,
        input: &InputTensor,
        deadline: Instant,
    ) -> Result<Vec<Tensor>, InferenceError> {
        let started = Instant::now();
        let outputs = remote.worker.run(
            &remote.key,
            &remote.bytes,
            remote.load_timeout,
            input,
            deadline,
        )?;
        crate::sync::lock(&self.latency).observe(started.elapsed());
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        Ok(outputs)
    }

    /// Runs `session` (this model's, locked by the caller: another run of it ends
    /// at its own deadline at most) once on `inputs` stacked along the first dimension,
    /// stopped a tenth before `deadline` (so that callers get the error back with
    /// time to spare instead of trapping at their epoch deadline); each input's
    /// outputs.
    pub(super) fn execute(
        &self,
        session: &mut Session,
        inputs: &[&InputTensor],
        deadline: Instant,
    ) -> Result<Vec<Vec<Tensor>>, InferenceError> {
        let stacked;
        let (shape, data) = match inputs {
            [one] => (one.shape, one.data.as_slice()),
            _ => {
                stacked = stack(inputs);
                (stacked.0, stacked.1.as_slice())
            }
        };
        self.execute_stacked(session, shape, data, inputs.len(), deadline)
    }

    /// Runs `session` once on `count` inputs stacked in `data` (of `shape`); each
    /// input's outputs.
    fn execute_stacked(
        &self,
        session: &mut Session,
        shape: [i64; 4],
        data: &[f32],
        count: usize,
        deadline: Instant,
    ) -> Result<Vec<Vec<Tensor>>, InferenceError> {
        let runtime = |e: ort::Error| InferenceError::Runtime(e.to_string());
        let tensor = ort::value::TensorRef::from_array_view((shape, data)).map_err(runtime)?;
        let options = Arc::new(RunOptions::new().map_err(runtime)?);
        let now = Instant::now();
        let stop_at = now + deadline.saturating_duration_since(now).mul_f32(0.9);
        let _armed = Watchdog::arm(stop_at, options.clone());
        let started = Instant::now();
        let outputs = session
            .run_with_options(ort::inputs![self.input.as_str() => tensor], &*options)
            .map_err(|e| {
                if Instant::now() >= stop_at {
                    InferenceError::Runtime(format!("stopped at the call's deadline ({e})"))
                } else {
                    runtime(e)
                }
            })?;
        crate::sync::lock(&self.latency).observe(started.elapsed());
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(count as u64, Ordering::Relaxed);
        let mut per_input: Vec<Vec<Tensor>> = (0..count).map(|_| Vec::new()).collect();
        let mut bytes = 0usize;
        for (name, value) in outputs.iter() {
            let (shape, data) = value.try_extract_tensor::<f32>().map_err(|e| {
                InferenceError::InvalidModel(format!(
                    "output {name}: {e} (only f32 outputs are supported)"
                ))
            })?;
            bytes += data.len() * 4;
            if bytes > MAX_OUTPUT_BYTES {
                return Err(InferenceError::Runtime(format!(
                    "outputs exceed {MAX_OUTPUT_BYTES} bytes"
                )));
            }
            if let [only] = per_input.as_mut_slice() {
                only.push(Tensor {
                    name: name.to_string(),
                    shape: shape.iter().map(|&d| d.max(0) as u32).collect(),
                    data: data.to_vec(),
                });
            } else {
                for (part, outputs) in split(name, shape, data, count)?
                    .into_iter()
                    .zip(per_input.iter_mut())
                {
                    outputs.push(part);
                }
            }
        }
        Ok(per_input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_run_on_the_replicas_nvidia_card_and_on_the_cpu_otherwise() {
        assert_eq!(
            Device::for_card(Some(("nvidia", 3)), "NVIDIA_T4"),
            Device::Card(3)
        );
        assert_eq!(Device::for_card(None, "CPU"), Device::Cpu);
        // No execution provider here drives another vendor's card.
        assert_eq!(
            Device::for_card(Some(("sim-xpu", 0)), "SIM_X1"),
            Device::Cpu
        );
    }

    #[test]
    fn without_a_library_models_are_unavailable_and_say_why() {
        let inference = Inference {
            backend: Err("no ONNX Runtime library configured".into()),
            providers: vec![Provider::Cuda, Provider::Cpu],
            batching: Batching::default(),
            models: Arc::default(),
            launcher: None,
            workers: Workers::default(),
        };
        assert!(!inference.available());
        let soon = Instant::now() + Duration::from_secs(1);
        match inference.model(
            b"whatever".to_vec(),
            Device::Cpu,
            soon,
            Duration::from_secs(1),
        ) {
            Err(InferenceError::Unavailable(reason)) => assert!(reason.contains("no ONNX Runtime")),
            other => panic!("{:?}", other.map(|m| m.provider)),
        }
    }
}
