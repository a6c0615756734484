//! This machine, as the single-machine backend sees it: its fixed facts (cores,
//! memory, the disk holding the data directory, addresses, host name, OS) and a
//! sampler that records its load and its accelerators' load into a bounded history.
//!
//! Request handlers read the latest sample and the history; they never measure
//! anything themselves. XPU figures come from the driver sampler's cache.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sysinfo::{Disks, Networks, System};

use crate::runtime::bindings::driver_types::Health as DeviceHealth;
use crate::sampler::SampleCache;

/// Samples kept: with the default 2 s interval, the last 20 minutes.
pub const HISTORY_LEN: usize = 600;

const GIB: f64 = (1u64 << 30) as f64;

#[derive(Clone, Debug)]
pub struct Facts {
    pub host_name: String,
    pub os: String,
    pub cpu_cores: u32,
    pub memory_total_gb: f64,
    /// The disk holding the data directory; none when it is not found.
    pub disk_total_gb: Option<f64>,
    /// The address this machine is known by: configured, else the default route
    /// interface's IPv4 address, else a guess (logged at warn).
    pub ip: IpAddr,
}

/// One accelerator's figures at one instant. The history keeps 600 of these per
/// card: the names are shared with the previous sample (`Machine::record`), so a
/// sample costs its figures, not copies of its strings.
#[derive(Clone, Debug, PartialEq)]
pub struct XpuSample {
    /// `driver/index`: stable for as long as the driver is loaded.
    pub key: Arc<str>,
    pub xpu_type: Arc<str>,
    pub memory_total_gb: Option<f64>,
    pub memory_used_gb: Option<f64>,
    /// 0-1.
    pub utilization: Option<f64>,
    /// Video-decode utilisation, 0-1.
    pub decode_utilization: Option<f64>,
    /// Picture (JPEG) decode utilisation, 0-1.
    pub picture_decode_utilization: Option<f64>,
    /// What the driver says of the card: an unhealthy one is not placed on.
    pub health: DeviceHealth,
    /// No hardware behind it (a simulator the operator asked for).
    pub simulated: bool,
    /// Its driver's scheduling labels (shared by the driver's cards and samples).
    pub labels: Arc<[(String, String)]>,
}

impl XpuSample {
    /// Its driver and its index in it, read from `key`.
    pub fn card(&self) -> Option<(&str, u32)> {
        let (driver, index) = self.key.rsplit_once('/')?;
        Some((driver, index.parse().ok()?))
    }
}

#[derive(Clone, Debug)]
pub struct Sample {
    pub at_ms: u64,
    /// 0-1, all cores.
    pub cpu_utilization: f64,
    pub memory_used_gb: f64,
    pub memory_total_gb: f64,
    /// The data directory's disk; none when it is not found.
    pub disk_used_gb: Option<f64>,
    pub disk_total_gb: Option<f64>,
    /// Bytes per second over all non-loopback interfaces since the previous sample.
    pub net_rx_bps: f64,
    pub net_tx_bps: f64,
    pub xpus: Vec<XpuSample>,
}

pub struct Machine {
    facts: Facts,
    history: RwLock<VecDeque<Arc<Sample>>>,
}

/// The disk whose mount point holds `path` (the longest matching mount point).
fn disk_of<'a>(disks: &'a Disks, path: &Path) -> Option<&'a sysinfo::Disk> {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    disks
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
}

/// The interface of the IPv4 default route with the lowest metric, from the
/// kernel's routing table (`/proc/net/route`: destination and mask 0).
fn default_route_interface(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (iface, destination, flags, metric, mask) = (
                fields.first()?,
                fields.get(1)?,
                fields.get(3)?,
                fields.get(6)?,
                fields.get(7)?,
            );
            let up = u32::from_str_radix(flags, 16).ok()? & 1 == 1;
            (up && *destination == "00000000" && *mask == "00000000")
                .then(|| Some((metric.parse::<u32>().ok()?, iface.to_string())))
                .flatten()
        })
        .min()
        .map(|(_, iface)| iface)
}

