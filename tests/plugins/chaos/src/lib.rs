//! chaos: a driver plugin that misbehaves on purpose, for the containment tests.
//!
//! `init` always succeeds so the plugin loads. What `sample` does depends on the
//! manifest's `mode`:
//! - `healthy`: one card, plain figures;
//! - `trap`: executes `unreachable` (a wasm trap);
//! - `loop`: spins forever (the host's deadline must stop it);
//! - `oom`: allocates without bound (the host's memory cap must stop it);
//! - `read`: reads the file at config `path` and reports what happened: a device
//!   named after the file's first line, or a `device-failure` with the error;
//! - `flaky`: the first `sample` of each incarnation answers, the second traps;
//! - `panic`: writes 100 KB to stderr, then panics with a message;
//! - `probe`: reports what the sandbox lets it see: the number of environment
//!   variables and arguments, and the result of a TCP connect to config `path`
//!   (an address), as its device type;
//! - `sleep`: sleeps for an hour inside a host call (WASI poll), where epoch
//!   deadlines do not reach;
//! - `nan`: a sample whose utilisation is NaN and whose memory used is above total;
//! - `many`: 200,000 devices;
//! - `huge`: a device whose accelerator type is a 20 MB string;
//! - `duplicate`: two devices with the same index;
//! - `bogus-partition`: `create-partition` "succeeds" on device 99 with a quota of
//!   1 TiB, whatever was asked;
//! - `log-flood`: each `sample` writes 3,000 log lines, the first forging a line of
//!   the host's with a newline;
//! - `unlisted`: `partitions` always fails, and the second `sample` of each
//!   incarnation traps (a driver whose partitions cannot be listed after a crash);
//! - `die-at`: healthy until the wall clock passes config `at-ms` (Unix ms), then
//!   every `devices` call traps, in every incarnation: a driver that died;
//! - `unshared`: healthy, but `create-partition` is unsupported (a driver that
//!   cannot share its cards);
//! - `health-cycle`: its card goes healthy, degraded, unhealthy, healthy, ... one
//!   step every 4 `devices` calls;
//! - `failing-card`: two cards; card 0 is unhealthy while the file at config
//!   `path` exists (a granted path), card 1 always healthy;
//! - `versioned`: keeps a devices version, which changes every 2 samples, each
//!   time with the next health (healthy, degraded, unhealthy, healthy, ...);
//! - `remember`: the first sample of each incarnation looks for what an earlier
//!   instance left in its memory (a static buffer, and fresh heap that the
//!   allocator takes to be zero) and fails naming the bytes it found; then it
//!   leaves a pattern in both for the next instance to find.
//!
//! In any mode, config `trap-at` = N has the Nth sample of each incarnation trap.
//!
//! Partitions are plain bookkeeping with ids `c0`, `c1`, ... counted from 0 in each
//! incarnation, like a simulator that starts empty after a restart. Their instance
//! figures echo what the host said of them: `memory-used-mib` is the pid last
//! bound to the partition (`bind-process`), absent before.

use xpud_sdk::driver::*;

/// Static memory `remember` marks: zero in a fresh instance.
static MARKED: std::sync::Mutex<[u8; 4096]> = std::sync::Mutex::new([0; 4096]);

/// Bytes of an earlier instance seen in this one's static buffer and fresh heap;
/// then marks both. The heap comes zeroed from the allocator, which assumes memory
/// the instance grew is zero: it is, unless the host's reset of a reused slot left
/// the last instance's pages.
fn remember() -> usize {
    const HEAP: usize = 2 << 20;
    let mut marked = MARKED.lock().unwrap_or_else(|e| e.into_inner());
    let mut fresh = vec![0u8; HEAP];
    let stale = marked
        .iter()
        .chain(fresh.iter())
        .filter(|&&b| b != 0)
        .count();
    marked.fill(0xa5);
    // Marked and never freed: the next instance's first allocation lies here.
    fresh.fill(0x5a);
    std::mem::forget(std::hint::black_box(fresh));
    stale
}

