//! Child processes xpud starts (stream decoders, inference workers): what they
//! may cost the server when memory runs out.

/// Makes the kernel's OOM killer prefer process `pid` over xpud (`score` from 1
/// to 1000, higher goes first), here and under a container's memory limit alike.
/// A child xpud starts again is cheaper to lose than every task and partition at
/// once. Raising a score needs no privilege; where /proc says no, nothing changes.
pub fn prefer_for_oom_kill(pid: u32, score: u16) {
    if let Err(e) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), score.to_string()) {
        tracing::debug!(pid, "oom_score_adj left as it is: {e}");
    }
}

/// Decoders: a camera's ffmpeg is started again within a second.
pub const DECODER_OOM_SCORE: u16 = 1000;
/// Inference workers: started again too, but their models take longer to load.
pub const WORKER_OOM_SCORE: u16 = 500;
