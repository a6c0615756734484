//! Inference worker processes: the models placed on a partition whose driver names
//! its device run in a process that sees only that device.
//!
//! CUDA lets a process use one MIG device, and no other GPU beside it, so xpud's
//! own process cannot run models on MIG instances. A time slice of a card gets a
//! process too, as a Kubernetes pod on a time-sliced GPU does: NVML measures usage
//! per process, so the process's figures are the partition's (the sampler tells
//! the driver its pid). The price is a CUDA context per partition, and no batching
//! across partitions. Each worker (`xpud inference-worker`, started with
//! `CUDA_VISIBLE_DEVICES` naming the device) holds the sessions of the models
//! placed there, the way Triton runs one server per MIG instance. Frames never
//! leave the host: preprocessing happens here, and only the model's input tensor
//! crosses, with the outputs coming back, through a memory region both map
//! (`shm`); requests and answers go over a socket pair.
//!
//! A worker lives as long as a model placed on its partition does. One that exits or
//! stops answering is killed, and started again on the next run after a backoff
//! (doubling to `MAX_BACKOFF`); its models are loaded into it again from the bytes
//! the host keeps. What crosses is bounded both ways (`MAX_PAYLOAD`).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::bindings::wit_inference::{InferenceError, Tensor};
use super::inference::{PartitionDevice, Provider};
use super::preprocess::InputTensor;
use super::shm::Region;
use crate::sync::lock;

/// Largest model, input or outputs one message may carry, and the largest the
/// shared region grows.
const MAX_PAYLOAD: u64 = 1 << 30;
/// Largest message header (names and shapes).
const MAX_HEADER: u32 = 1 << 20;
/// How long past a run's deadline the host waits for the worker's answer: the
/// worker stops the run itself a tenth before the deadline.
const GRACE: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the host asks a worker, each followed by its payload.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Build a session of the model in the payload, known from then on as `key`.
    Load { key: String },
    /// Run model `key` on the input tensor at the start of the shared region,
    /// which is `region` bytes long now.
    Run {
        key: String,
        shape: [i64; 4],
        timeout_ms: u64,
        region: u64,
    },
}

/// A worker's answer, with its payload (the outputs' data, in order, for `Outputs`).
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Loaded {
        provider: Provider,
        input: String,
        input_shape: Vec<i64>,
    },
    Outputs {
        /// (name, shape, values) of each output.
        tensors: Vec<(String, Vec<u32>, u64)>,
        /// Their values are in the shared region, one after the other from its
        /// start; else, where they did not fit, in the payload (f32, little-endian).
        in_region: bool,
    },
    Failed(WireError),
}

/// `InferenceError`, as it crosses.
#[derive(Debug, Serialize, Deserialize)]
pub enum WireError {
    ModelNotFound(String),
    InvalidModel(String),
    InvalidInput(String),
    Unavailable(String),
    Runtime(String),
}

impl From<InferenceError> for WireError {
    fn from(e: InferenceError) -> WireError {
        match e {
            InferenceError::ModelNotFound(m) => WireError::ModelNotFound(m),
            InferenceError::InvalidModel(m) => WireError::InvalidModel(m),
            InferenceError::InvalidInput(m) => WireError::InvalidInput(m),
            InferenceError::Unavailable(m) => WireError::Unavailable(m),
            InferenceError::Runtime(m) => WireError::Runtime(m),
        }
    }
}

impl From<WireError> for InferenceError {
    fn from(e: WireError) -> InferenceError {
        match e {
            WireError::ModelNotFound(m) => InferenceError::ModelNotFound(m),
            WireError::InvalidModel(m) => InferenceError::InvalidModel(m),
            WireError::InvalidInput(m) => InferenceError::InvalidInput(m),
            WireError::Unavailable(m) => InferenceError::Unavailable(m),
            WireError::Runtime(m) => InferenceError::Runtime(m),
        }
    }
}

/// One message: the header's length (u32) and JSON, the payload's length (u64) and
/// bytes, little-endian.
pub fn write_message(
    w: &mut impl Write,
    header: &impl Serialize,
    payload: &[u8],
) -> std::io::Result<()> {
    let header = serde_json::to_vec(header)?;
    w.write_all(&(header.len() as u32).to_le_bytes())?;
    w.write_all(&header)?;
    w.write_all(&(payload.len() as u64).to_le_bytes())?;
    w.write_all(payload)?;
    w.flush()
}