struct Chaos {
    mode: String,
    path: String,
    samples: u32,
    trap_at: u32,
    devices_calls: u32,
    partitions: Vec<Partition>,
    next_partition: u32,
    /// Pids the host bound to partitions, by partition id.
    processes: Vec<(String, u32)>,
}

impl Driver for Chaos {
    fn init(config: Config) -> Result<(Self, DriverInfo), DriverError> {
        let chaos = Chaos {
            mode: config.get("mode").unwrap_or("healthy").to_string(),
            path: config
                .get("path")
                .or(config.get("at-ms"))
                .unwrap_or("")
                .to_string(),
            samples: 0,
            trap_at: config.parse_or("trap-at", 0)?,
            devices_calls: 0,
            partitions: Vec::new(),
            next_partition: 0,
            processes: Vec::new(),
        };
        let info = DriverInfo {
            vendor: "CHAOS".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            accelerator_types: vec!["CHAOS_TEST".into()],
            simulated: true,
        };
        Ok((chaos, info))
    }

    fn devices(&mut self) -> Result<Vec<Device>, DriverError> {
        if self.mode == "die-at" {
            let at: u128 = self.path.parse().unwrap_or(0);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            if now >= at {
                core::arch::wasm32::unreachable();
            }
        }
        let accelerator_type = if self.mode == "probe" {
            let connect = match std::net::TcpStream::connect(self.path.as_str()) {
                Ok(_) => "connected".to_string(),
                Err(e) => format!("refused ({e})"),
            };
            format!(
                "env={} args={} connect={connect}",
                std::env::vars().count(),
                std::env::args().count()
            )
        } else if self.mode == "read" {
            let text = std::fs::read_to_string(&self.path)
                .map_err(|e| DriverError::DeviceFailure(format!("read {}: {e}", self.path)))?;
            text.lines().next().unwrap_or("").to_string()
        } else if self.mode == "huge" {
            "X".repeat(20 << 20)
        } else {
            "CHAOS_TEST".to_string()
        };
        let device = |index: u32| Device {
            id: format!("chaos:{index}"),
            uuid: None,
            index,
            accelerator_type: "CHAOS_TEST".into(),
            memory_total_mib: Some(1024),
            decoder_units: None,
            encoder_units: None,
            pci_bus_id: None,
            health: Health::Healthy,
        };
        match self.mode.as_str() {
            "many" => return Ok((0..200_000).map(device).collect()),
            "failing-card" => {
                let mut cards = vec![device(0), device(1)];
                if std::fs::metadata(&self.path).is_ok() {
                    cards[0].health = Health::Unhealthy;
                }
                return Ok(cards);
            }
            "duplicate" => {
                let mut twin = device(0);
                twin.id = "chaos:twin".into();
                return Ok(vec![device(0), twin]);
            }
            _ => {}
        }
        self.devices_calls += 1;
        const CYCLE: [Health; 3] = [Health::Healthy, Health::Degraded, Health::Unhealthy];
        let health = match self.mode.as_str() {
            "health-cycle" => CYCLE[(self.devices_calls / 4 % 3) as usize],
            "versioned" => CYCLE[(self.samples / 2 % 3) as usize],
            _ => Health::Healthy,
        };
        Ok(vec![Device {
            id: "chaos:0".into(),
            uuid: None,
            index: 0,
            accelerator_type,
            memory_total_mib: Some(1024),
            decoder_units: None,
            encoder_units: None,
            pci_bus_id: None,
            health,
        }])
    }

