//! Cross-stream batching: runs of one model asked for at about the same time by
//! different plugin instances (each analysing its own streams) go to ONNX Runtime
//! as one run with a larger batch, as DeepStream's nvstreammux and Triton's dynamic
//! batcher do.
//!
//! The batches form by combining, with no thread and no waiting window of their
//! own: a caller queues its input, then takes the model's session; if a run made
//! while it waited served it already, it has its outputs; otherwise it runs every
//! queued input of the same size (up to `max`, its own first) as one batch and
//! hands the others their outputs. A stream alone runs at once, as unbatched; under
//! load, the runs that queue behind a busy session go together (Triton's dynamic
//! batcher with no queue delay).
//!
//! Only models whose input and every output have a dynamic first dimension are
//! batched, and only on an accelerator: on the CPU, ONNX Runtime already spreads
//! one run over every core, and batching measured a loss (0.86x the frames/s of
//! eight streams running a small convolutional model unbatched: BENCHMARKS.md).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::bindings::wit_inference::{InferenceError, Tensor};
use super::preprocess::InputTensor;
use crate::sync::lock;

/// How runs are batched (`[inference] max-batch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// Most requests in one run; 1 turns batching off.
    pub max: usize,
    /// Batch CPU sessions too: only for the benchmark that shows why they are not
    /// by default, and the tests on machines without an accelerator.
    pub on_cpu: bool,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max: 8,
            on_cpu: false,
        }
    }
}

type Reply = Result<Vec<Tensor>, InferenceError>;

/// A run asked for, until a session run answers it.
struct Request {
    input: InputTensor,
    deadline: Instant,
    reply: Mutex<Option<Reply>>,
}

/// The runs of one batchable model waiting for its session.
#[derive(Default)]
pub struct Combiner {
    queued: Mutex<Vec<Arc<Request>>>,
}

/// Runs a session once on inputs stacked along the first dimension: each input's
/// outputs.
pub type Execute<'a, S> =
    &'a dyn Fn(&mut S, &[&InputTensor], Instant) -> Result<Vec<Vec<Tensor>>, InferenceError>;

impl Combiner {
    /// Runs `input` on `session` through `execute`, in a batch of up to `max`
    /// with whatever else is queued.
    pub fn run<S>(
        &self,
        session: &Mutex<S>,
        max: usize,
        execute: Execute<S>,
        input: InputTensor,
        deadline: Instant,
    ) -> Reply {
        let mine = Arc::new(Request {
            input,
            deadline,
            reply: Mutex::new(None),
        });
        lock(&self.queued).push(mine.clone());
        let mut session = lock(session);
        // Served by the run of whoever held the session before.
        if let Some(reply) = lock(&mine.reply).take() {
            return reply;
        }
        // Still queued (only a session holder takes requests out): run it with
        // those of its size.
        let batch = self.take(&mine, max);
        run_batch(&mut *session, execute, &batch);
        let reply = lock(&mine.reply).take();
        reply.unwrap_or_else(|| Err(InferenceError::Runtime("the run was not answered".into())))
    }

    /// `mine` and up to `max - 1` queued requests whose input has its size.
    fn take(&self, mine: &Arc<Request>, max: usize) -> Vec<Arc<Request>> {
        let mut queued = lock(&self.queued);
        let size = &mine.input.shape[1..];
        let mut batch = vec![mine.clone()];
        queued.retain(|request| {
            if Arc::ptr_eq(request, mine) {
                return false;
            }
            let joins = batch.len() < max && request.input.shape[1..] == *size;
            if joins {
                batch.push(request.clone());
            }
            !joins
        });
        batch
    }
}

/// Runs `batch` as one, answering every request (those past their deadline with
/// that).
fn run_batch<S>(session: &mut S, execute: Execute<S>, batch: &[Arc<Request>]) {
    let now = Instant::now();
    let (live, late): (Vec<&Arc<Request>>, Vec<&Arc<Request>>) =
        batch.iter().partition(|r| r.deadline > now);
    for request in late {
        *lock(&request.reply) = Some(Err(InferenceError::Runtime(
            "the call's deadline passed while the run waited for the model".into(),
        )));
    }
    if live.is_empty() {
        return;
    }
    let deadline = live.iter().map(|r| r.deadline).min().unwrap_or(now);
    let inputs: Vec<&InputTensor> = live.iter().map(|r| &r.input).collect();
    match execute(session, &inputs, deadline) {
        Ok(outputs) => {
            for (request, outputs) in live.iter().zip(outputs) {
                *lock(&request.reply) = Some(Ok(outputs));
            }
        }
        Err(e) => {
            for request in live {
                *lock(&request.reply) = Some(Err(e.clone()));
            }
        }
    }
}