/// The first non-loopback IPv4 address of `interface`.
fn ipv4_of(networks: &Networks, interface: &str) -> Option<IpAddr> {
    networks
        .get(std::ffi::OsStr::new(interface))
        .and_then(|data| {
            data.ip_networks()
                .iter()
                .map(|n| n.addr)
                .find(|a| a.is_ipv4() && !a.is_loopback())
        })
}

/// The address other machines reach this one by, and why it was chosen: the
/// configured one; else the IPv4 address of the default route's interface (not
/// the first name in sort order, which puts `docker0` and `br-*` before `eth0`);
/// else any interface's, said to be a guess; else loopback, said loudly.
fn advertised_ip(configured: Option<IpAddr>, networks: &Networks) -> IpAddr {
    if let Some(ip) = configured {
        tracing::info!(%ip, "advertised address: configured (advertise-address)");
        return ip;
    }
    let route = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|table| default_route_interface(&table));
    if let Some(interface) = &route {
        if let Some(ip) = ipv4_of(networks, interface) {
            tracing::info!(%ip, %interface, "advertised address: the default route's interface");
            return ip;
        }
    }
    let mut names: Vec<String> = networks
        .keys()
        .map(|name| name.to_string_lossy().into_owned())
        .collect();
    names.sort();
    if let Some((interface, ip)) = names
        .into_iter()
        .find_map(|name| ipv4_of(networks, &name).map(|ip| (name, ip)))
    {
        tracing::warn!(%ip, %interface, default_route = ?route, "advertised address: no IPv4 address on a default route's interface; took the first interface with one, which may not be reachable from the platform: set advertise-address");
        return ip;
    }
    let ip = IpAddr::from([127, 0, 0, 1]);
    tracing::warn!(%ip, "advertised address: no non-loopback IPv4 address on this machine; other machines cannot reach it: set advertise-address");
    ip
}

impl Machine {
    /// Reads the machine's facts. `data_dir` picks the disk that counts.
    pub fn probe(data_dir: &Path, advertise: Option<IpAddr>) -> anyhow::Result<Machine> {
        let mut system = System::new().map_err(|e| anyhow::anyhow!("read system facts: {e}"))?;
        system.refresh_memory();
        let disks =
            Disks::new_with_refreshed_list().map_err(|e| anyhow::anyhow!("list disks: {e}"))?;
        let networks = Networks::new_with_refreshed_list()
            .map_err(|e| anyhow::anyhow!("list networks: {e}"))?;
        let cpu_cores = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let facts = Facts {
            host_name: System::host_name().unwrap_or_else(|_| "localhost".into()),
            os: System::long_os_version().unwrap_or_else(|_| std::env::consts::OS.into()),
            cpu_cores,
            memory_total_gb: system.total_memory() as f64 / GIB,
            disk_total_gb: disk_of(&disks, data_dir).map(|d| d.total_space() as f64 / GIB),
            ip: advertised_ip(advertise, &networks),
        };
        Ok(Machine {
            facts,
            history: RwLock::new(VecDeque::with_capacity(HISTORY_LEN)),
        })
    }

    pub fn facts(&self) -> &Facts {
        &self.facts
    }

    /// The node id this machine has in clusters: stable across restarts.
    pub fn node_id(&self) -> String {
        let name: String = self
            .facts
            .host_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        format!("node-{name}")
    }

    pub fn latest(&self) -> Option<Arc<Sample>> {
        self.read().back().cloned()
    }