/// Reads one message written by `write_message`; a length past the bounds is an
/// error, not an allocation.
pub fn read_message<H: for<'de> Deserialize<'de>>(
    r: &mut impl Read,
) -> std::io::Result<(H, Vec<u8>)> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(invalid(format!("a {len}-byte header, above {MAX_HEADER}")));
    }
    let mut header = vec![0; len as usize];
    r.read_exact(&mut header)?;
    let header = serde_json::from_slice(&header).map_err(|e| invalid(e.to_string()))?;
    let mut len = [0u8; 8];
    r.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(invalid(format!(
            "a {len}-byte payload, above {MAX_PAYLOAD}"
        )));
    }
    let mut payload = vec![0; len as usize];
    r.read_exact(&mut payload)?;
    Ok((header, payload))
}

/// `values` as little-endian bytes: one allocation, a loop the compiler turns into
/// a copy (an iterator of `flat_map`ped arrays costs 2 ms a megabyte).
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for value in values {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes
}

pub fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// How workers are started: this executable (`xpud`), the ONNX Runtime library and
/// the providers to try, as the host's own sessions have them.
#[derive(Clone, Debug)]
pub struct Launcher {
    pub executable: PathBuf,
    pub library: PathBuf,
    pub providers: Vec<Provider>,
}

impl Launcher {
    /// A worker for `device`, given the region tensors cross through.
    fn spawn(&self, device: &PartitionDevice) -> std::io::Result<Running> {
        let (ours, theirs) = UnixStream::pair()?;
        let region = Region::create()?;
        let providers: Vec<&str> = self.providers.iter().map(|p| p.name()).collect();
        let mut command = Command::new(&self.executable);
        command
            .arg("inference-worker")
            .arg("--onnxruntime")
            .arg(&self.library)
            .arg("--providers")
            .arg(providers.join(","));
        if let Some(quota) = device.memory_quota_mib {
            command.arg("--memory-quota-mib").arg(quota.to_string());
        }
        let child = command
            .env("CUDA_VISIBLE_DEVICES", &device.visible)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        crate::children::prefer_for_oom_kill(child.id(), crate::children::WORKER_OOM_SCORE);
        let running = Running {
            child,
            socket: ours,
            region,
            loaded: HashSet::new(),
        };
        // Failing, the worker is killed as `running` drops.
        running.region.send(&running.socket)?;
        Ok(running)
    }
}

/// The workers alive, one per partition, shared by the models placed on it.
#[derive(Default)]
pub struct Workers {
    by_partition: Mutex<HashMap<Arc<PartitionDevice>, Weak<Worker>>>,
}

/// What one partition's worker has been through, for `/metrics`.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerFigures {
    /// `driver/partition`.
    pub partition: String,
    /// The device the worker is shown.
    pub device: String,
    /// A worker process runs now.
    pub up: bool,
    /// Processes started for the device, the first one included.
    pub starts: u64,
    /// Starts that failed, and workers that exited or stopped answering.
    pub failures: u64,
}

