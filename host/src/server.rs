//! `xpud serve`: the runtime, the plugin directory and the HTTP API, assembled.

use std::future::Future;
use std::io::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::auth::Auth;
use crate::clusters::Clusters;
use crate::config::ServeConfig;
use crate::http::{self, App, AppState};
use crate::machine::{self, Machine};
use crate::machine_packages::MachinePackages;
use crate::packages::Packages;
use crate::platform::{Identity, Platform};
use crate::plugins::{watcher, Registry, RegistryOptions};
use crate::runtime::inference::InferenceOptions;
use crate::runtime::{Runtime, RuntimeOptions};
use crate::sampler::{self, SampleCache};
use crate::scheduler::Scheduler;
use crate::services::Services;
use crate::store::Store;
use crate::tasks::Tasks;
use crate::tls::Tls;
use crate::workloads::Workloads;

pub struct Server {
    pub addr: SocketAddr,
    pub app: App,
    /// What to tell the operator about getting a token, once serving.
    token_hint: String,
    platform: Option<Platform>,
    router: axum::Router,
    listener: tokio::net::TcpListener,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Builds everything and binds the listener; plugins are loaded before it returns.
    pub async fn start(config: &ServeConfig) -> anyhow::Result<Server> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("create data directory {}", config.data_dir.display()))?;
        let runtime = Runtime::new(RuntimeOptions {
            cache_dir: Some(config.cache_dir()),
            max_instances: config.runtime.max_instances,
            max_memory_bytes: (config.runtime.max_memory_mib as usize) << 20,
            inference: InferenceOptions {
                library: config.inference.onnxruntime.clone(),
                providers: config.inference.providers.clone(),
                batching: config.inference.batching(),
                worker: config.inference.worker.clone(),
            },
            limits: config.plugin_limits.clone(),
            nvml_library: config.runtime.nvml_library.clone(),
        })?;
        let registry = Arc::new(Registry::new(
            runtime,
            RegistryOptions {
                plugin_dir: config.plugin_dir(),
                grant_root: config.runtime.grant_root.clone(),
                allowed_grants: config.runtime.allowed_grants.clone(),
                restart: config.restart.clone(),
                simulated_devices: config.runtime.simulated_devices,
            },
        )?);
        let watcher = watcher::watch(registry.clone()).await?;
        let samples = Arc::new(SampleCache::new(std::time::Duration::from_millis(
            config.sampler.interval_ms,
        )));
        let sampler = sampler::spawn(
            registry.clone(),
            samples.clone(),
            std::time::Duration::from_millis(config.sampler.interval_ms),
        );
        let store = Arc::new(Store::open(&config.data_dir.join("xpud.db"))?);
        let machine = Arc::new(Machine::probe(&config.data_dir, config.advertise_address)?);
        let auth = Arc::new(Auth::new(&config.auth, store.clone())?);
        let admin_secret = auth.bootstrap(&config.data_dir)?;
        let clusters = Clusters::load(store.clone())?;
        let packages = Arc::new(Packages::load(
            store.clone(),
            registry.clone(),
            &config.data_dir.join("packages"),
            crate::fetch::Limits {
                extra_roots: match &config.platform.ca_bundle {
                    Some(bundle) => {
                        crate::fetch::load_ca_bundle(bundle).context("platform.ca-bundle")?
                    }
                    None => Vec::new(),
                },
                ..Default::default()
            },
        )?);
        let scheduler = Arc::new(Scheduler::new(registry.clone()));
        let services = Arc::new(Services::new(
            store.clone(),
            packages.clone(),
            scheduler.clone(),
        ));
        match crate::pipeline::decode::ffmpeg_available(&config.video.ffmpeg) {
            Ok(version) => tracing::info!(%version, "video: ffmpeg found"),
            Err(why) => tracing::warn!("video: {why}; tasks wait for it, saying so"),
        }
        let outbox = crate::pipeline::deliver::Outbox::new(store.clone())?;
        let tasks = Tasks::new(
            store.clone(),
            services.clone(),
            outbox,
            crate::tasks::VideoOptions {
                ffmpeg: config.video.ffmpeg.clone(),
                hwaccel: config.video.hwaccel,
                max_running_tasks: config.video.max_running_tasks,
            },
            http::tasks::summary_json,
        );
        let workloads = Arc::new(Workloads::new(
            store.clone(),
            packages.clone(),
            scheduler.clone(),
        ));
        let machine_packages =
            MachinePackages::new(store.clone(), packages.clone(), scheduler.clone());
        // Services and tasks come back as they were: placed on the cards again, their
        // sessions opened again. Placement needs the cards: sample the drivers now.
        tokio::task::block_in_place(|| -> anyhow::Result<()> {
            sampler::sample_all_now(&registry, &samples);
            let drivers: Vec<String> = registry.drivers().into_iter().map(|(n, _)| n).collect();
            let xpus = machine::xpus(&samples, &drivers);
            services.restore(&xpus)?;
            workloads.restore(&xpus)?;
            machine_packages.restore(&xpus)?;
            tasks.restore()
        })?;
        // The machine's first sample (with the drivers' cards just sampled) is in
        // before the listener opens: D.5's figures are required, never placeholders.
        let first_sample = {
            let registry = registry.clone();
            machine::spawn_sampler(
                &machine,
                config.data_dir.clone(),
                samples.clone(),
                move || {
                    registry
                        .drivers()
                        .into_iter()
                        .map(|(name, _)| name)
                        .collect()
                },
                std::time::Duration::from_millis(config.sampler.interval_ms),
            )
        };
        tokio::task::block_in_place(|| {
            if first_sample
                .recv_timeout(std::time::Duration::from_secs(5))
                .is_err()
            {
                tracing::warn!("no machine sample within 5 s of start; serving without one");
            }
        });
        let machine_code = config
            .machine_code
            .clone()
            .unwrap_or_else(|| machine.node_id());
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let tls = if config.tls.insecure_http {
            tracing::warn!("PLAIN HTTP (--insecure-http): tokens and data cross the network readable by anyone; for local development only");
            None
        } else {
            let facts = machine.facts();
            let mut addresses = vec![
                facts.ip,
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from(Ipv6Addr::LOCALHOST),
            ];
            if !addr.ip().is_unspecified() && !addresses.contains(&addr.ip()) {
                addresses.push(addr.ip());
            }
            let names = vec!["localhost".to_string(), facts.host_name.clone()];
            Some(Arc::new(Tls::prepare(
                &config.tls,
                &config.data_dir,
                &names,
                &addresses,
            )?))
        };
        let token_hint = token_hint(addr, tls.as_deref(), admin_secret.as_deref());
        let metrics = Arc::new(crate::metrics::Metrics::new(crate::metrics::Sources {
            registry: registry.clone(),
            samples: samples.clone(),
            machine: machine.clone(),
            scheduler: scheduler.clone(),
            tasks: tasks.clone(),
        }));
        let evacuation = crate::evacuation::Evacuation::new(
            scheduler.clone(),
            services.clone(),
            workloads.clone(),
            tasks.clone(),
        );
        let app = App(Arc::new(AppState {
            auth: auth.clone(),
            tls: tls.clone(),
            registry,
            samples,
            machine,
            store,
            clusters,
            packages,
            services,
            tasks,
            workloads,
            scheduler: scheduler.clone(),
            listen: addr,
            machine_code,
            machine_packages,
            package_url: config.platform.package_url.clone(),
            metrics,
        }));
        let advertised = app.external_ip();
        if !addr.ip().is_unspecified() && addr.ip() != advertised {
            tracing::warn!(
                %advertised,
                listen = %addr,
                "the address given to the platform and in A.6, A.9 and D.5 is not one this \
                 listener serves: other machines cannot reach it; listen on it (or on 0.0.0.0), \
                 or set advertise-address"
            );
        }
        // Built here, not in `run`: a bad route fails the start, loudly.
        let router = http::router(app.clone());
        let platform = Platform::new(
            &config.platform,
            Identity {
                id: config
                    .platform
                    .id
                    .clone()
                    .unwrap_or_else(|| app.machine.node_id()),
                code: app.machine_code.clone(),
                address: SocketAddr::new(app.external_ip(), addr.port()),
            },
            config.tls.insecure_http,
        )?;
        let keeper = {
            let app = app.clone();
            crate::plugins::algorithm::spawn_keeper(move || {
                let mut workers = app.workloads.workers();
                workers.extend(app.services.all_workers());
                workers.extend(app.machine_packages.workers());
                workers
            })
        };
        let evacuation = {
            let app = app.clone();
            let interval = std::time::Duration::from_millis(config.sampler.interval_ms);
            evacuation.spawn(interval, move || app.xpus())
        };
        let mut background = vec![
            watcher,
            sampler,
            keeper,
            evacuation,
            auth.spawn_maintenance(),
        ];
        background.extend(tls.as_ref().map(|tls| tls.spawn_reloader()));
        if let Some(platform) = &platform {
            background.extend(platform.spawn());
        }
        Ok(Server {
            addr,
            app,
            token_hint,
            router,
            listener,
            platform,
            background,
        })
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let scheme = if self.app.tls.is_some() {
            "https"
        } else {
            "http"
        };
        tracing::info!(addr = %self.addr, scheme, plugin_dir = %self.app.registry.plugin_dir().display(), "xpud serving");
        // Not println!: with stdout closed that would panic.
        let _ = writeln!(std::io::stdout(), "{}", self.token_hint);
        let acceptor = self.app.tls.as_ref().map(|tls| tls.acceptor());
        let result = crate::transport::serve(self.listener, self.router, acceptor, shutdown).await;
        for task in &self.background {
            task.abort();
        }
        // Decoders are child processes: they end with the server.
        self.app.tasks.stop_all();
        if let Some(platform) = &self.platform {
            platform.unregister().await;
        }
        result.context("http server")
    }
}

/// How to get a token from this server: a ready `curl` line when the bootstrap
/// client's secret file is there (the line reads the file; the secret itself is
/// never printed or logged).
fn token_hint(addr: SocketAddr, tls: Option<&Tls>, admin_secret: Option<&Path>) -> String {
    let host = if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), addr.port())
    } else {
        addr
    };
    let (scheme, trust) = match tls {
        Some(tls) => (
            "https",
            tls.ca_file()
                .map(|ca| format!("--cacert {} ", ca.display()))
                .unwrap_or_default(),
        ),
        None => ("http", String::new()),
    };
    let url = format!("{scheme}://{host}{}", crate::http::oauth::TOKEN_PATH);
    match admin_secret {
        Some(secret) => format!(
            "Get a token: curl {trust}-u \"admin:$(cat {})\" -d grant_type=client_credentials {url}",
            secret.display()
        ),
        None => format!(
            "Get a token: curl {trust}-u CLIENT_ID:SECRET -d grant_type=client_credentials {url}  (clients: xpud client list)"
        ),
    }
}