/// The inputs stacked along the first dimension, as one tensor's shape and data.
pub fn stack(inputs: &[&InputTensor]) -> ([i64; 4], Vec<f32>) {
    let mut shape = inputs[0].shape;
    shape[0] = inputs.iter().map(|i| i.shape[0]).sum();
    let mut data = Vec::with_capacity(inputs.iter().map(|i| i.data.len()).sum());
    for input in inputs {
        data.extend_from_slice(&input.data);
    }
    (shape, data)
}

/// One batched output split back into the requests' parts along its first
/// dimension (`parts` of equal size).
pub fn split(
    name: &str,
    shape: &[i64],
    data: &[f32],
    parts: usize,
) -> Result<Vec<Tensor>, InferenceError> {
    let rows = shape.first().copied().unwrap_or(0);
    if parts == 0 || rows != parts as i64 || !data.len().is_multiple_of(parts) {
        return Err(InferenceError::InvalidModel(format!(
            "output {name}: its first dimension is {rows}, not the batch of {parts}"
        )));
    }
    let mut part_shape: Vec<u32> = shape.iter().map(|&d| d.max(0) as u32).collect();
    part_shape[0] = 1;
    Ok(data
        .chunks(data.len() / parts)
        .map(|chunk| Tensor {
            name: name.to_string(),
            shape: part_shape.clone(),
            data: chunk.to_vec(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_stack_and_outputs_split_along_the_first_dimension() {
        let a = InputTensor {
            shape: [1, 1, 1, 2],
            data: vec![1.0, 2.0],
        };
        let b = InputTensor {
            shape: [1, 1, 1, 2],
            data: vec![3.0, 4.0],
        };
        let (shape, data) = stack(&[&a, &b]);
        assert_eq!(shape, [2, 1, 1, 2]);
        assert_eq!(data, [1.0, 2.0, 3.0, 4.0]);
        let parts = split("y", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2).unwrap();
        assert_eq!(parts[1].shape, [1, 3]);
        assert_eq!(parts[1].data, [4.0, 5.0, 6.0]);
        assert!(
            split("y", &[1, 6], &[0.0; 6], 2).is_err(),
            "no batch dimension"
        );
    }

    /// Only requests of the same input size join; the caller's own comes first.
    #[test]
    fn a_batch_takes_queued_requests_of_its_size_up_to_the_maximum() {
        let request = |w: i64| {
            Arc::new(Request {
                input: InputTensor {
                    shape: [1, 3, 2, w],
                    data: vec![0.0; 6 * w as usize],
                },
                deadline: Instant::now(),
                reply: Mutex::new(None),
            })
        };
        let combiner = Combiner::default();
        let (a, b, other, c) = (request(4), request(4), request(8), request(4));
        for r in [&a, &b, &other, &c] {
            lock(&combiner.queued).push(r.clone());
        }
        let batch = combiner.take(&c, 2);
        assert!(Arc::ptr_eq(&batch[0], &c) && Arc::ptr_eq(&batch[1], &a));
        assert_eq!(batch.len(), 2);
        let left = lock(&combiner.queued).len();
        assert_eq!(left, 2, "b and the other size stay queued");
    }

    /// Requests that queue while the session is busy go as one batch, and each
    /// gets its own outputs back.
    #[test]
    fn runs_queued_behind_a_busy_session_go_as_one_batch() {
        let combiner = Arc::new(Combiner::default());
        let session = Arc::new(Mutex::new(Vec::<usize>::new()));
        // The "model" echoes each input's first value; the session records each
        // run's batch size.
        let execute = |runs: &mut Vec<usize>, inputs: &[&InputTensor], _: Instant| {
            runs.push(inputs.len());
            Ok(inputs
                .iter()
                .map(|i| {
                    vec![Tensor {
                        name: "y".into(),
                        shape: vec![1],
                        data: vec![i.data[0]],
                    }]
                })
                .collect())
        };
        let busy = lock(&session);
        let callers: Vec<_> = (0..4)
            .map(|n| {
                let (combiner, session) = (combiner.clone(), session.clone());
                std::thread::spawn(move || {
                    let input = InputTensor {
                        shape: [1, 1, 1, 1],
                        data: vec![n as f32],
                    };
                    let soon = Instant::now() + std::time::Duration::from_secs(10);
                    let reply = combiner.run(&session, 8, &execute, input, soon).unwrap();
                    assert_eq!(reply[0].data, [n as f32], "its own outputs");
                })
            })
            .collect();
        while lock(&combiner.queued).len() < 4 {
            std::thread::yield_now();
        }
        drop(busy);
        for caller in callers {
            caller.join().unwrap();
        }
        assert_eq!(*lock(&session), [4], "one run for the four");
    }
}