impl Workers {
    fn alive(&self) -> Vec<Arc<Worker>> {
        lock(&self.by_partition)
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Each partition's worker, while a model placed on it is loaded.
    pub fn figures(&self) -> Vec<WorkerFigures> {
        let mut figures: Vec<WorkerFigures> = self
            .alive()
            .iter()
            .map(|worker| {
                let seen = *lock(&worker.seen);
                WorkerFigures {
                    partition: worker.device.to_string(),
                    device: worker.device.visible.clone(),
                    up: seen.pid.is_some(),
                    starts: seen.starts,
                    failures: seen.failures,
                }
            })
            .collect();
        figures.sort_by(|a, b| a.partition.cmp(&b.partition));
        figures
    }

    /// The process each partition's work runs in now, where one runs.
    pub fn processes(&self) -> Vec<(Arc<PartitionDevice>, u32)> {
        self.alive()
            .into_iter()
            .filter_map(|worker| Some((worker.device.clone(), worker.pid()?)))
            .collect()
    }

    /// The worker of `device`, started on its first run.
    pub fn get(&self, launcher: &Launcher, device: &Arc<PartitionDevice>) -> Arc<Worker> {
        let mut by_partition = lock(&self.by_partition);
        by_partition.retain(|_, worker| worker.strong_count() > 0);
        if let Some(worker) = by_partition.get(device).and_then(Weak::upgrade) {
            return worker;
        }
        let worker = Arc::new(Worker {
            device: device.clone(),
            launcher: launcher.clone(),
            state: Mutex::new(State::default()),
            seen: Mutex::default(),
        });
        by_partition.insert(device.clone(), Arc::downgrade(&worker));
        worker
    }
}

/// One partition's worker process.
pub struct Worker {
    device: Arc<PartitionDevice>,
    launcher: Launcher,
    /// Held for a whole exchange with the process (a model load may take a
    /// minute): nothing that only looks takes it.
    state: Mutex<State>,
    /// What scrapes and the sampler read, kept apart from `state`.
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct State {
    running: Option<Running>,
    /// Failures in a row, for the backoff; none since the last good answer.
    failures: u32,
    retry_at: Option<Instant>,
}

/// The process running now, and what the worker has been through.
#[derive(Clone, Copy, Default)]
struct Seen {
    pid: Option<u32>,
    /// Processes started, the first one included.
    starts: u64,
    /// Starts that failed, and processes that exited or stopped answering.
    failures: u64,
}

struct Running {
    child: Child,
    socket: UnixStream,
    /// Where tensors cross.
    region: Region,
    /// Models loaded in this process.
    loaded: HashSet<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a worker said about a model it loaded.
pub struct Loaded {
    pub provider: Provider,
    pub input: String,
    pub input_shape: Vec<i64>,
}

impl Worker {
    /// The worker's process id, while one runs.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.seen).pid
    }

    /// Loads `bytes` as `key` into the worker, starting it if needed.
    pub fn load(
        &self,
        key: &str,
        bytes: &[u8],
        deadline: Instant,
    ) -> Result<Loaded, InferenceError> {
        let mut state = lock(&self.state);
        let running = self.running(&mut state)?;
        running.loaded.remove(key);
        match self.exchange(
            &mut state,
            &Request::Load { key: key.into() },
            bytes,
            deadline,
        )? {
            (
                Response::Loaded {
                    provider,
                    input,
                    input_shape,
                },
                _,
            ) => {
                if let Some(running) = state.running.as_mut() {
                    running.loaded.insert(key.to_string());
                }
                Ok(Loaded {
                    provider,
                    input,
                    input_shape,
                })
            }
            (Response::Failed(e), _) => Err(e.into()),
            (other, _) => Err(self.broken(&mut state, format!("answered a load with {other:?}"))),
        }
    }

    /// Runs model `key` on `input`, stopped at `deadline`. A worker started again
    /// has lost its models: this one is loaded into it first from `bytes`, given
    /// `load_timeout` as its first load was (a run right after a restart waits for
    /// it).
    pub fn run(
        &self,
        key: &str,
        bytes: &[u8],
        load_timeout: Duration,
        input: &InputTensor,
        deadline: Instant,
    ) -> Result<Vec<Tensor>, InferenceError> {
        let mut state = lock(&self.state);
        if !self.running(&mut state)?.loaded.contains(key) {
            drop(state);
            self.load(key, bytes, Instant::now() + load_timeout)?;
            state = lock(&self.state);
        }
        let timeout = deadline.saturating_duration_since(Instant::now());
        let region = {
            let running = self.running(&mut state)?;
            let put = grow_within_bounds(&mut running.region, input.data.len())
                .and_then(|()| running.region.write(0, &input.data));
            if let Err(e) = put {
                return Err(InferenceError::Runtime(format!(
                    "the input does not cross to the inference worker for {}: {e}",
                    self.device
                )));
            }
            running.region.len() as u64
        };
        let request = Request::Run {
            key: key.into(),
            shape: input.shape,
            timeout_ms: timeout.as_millis() as u64,
            region,
        };
        match self.exchange(&mut state, &request, &[], deadline)? {
            (Response::Outputs { tensors, in_region }, payload) => {
                let outputs = match state.running.as_mut() {
                    Some(running) => {
                        receive_outputs(&mut running.region, tensors, in_region, &payload)
                    }
                    None => Err("is gone".to_string()),
                };
                outputs.map_err(|why| self.broken(&mut state, why))
            }
            (Response::Failed(e), _) => Err(e.into()),
            (other, _) => Err(self.broken(&mut state, format!("answered a run with {other:?}"))),
        }
    }