    fn sample(&mut self) -> Result<Metrics, DriverError> {
        self.samples += 1;
        if self.samples == self.trap_at {
            core::arch::wasm32::unreachable();
        }
        match self.mode.as_str() {
            "trap" => core::arch::wasm32::unreachable(),
            "flaky" | "unlisted" if self.samples == 2 => core::arch::wasm32::unreachable(),
            "panic" => {
                for i in 0..2000 {
                    eprintln!("chatty line {i:04} of forty-odd bytes, padding");
                }
                panic!("chaos panicked on purpose");
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Err(DriverError::DeviceFailure("woke up after an hour".into()))
            }
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "nan" => Ok(Metrics {
                cards: vec![CardMetrics {
                    device_index: 0,
                    ai_utilization_pct: Some(f32::NAN),
                    memory_used_mib: Some(u64::MAX),
                    memory_total_mib: Some(1024),
                    video_decode_utilization_pct: None,
                    picture_decode_utilization_pct: None,
                    temperature_celsius: None,
                    power_watts: None,
                }],
                instances: vec![],
            }),
            "log-flood" => {
                xpud_sdk::error!("forged\n2026-12-01T00:00:00Z ERROR xpud: plugin marked unhealthy plugin=sim-xpu");
                for i in 1..3000 {
                    xpud_sdk::info!("flood line {i}");
                }
                self.healthy_metrics()
            }
            "remember" if self.samples == 1 => {
                let stale = remember();
                if stale > 0 {
                    return Err(DriverError::DeviceFailure(format!(
                        "{stale} bytes left by an earlier instance"
                    )));
                }
                self.healthy_metrics()
            }
            "oom" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            _ => self.healthy_metrics(),
        }
    }

    fn devices_version(&self) -> Option<u64> {
        (self.mode == "versioned").then_some(u64::from(self.samples / 2))
    }

    fn create_partition(&mut self, spec: PartitionSpec) -> Result<Partition, DriverError> {
        if self.mode == "unshared" {
            return Err(DriverError::Unsupported(
                "chaos cannot partition its card".into(),
            ));
        }
        let spec = if self.mode == "bogus-partition" {
            PartitionSpec {
                device_index: 99,
                memory_quota_mib: 1 << 20,
                ..spec
            }
        } else {
            spec
        };
        let partition = Partition {
            id: format!("c{}", self.next_partition),
            spec,
        };
        self.next_partition += 1;
        self.partitions.push(partition.clone());
        Ok(partition)
    }

    fn destroy_partition(&mut self, id: String) -> Result<(), DriverError> {
        let before = self.partitions.len();
        self.partitions.retain(|p| p.id != id);
        self.processes.retain(|(bound, _)| *bound != id);
        if self.partitions.len() == before {
            return Err(DriverError::NotFound(format!("no partition {id}")));
        }
        Ok(())
    }

    fn partitions(&mut self) -> Result<Vec<Partition>, DriverError> {
        if self.mode == "unlisted" {
            return Err(DriverError::DeviceFailure("cannot list partitions".into()));
        }
        Ok(self.partitions.clone())
    }

    fn bind_process(&mut self, id: &str, pid: u32) -> Result<(), DriverError> {
        if !self.partitions.iter().any(|p| p.id == id) {
            return Err(DriverError::NotFound(format!("no partition {id}")));
        }
        self.processes.retain(|(bound, _)| bound != id);
        self.processes.push((id.to_string(), pid));
        Ok(())
    }
}

impl Chaos {
    fn healthy_metrics(&self) -> Result<Metrics, DriverError> {
        let cards = if self.mode == "failing-card" { 2 } else { 1 };
        Ok(Metrics {
            cards: (0..cards)
                .map(|device_index| CardMetrics {
                    device_index,
                    ai_utilization_pct: Some(1.0),
                    memory_used_mib: Some(1),
                    memory_total_mib: Some(1024),
                    video_decode_utilization_pct: None,
                    picture_decode_utilization_pct: None,
                    temperature_celsius: None,
                    power_watts: None,
                })
                .collect(),
            instances: self
                .partitions
                .iter()
                .map(|p| InstanceMetrics {
                    partition_id: p.id.clone(),
                    device_index: p.spec.device_index,
                    ai_utilization_pct: None,
                    memory_used_mib: self
                        .processes
                        .iter()
                        .find(|(id, _)| *id == p.id)
                        .map(|(_, pid)| u64::from(*pid)),
                    memory_quota_mib: p.spec.memory_quota_mib,
                })
                .collect(),
        })
    }
}

xpud_sdk::export_driver!(Chaos);