    /// The recorded samples, oldest first.
    pub fn history(&self) -> Vec<Arc<Sample>> {
        self.read().iter().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, VecDeque<Arc<Sample>>> {
        crate::sync::read(&self.history)
    }

    fn record(&self, mut sample: Sample) {
        let mut history = crate::sync::write(&self.history);
        if let Some(previous) = history.back() {
            share_names(&mut sample.xpus, &previous.xpus);
        }
        if history.len() == HISTORY_LEN {
            history.pop_front();
        }
        history.push_back(Arc::new(sample));
    }
}

/// Points equal names at the previous sample's copies (cards keep their order
/// from one sample to the next; a card that moved keeps its own strings).
fn share_names(xpus: &mut [XpuSample], previous: &[XpuSample]) {
    for (i, xpu) in xpus.iter_mut().enumerate() {
        if let Some(before) = previous.get(i) {
            if before.key == xpu.key {
                xpu.key = before.key.clone();
            }
            if before.xpu_type == xpu.xpu_type {
                xpu.xpu_type = before.xpu_type.clone();
            }
        }
    }
}

/// The figures of the card `key` in `sample`: where it was at `hint` (cards keep
/// their order), else found by key.
pub fn card<'a>(sample: &'a Sample, key: &str, hint: usize) -> Option<&'a XpuSample> {
    match sample.xpus.get(hint) {
        Some(x) if &*x.key == key => Some(x),
        _ => sample.xpus.iter().find(|x| &*x.key == key),
    }
}

/// The accelerators in the drivers' current snapshots (a driver without one has no
/// cards here).
pub fn xpus(samples: &SampleCache, drivers: &[String]) -> Vec<XpuSample> {
    let mut out = Vec::new();
    for driver in drivers {
        let Some(snapshot) = samples.get(driver) else {
            continue;
        };
        let cards: BTreeMap<u32, _> = snapshot
            .metrics
            .cards
            .iter()
            .map(|c| (c.device_index, c))
            .collect();
        for device in snapshot.devices.iter() {
            let card = cards.get(&device.index);
            let total_mib = card
                .and_then(|c| c.memory_total_mib)
                .or(device.memory_total_mib);
            out.push(XpuSample {
                key: format!("{driver}/{}", device.index).into(),
                xpu_type: device.accelerator_type.as_str().into(),
                memory_total_gb: total_mib.map(|m| m as f64 / 1024.0),
                memory_used_gb: card
                    .and_then(|c| c.memory_used_mib)
                    .map(|m| m as f64 / 1024.0),
                utilization: card
                    .and_then(|c| c.ai_utilization_pct)
                    .map(|p| f64::from(p) / 100.0),
                decode_utilization: card
                    .and_then(|c| c.video_decode_utilization_pct)
                    .map(|p| f64::from(p) / 100.0),
                picture_decode_utilization: card
                    .and_then(|c| c.picture_decode_utilization_pct)
                    .map(|p| f64::from(p) / 100.0),
                health: device.health,
                simulated: snapshot.simulated,
                labels: snapshot.labels.clone(),
            });
        }
    }
    out
}

/// The shortest window CPU usage can be measured over (sysinfo's minimum).
const FIRST_WINDOW: Duration = Duration::from_millis(250);