    /// The running process, started if there is none and the backoff has passed.
    fn running<'a>(&self, state: &'a mut State) -> Result<&'a mut Running, InferenceError> {
        if state.running.is_none() {
            if let Some(at) = state.retry_at {
                let now = Instant::now();
                if now < at {
                    return Err(InferenceError::Runtime(format!(
                        "the inference worker for {} failed; it starts again in {} ms",
                        self.device,
                        (at - now).as_millis()
                    )));
                }
            }
            lock(&self.seen).starts += 1;
            match self.launcher.spawn(&self.device) {
                Ok(running) => {
                    let pid = running.child.id();
                    tracing::info!(partition = %self.device, device = %self.device.visible, pid, "inference worker started");
                    lock(&self.seen).pid = Some(pid);
                    state.running = Some(running);
                }
                Err(e) => {
                    let reason = format!(
                        "cannot start the inference worker ({}) for {}: {e}",
                        self.launcher.executable.display(),
                        self.device
                    );
                    return Err(self.failed(state, reason));
                }
            }
        }
        Ok(state.running.as_mut().expect("started above"))
    }

    /// Sends `request` and waits for the answer until `deadline` (and `GRACE`).
    fn exchange(
        &self,
        state: &mut State,
        request: &Request,
        payload: &[u8],
        deadline: Instant,
    ) -> Result<(Response, Vec<u8>), InferenceError> {
        let running = self.running(state)?;
        let wait = deadline.saturating_duration_since(Instant::now()) + GRACE;
        let socket = &mut running.socket;
        let answer = socket
            .set_read_timeout(Some(wait))
            .and_then(|()| write_message(socket, request, payload))
            .and_then(|()| read_message::<Response>(socket));
        match answer {
            Ok(answer) => {
                state.failures = 0;
                Ok(answer)
            }
            Err(e) => {
                let why = match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        format!("did not answer within {} ms", wait.as_millis())
                    }
                    _ => e.to_string(),
                };
                Err(self.broken(state, why))
            }
        }
    }

    /// The worker broke its side: it is killed, and started again later.
    fn broken(&self, state: &mut State, why: String) -> InferenceError {
        let exited = state.running.as_mut().and_then(|r| {
            let _ = r.child.kill();
            r.child.wait().ok()
        });
        let reason = match exited {
            Some(status) if !status.success() => format!(
                "the inference worker for {} {why} and was stopped ({status})",
                self.device
            ),
            _ => format!(
                "the inference worker for {} {why} and was stopped",
                self.device
            ),
        };
        self.failed(state, reason)
    }

    fn failed(&self, state: &mut State, reason: String) -> InferenceError {
        state.running = None;
        state.failures += 1;
        {
            let mut seen = lock(&self.seen);
            seen.pid = None;
            seen.failures += 1;
        }
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (state.failures - 1).min(16))
            .min(MAX_BACKOFF);
        state.retry_at = Some(Instant::now() + backoff);
        tracing::warn!(partition = %self.device, backoff_ms = backoff.as_millis() as u64, "{reason}");
        InferenceError::Runtime(reason)
    }
}

/// Grows `region` to hold `values` floats, up to `MAX_PAYLOAD`.
fn grow_within_bounds(region: &mut Region, values: usize) -> std::io::Result<()> {
    match values.checked_mul(4).filter(|&n| n as u64 <= MAX_PAYLOAD) {
        Some(bytes) => region.grow(bytes),
        None => Err(std::io::Error::other(format!(
            "{values} values are past the {MAX_PAYLOAD}-byte bound"
        ))),
    }
}

