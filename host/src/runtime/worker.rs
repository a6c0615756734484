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
//! crosses, over a socket pair, with the outputs coming back.
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
use crate::sync::lock;

/// Largest model, input or outputs one message may carry.
const MAX_PAYLOAD: u64 = 1 << 30;
/// Bytes each end of the socket buffers: a 512x288 input tensor (1.8 MB) in one
/// write instead of a wake-up of each side per 200 KiB, the default. The kernel
/// caps it at `net.core.wmem_max`/`rmem_max`.
const SOCKET_BUFFER: usize = 4 << 20;
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
    /// Run model `key` on the input tensor in the payload (f32, little-endian).
    Run {
        key: String,
        shape: [i64; 4],
        timeout_ms: u64,
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
    fn spawn(&self, device: &PartitionDevice) -> std::io::Result<(Child, UnixStream)> {
        let (ours, theirs) = UnixStream::pair()?;
        for end in [&ours, &theirs] {
            let end = socket2::SockRef::from(end);
            end.set_send_buffer_size(SOCKET_BUFFER)?;
            end.set_recv_buffer_size(SOCKET_BUFFER)?;
        }
        let providers: Vec<&str> = self.providers.iter().map(|p| p.name()).collect();
        let child = Command::new(&self.executable)
            .arg("inference-worker")
            .arg("--onnxruntime")
            .arg(&self.library)
            .arg("--providers")
            .arg(providers.join(","))
            .env("CUDA_VISIBLE_DEVICES", &device.visible)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok((child, ours))
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
                let state = lock(&worker.state);
                WorkerFigures {
                    partition: worker.device.to_string(),
                    device: worker.device.visible.clone(),
                    up: state.running.is_some(),
                    starts: state.starts,
                    failures: state.failures_total,
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
        });
        by_partition.insert(device.clone(), Arc::downgrade(&worker));
        worker
    }
}

/// One partition's worker process.
pub struct Worker {
    device: Arc<PartitionDevice>,
    launcher: Launcher,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: Option<Running>,
    /// Failures in a row, for the backoff; none since the last good answer.
    failures: u32,
    retry_at: Option<Instant>,
    starts: u64,
    failures_total: u64,
}

struct Running {
    child: Child,
    socket: UnixStream,
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
        lock(&self.state).running.as_ref().map(|r| r.child.id())
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
        let request = Request::Run {
            key: key.into(),
            shape: input.shape,
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.exchange(&mut state, &request, &f32_bytes(&input.data), deadline)? {
            (Response::Outputs { tensors }, payload) => {
                let mut values = f32_values(&payload).into_iter();
                let mut outputs = Vec::with_capacity(tensors.len());
                for (name, shape, len) in tensors {
                    let data: Vec<f32> = values.by_ref().take(len as usize).collect();
                    if data.len() as u64 != len {
                        return Err(self.broken(
                            &mut state,
                            "sent fewer output values than it announced".into(),
                        ));
                    }
                    outputs.push(Tensor { name, shape, data });
                }
                Ok(outputs)
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
            state.starts += 1;
            match self.launcher.spawn(&self.device) {
                Ok((child, socket)) => {
                    tracing::info!(partition = %self.device, device = %self.device.visible, pid = child.id(), "inference worker started");
                    state.running = Some(Running {
                        child,
                        socket,
                        loaded: HashSet::new(),
                    });
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
        state.failures_total += 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (state.failures - 1).min(16))
            .min(MAX_BACKOFF);
        state.retry_at = Some(Instant::now() + backoff);
        tracing::warn!(partition = %self.device, backoff_ms = backoff.as_millis() as u64, "{reason}");
        InferenceError::Runtime(reason)
    }
}

/// The worker's side (`xpud inference-worker`): answers the host's requests on the
/// socket it was given as standard input until the host closes it. Its sessions
/// run on the first device its providers drive: the one `CUDA_VISIBLE_DEVICES`
/// leaves it.
pub fn serve(library: PathBuf, providers: Vec<Provider>) -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    let socket = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned()?);
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
            Request::Load { key } => match inference.in_process(&payload) {
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
            } => {
                let deadline = Instant::now() + Duration::from_millis(timeout_ms);
                match run(&models, &key, shape, &payload, deadline) {
                    Ok(outputs) => {
                        let tensors = outputs
                            .iter()
                            .map(|t| (t.name.clone(), t.shape.clone(), t.data.len() as u64))
                            .collect();
                        let mut data =
                            Vec::with_capacity(outputs.iter().map(|t| t.data.len() * 4).sum());
                        for tensor in &outputs {
                            data.extend_from_slice(&f32_bytes(&tensor.data));
                        }
                        (Response::Outputs { tensors }, data)
                    }
                    Err(e) => (Response::Failed(e.into()), Vec::new()),
                }
            }
        };
        write_message(&mut writer, &response, &out)?;
    }
}

/// One run in the worker, its input checked against its shape.
fn run(
    models: &HashMap<String, super::models::SharedModel>,
    key: &str,
    shape: [i64; 4],
    payload: &[u8],
    deadline: Instant,
) -> Result<Vec<Tensor>, InferenceError> {
    let model = models.get(key).ok_or_else(|| {
        InferenceError::Runtime(format!("model {key} is not loaded in this worker"))
    })?;
    let values = shape.iter().try_fold(1u64, |n, &d| {
        u64::try_from(d).ok().and_then(|d| n.checked_mul(d))
    });
    if values.and_then(|n| n.checked_mul(4)) != Some(payload.len() as u64) {
        return Err(InferenceError::InvalidInput(format!(
            "{} bytes of input for the shape {shape:?}",
            payload.len()
        )));
    }
    let input = InputTensor {
        shape,
        data: f32_values(payload),
    };
    model.run_alone(&input, deadline)
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
        })
    }

    #[test]
    fn a_message_crosses_whole_and_a_length_past_the_bounds_is_refused() {
        let mut wire = Vec::new();
        let request = Request::Run {
            key: "abc".into(),
            shape: [1, 3, 2, 2],
            timeout_ms: 250,
        };
        let values: Vec<f32> = (0..12).map(|i| i as f32 / 3.0).collect();
        write_message(&mut wire, &request, &f32_bytes(&values)).unwrap();
        let (read, payload) = read_message::<Request>(&mut wire.as_slice()).unwrap();
        assert!(matches!(
            read,
            Request::Run { key, shape: [1, 3, 2, 2], timeout_ms: 250 } if key == "abc"
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
        let worker = Workers::default().get(
            &Launcher {
                executable: hung,
                library: "/nonexistent/libonnxruntime.so".into(),
                providers: vec![Provider::Cpu],
            },
            &mig("MIG-hung"),
        );
        let started = Instant::now();
        let deadline = started + Duration::from_millis(100);
        let Err(InferenceError::Runtime(why)) = worker.load("m", b"model", deadline) else {
            panic!("a hung worker answered");
        };
        assert!(why.contains("did not answer within"), "{why}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Killed, not left behind.
        assert_eq!(worker.pid(), None);
    }
}