/// Samples the machine every `interval` into its history, on a thread of its own
/// that ends once the machine is dropped. The first sample is taken after
/// `FIRST_WINDOW`; the receiver hears when it is recorded, so that the server
/// need not open its listener on figures it does not have yet.
pub fn spawn_sampler(
    machine: &Arc<Machine>,
    data_dir: PathBuf,
    samples: Arc<SampleCache>,
    drivers: impl Fn() -> Vec<String> + Send + 'static,
    interval: Duration,
) -> std::sync::mpsc::Receiver<()> {
    let (first_recorded, first) = std::sync::mpsc::channel();
    let machine = Arc::downgrade(machine);
    let spawned = std::thread::Builder::new()
        .name("machine-sampler".into())
        .spawn(move || {
            let (mut system, mut disks, mut networks) = match (
                System::new(),
                Disks::new_with_refreshed_list(),
                Networks::new_with_refreshed_list(),
            ) {
                (Ok(s), Ok(d), Ok(n)) => (s, d, n),
                _ => {
                    tracing::error!("cannot read this machine's figures; host monitoring is off");
                    return;
                }
            };
            system.refresh_cpu_usage();
            let mut last = std::time::Instant::now();
            let mut wait = FIRST_WINDOW.min(interval);
            loop {
                // CPU usage is measured between two refreshes: sleep first.
                std::thread::sleep(wait);
                wait = interval;
                let Some(machine) = machine.upgrade() else {
                    break;
                };
                system.refresh_cpu_usage();
                system.refresh_memory();
                disks.refresh(true);
                networks.refresh(true);
                let elapsed = last.elapsed().as_secs_f64().max(1e-3);
                last = std::time::Instant::now();
                let (rx, tx) = networks
                    .iter()
                    .filter(|(_, data)| data.ip_networks().iter().all(|n| !n.addr.is_loopback()))
                    .fold((0u64, 0u64), |(rx, tx), (_, data)| {
                        (rx + data.received(), tx + data.transmitted())
                    });
                let disk = disk_of(&disks, &data_dir).map(|d| {
                    let total = d.total_space() as f64 / GIB;
                    let free = d.available_space() as f64 / GIB;
                    (total, (total - free).max(0.0))
                });
                machine.record(Sample {
                    at_ms: crate::dates::now_ms(),
                    cpu_utilization: f64::from(system.global_cpu_usage()) / 100.0,
                    memory_used_gb: system.used_memory() as f64 / GIB,
                    memory_total_gb: system.total_memory() as f64 / GIB,
                    disk_used_gb: disk.map(|(_, used)| used),
                    disk_total_gb: disk.map(|(total, _)| total),
                    net_rx_bps: rx as f64 / elapsed,
                    net_tx_bps: tx as f64 / elapsed,
                    xpus: xpus(&samples, &drivers()),
                });
                let _ = first_recorded.send(());
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the machine sampler: {e}; host monitoring is off");
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xpu(key: &str, utilization: f64) -> XpuSample {
        XpuSample {
            key: key.into(),
            xpu_type: "SIM_T4".into(),
            memory_total_gb: Some(16.0),
            memory_used_gb: Some(1.0),
            utilization: Some(utilization),
            decode_utilization: None,
            picture_decode_utilization: None,
            health: DeviceHealth::Healthy,
            simulated: false,
            labels: Arc::from([]),
        }
    }

    #[test]
    fn the_default_route_picks_the_interface_not_the_name_order() {
        let table =
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
            br-1a2b\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
            docker0\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
            wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
            eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth1\t00000000\t010300C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n";
        // eth1's route is down (flags without RTF_UP); eth0 has the lower metric.
        assert_eq!(default_route_interface(table).as_deref(), Some("eth0"));
        assert_eq!(default_route_interface("Iface\tDestination\n"), None);
        assert_eq!(default_route_interface("garbage"), None);
    }

    #[test]
    fn history_shares_card_names_between_samples_and_finds_cards_that_moved() {
        let before = vec![xpu("sim/0", 0.1), xpu("sim/1", 0.2)];
        let mut now = vec![xpu("sim/0", 0.3), xpu("sim/1", 0.4)];
        share_names(&mut now, &before);
        for (a, b) in now.iter().zip(&before) {
            assert!(Arc::ptr_eq(&a.key, &b.key) && Arc::ptr_eq(&a.xpu_type, &b.xpu_type));
        }
        let sample = |xpus| Sample {
            at_ms: 0,
            cpu_utilization: 0.0,
            memory_used_gb: 0.0,
            memory_total_gb: 0.0,
            disk_used_gb: None,
            disk_total_gb: None,
            net_rx_bps: 0.0,
            net_tx_bps: 0.0,
            xpus,
        };
        // A card found where it was, and one that moved.
        let swapped = sample(vec![xpu("sim/1", 0.4), xpu("sim/0", 0.3)]);
        assert_eq!(card(&swapped, "sim/0", 0).unwrap().utilization, Some(0.3));
        assert_eq!(card(&swapped, "sim/1", 0).unwrap().utilization, Some(0.4));
        assert!(card(&swapped, "sim/9", 0).is_none());
    }
}