/// The outputs a worker announced, from the region or, where they did not fit,
/// the payload: then the region grows to hold them the next time. An
/// announcement the data does not match is the worker's fault (the reason).
fn receive_outputs(
    region: &mut Region,
    tensors: Vec<(String, Vec<u32>, u64)>,
    in_region: bool,
    payload: &[u8],
) -> Result<Vec<Tensor>, String> {
    let total = tensors
        .iter()
        .try_fold(0usize, |n, t| n.checked_add(usize::try_from(t.2).ok()?))
        .ok_or("announced more output values than there can be")?;
    let inline = (!in_region).then(|| f32_values(payload));
    if inline.as_ref().is_some_and(|v| v.len() != total) {
        return Err("sent other output values than it announced".into());
    }
    let mut outputs = Vec::with_capacity(tensors.len());
    let mut at = 0;
    for (name, shape, len) in tensors {
        let len = len as usize;
        let data = match &inline {
            Some(values) => values[at..at + len].to_vec(),
            None => region
                .read(at, len)
                .map_err(|e| format!("announced outputs past its region: {e}"))?,
        };
        at += len;
        outputs.push(Tensor { name, shape, data });
    }
    if inline.is_some() {
        // Not fatal: the next answer comes inline again.
        if let Err(e) = grow_within_bounds(region, total) {
            tracing::debug!("the region stays as it is: {e}");
        }
    }
    Ok(outputs)
}

/// The worker's side (`xpud inference-worker`): answers the host's requests on the
/// socket it was given as standard input until the host closes it. Its sessions
/// run on the first device its providers drive: the one `CUDA_VISIBLE_DEVICES`
/// leaves it, each session's device arena at most `memory_quota_mib`.
pub fn serve(
    library: PathBuf,
    providers: Vec<Provider>,
    memory_quota_mib: Option<u64>,
) -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    let socket = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    // The host's first message: where tensors cross.
    let mut region = Region::receive(&socket)?;
    let inference = super::inference::Inference::get_or_init(&super::inference::InferenceOptions {
        library: Some(library),
        providers,
        batching: super::batching::Batching {
            max: 1,
            on_cpu: false,
        },
        worker: None,
    });
    if !inference.available() {
        anyhow::bail!("ONNX Runtime did not load (the log says why)");
    }
    let device = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
    tracing::info!(device = %device, "inference worker ready");
    let mut models = HashMap::new();
    let mut reader = socket.try_clone()?;
    let mut writer = socket;
    loop {
        let (request, payload) = match read_message::<Request>(&mut reader) {
            Ok(message) => message,
            // The host closed its end: it no longer needs this worker.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let (response, out) = match request {
            Request::Load { key } => match inference.in_process(&payload, memory_quota_mib) {
                Ok(model) => {
                    tracing::info!(device = %device, provider = model.provider.name(), "model loaded");
                    let loaded = Response::Loaded {
                        provider: model.provider,
                        input: model.input.clone(),
                        input_shape: model.input_shape.clone(),
                    };
                    models.insert(key, model);
                    (loaded, Vec::new())
                }
                Err(e) => (Response::Failed(e.into()), Vec::new()),
            },
            Request::Run {
                key,
                shape,
                timeout_ms,
                region: len,
            } => {
                let deadline = Instant::now() + Duration::from_millis(timeout_ms);
                match run(&models, &key, shape, &mut region, len, deadline) {
                    Ok(outputs) => send_outputs(&mut region, &outputs),
                    Err(e) => (Response::Failed(e.into()), Vec::new()),
                }
            }
        };
        write_message(&mut writer, &response, &out)?;
    }
}

/// One run in the worker on the input at the start of `region` (`len` bytes long
/// now), checked against its shape.
fn run(
    models: &HashMap<String, super::models::SharedModel>,
    key: &str,
    shape: [i64; 4],
    region: &mut Region,
    len: u64,
    deadline: Instant,
) -> Result<Vec<Tensor>, InferenceError> {
    let model = models.get(key).ok_or_else(|| {
        InferenceError::Runtime(format!("model {key} is not loaded in this worker"))
    })?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&n| n as u64 <= MAX_PAYLOAD)
        .ok_or_else(|| InferenceError::InvalidInput(format!("a region of {len} bytes")))?;
    region
        .map(len)
        .map_err(|e| InferenceError::Runtime(format!("cannot map the shared region: {e}")))?;
    let values = shape
        .iter()
        .try_fold(1usize, |n, &d| {
            usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
        })
        .ok_or_else(|| InferenceError::InvalidInput(format!("the shape {shape:?}")))?;
    let data = region.view(0, values).map_err(|e| {
        InferenceError::InvalidInput(format!("an input of the shape {shape:?}: {e}"))
    })?;
    model.run_view(shape, data, deadline)
}

/// The answer carrying `outputs`: their values in the region, one after the
/// other from its start (the input is no longer needed), or in the payload where
/// they do not fit.
fn send_outputs(region: &mut Region, outputs: &[Tensor]) -> (Response, Vec<u8>) {
    let tensors = outputs
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone(), t.data.len() as u64))
        .collect();
    let mut at = 0;
    let mut in_region = true;
    for tensor in outputs {
        if region.write(at, &tensor.data).is_err() {
            in_region = false;
            break;
        }
        at += tensor.data.len();
    }
    let mut payload = Vec::new();
    if !in_region {
        payload.reserve(outputs.iter().map(|t| t.data.len() * 4).sum());
        for tensor in outputs {
            payload.extend_from_slice(&f32_bytes(&tensor.data));
        }
    }
    (Response::Outputs { tensors, in_region }, payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mig(visible: &str) -> Arc<PartitionDevice> {
        Arc::new(PartitionDevice {
            driver: "nvidia".into(),
            partition: "mig-1-1".into(),
            visible: visible.into(),
            card_ordinal: None,
            memory_quota_mib: None,
        })
    }

    #[test]
    fn a_message_crosses_whole_and_a_length_past_the_bounds_is_refused() {
        let mut wire = Vec::new();
        let request = Request::Run {
            key: "abc".into(),
            shape: [1, 3, 2, 2],
            timeout_ms: 250,
            region: 1 << 20,
        };
        let values: Vec<f32> = (0..12).map(|i| i as f32 / 3.0).collect();
        write_message(&mut wire, &request, &f32_bytes(&values)).unwrap();
        let (read, payload) = read_message::<Request>(&mut wire.as_slice()).unwrap();
        assert!(matches!(
            read,
            Request::Run { key, shape: [1, 3, 2, 2], timeout_ms: 250, region: 1048576 }
                if key == "abc"
        ));
        assert_eq!(f32_values(&payload), values);

        // A header or payload length no sender of ours writes: refused before
        // anything is allocated for it.
        let huge_header = (MAX_HEADER + 1).to_le_bytes();
        let e = read_message::<Request>(&mut huge_header.as_slice()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        let mut huge_payload = Vec::new();
        let header = serde_json::to_vec(&request).unwrap();
        huge_payload.extend((header.len() as u32).to_le_bytes());
        huge_payload.extend(&header);
        huge_payload.extend((MAX_PAYLOAD + 1).to_le_bytes());
        let e = read_message::<Request>(&mut huge_payload.as_slice()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        // Cut short: an error, not a hang or a partial message.
        let e = read_message::<Request>(&mut &wire[..wire.len() - 1]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    /// Outputs cross in the region where they fit, else inline, after which the
    /// region has grown to hold them; an announcement the data does not bear out
    /// is refused.
    #[test]
    fn outputs_cross_in_the_region_or_inline_once_then_in_the_region() {
        let (host_end, worker_end) = UnixStream::pair().unwrap();
        let mut host = Region::create().unwrap();
        host.send(&host_end).unwrap();
        let mut worker = Region::receive(&worker_end).unwrap();
        host.grow(1).unwrap();
        worker.map(host.len()).unwrap();
        let same = |got: Vec<Tensor>, want: &[Tensor]| {
            let key = |t: &Tensor| (t.name.clone(), t.shape.clone(), t.data.clone());
            assert_eq!(
                got.iter().map(key).collect::<Vec<_>>(),
                want.iter().map(key).collect::<Vec<_>>()
            );
        };
        let tensor = |name: &str, len: usize| Tensor {
            name: name.into(),
            shape: vec![len as u32],
            data: (0..len).map(|i| i as f32).collect(),
        };
        let small = [tensor("boxes", 10), tensor("scores", 5)];
        let (Response::Outputs { tensors, in_region }, payload) = send_outputs(&mut worker, &small)
        else {
            panic!("not outputs");
        };
        assert!(in_region && payload.is_empty());
        same(
            receive_outputs(&mut host, tensors, in_region, &payload).unwrap(),
            &small,
        );

        let big = [tensor("map", host.len() / 4 + 1)];
        let (Response::Outputs { tensors, in_region }, payload) = send_outputs(&mut worker, &big)
        else {
            panic!("not outputs");
        };
        assert!(!in_region);
        let announced = tensors.clone();
        same(
            receive_outputs(&mut host, tensors, in_region, &payload).unwrap(),
            &big,
        );
        assert!(
            host.len() >= big[0].data.len() * 4,
            "grown for the next time"
        );
        worker.map(host.len()).unwrap();
        let (Response::Outputs { in_region, .. }, _) = send_outputs(&mut worker, &big) else {
            panic!("not outputs");
        };
        assert!(in_region);

        // More values announced than sent, or than the region holds.
        assert!(receive_outputs(&mut host, announced.clone(), false, &payload[4..]).is_err());
        let past = vec![("map".to_string(), vec![1], (host.len() / 4 + 1) as u64)];
        assert!(receive_outputs(&mut host, past, true, &[]).is_err());
        let overflow = vec![
            ("a".to_string(), vec![1], u64::MAX),
            ("b".to_string(), vec![1], u64::MAX),
        ];
        assert!(receive_outputs(&mut host, overflow, true, &[]).is_err());
    }

    #[test]
    fn a_worker_that_cannot_start_fails_the_run_and_backs_off() {
        let workers = Workers::default();
        let worker = workers.get(
            &Launcher {
                executable: "/nonexistent/xpud".into(),
                library: "/nonexistent/libonnxruntime.so".into(),
                providers: vec![Provider::Cpu],
            },
            &mig("MIG-none"),
        );
        let soon = Instant::now() + Duration::from_secs(5);
        let Err(InferenceError::Runtime(why)) = worker.load("m", b"model", soon) else {
            panic!("started a worker from nothing");
        };
        assert!(why.contains("cannot start the inference worker"), "{why}");
        let Err(InferenceError::Runtime(why)) = worker.load("m", b"model", soon) else {
            panic!("started a worker from nothing");
        };
        assert!(why.contains("starts again in"), "{why}");
        assert_eq!(worker.pid(), None);
        assert_eq!(
            workers.figures(),
            [WorkerFigures {
                partition: "nvidia/mig-1-1".into(),
                device: "MIG-none".into(),
                up: false,
                starts: 1,
                failures: 1,
            }]
        );
        drop(worker);
        assert_eq!(workers.figures(), [], "gone with its last model");
    }

    #[test]
    fn a_worker_that_stops_answering_is_killed_past_the_deadline() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let hung = dir.path().join("hung-worker");
        std::fs::write(&hung, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&hung, std::fs::Permissions::from_mode(0o755)).unwrap();
        let workers = Workers::default();
        let worker = workers.get(
            &Launcher {
                executable: hung,
                library: "/nonexistent/libonnxruntime.so".into(),
                providers: vec![Provider::Cpu],
            },
            &mig("MIG-hung"),
        );
        let started = Instant::now();
        let deadline = started + Duration::from_millis(100);
        let waiting = {
            let worker = worker.clone();
            std::thread::spawn(move || worker.load("m", b"model", deadline))
        };
        // While the load waits on the process (its deadline and the grace), what
        // a scrape or the sampler reads answers at once.
        std::thread::sleep(Duration::from_millis(300));
        let looked = Instant::now();
        let (figures, pid) = (workers.figures(), worker.pid());
        assert!(looked.elapsed() < Duration::from_millis(200));
        assert!(figures[0].up && pid.is_some(), "{figures:?}");
        let Err(InferenceError::Runtime(why)) = waiting.join().unwrap() else {
            panic!("a hung worker answered");
        };
        assert!(why.contains("did not answer within"), "{why}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Killed, not left behind.
        assert_eq!(worker.pid(), None);
    }
}
