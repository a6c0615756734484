//! The `xpud` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use sha2::{Digest, Sha256};

use xpud::config::ServeConfig;
use xpud::plugins::inspect::inspect;
use xpud::plugins::{Kind, Manifest};
use xpud::runtime::bindings::{AlgorithmPre, DriverPre};
use xpud::runtime::inference::{InferenceOptions, Provider};
use xpud::runtime::{PluginLimits, Runtime, RuntimeOptions};
use xpud::server::Server;

#[derive(Parser)]
#[command(
    name = "xpud",
    version,
    about = "Video-analytics central compute server with WebAssembly driver and algorithm plugins"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "XPUD_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: load the plugin directory, watch it, serve the HTTP API.
    Serve(ServeArgs),
    /// Work with plugin files.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Work with algorithm file packages (docs/packages.md).
    #[command(subcommand)]
    Package(PackageCommand),
    /// Print the HTTP API's OpenAPI 3 document (the one served at /openapi.json).
    Openapi,
    /// Manage OAuth2 clients (stored in the data directory; a running server sees
    /// changes at its next token request).
    #[command(subcommand)]
    Client(ClientCommand),
    /// Manage the access tokens' signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Run models for `xpud serve` on one partition (started by it, with
    /// `CUDA_VISIBLE_DEVICES` naming the partition's device and a socket as
    /// standard input).
    #[command(hide = true)]
    InferenceWorker {
        /// The ONNX Runtime library.
        #[arg(long)]
        onnxruntime: PathBuf,
        /// Execution providers to try, in order, comma-separated.
        #[arg(long, value_delimiter = ',')]
        providers: Vec<Provider>,
        /// The partition's memory quota: each session's device arena at most this.
        #[arg(long)]
        memory_quota_mib: Option<u64>,
    },
}

/// Where the state is: the data directory, from the configuration file or a flag.
#[derive(clap::Args)]
struct StateArgs {
    /// Configuration file (TOML) naming the data directory.
    #[arg(long, short, env = "XPUD_CONFIG")]
    config: Option<PathBuf>,
    /// State directory [default: xpud-data].
    #[arg(long, env = "XPUD_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl StateArgs {
    fn store(&self) -> anyhow::Result<xpud::store::Store> {
        Ok(self.open()?.1)
    }

    fn open(&self) -> anyhow::Result<(ServeConfig, xpud::store::Store)> {
        let mut config = match &self.config {
            Some(path) => ServeConfig::from_file(path)?,
            None => ServeConfig::default(),
        };
        if let Some(dir) = &self.data_dir {
            config.data_dir = dir.clone();
        }
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("create {}", config.data_dir.display()))?;
        let store = xpud::store::Store::open(&config.data_dir.join("xpud.db"))?;
        Ok((config, store))
    }
}

#[derive(Subcommand)]
enum ClientCommand {
    /// Add a client with a new random secret, printed once: it is stored only hashed.
    Add {
        id: String,
        /// Scopes the client may ask for.
        #[arg(long, value_delimiter = ',', default_values = ["read", "write"])]
        scopes: Vec<String>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Remove a client; tokens it holds stay good until they expire.
    Remove {
        id: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// List the clients (ids and scopes; never secrets).
    List {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Read a secret from stdin and print its hash, for `[[auth.clients]]` in the
    /// configuration.
    Hash,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Add a new signing key; the previous ones keep verifying the tokens they signed
    /// until those expire.
    Rotate {
        #[command(flatten)]
        state: StateArgs,
    },
    /// List the signing keys (ids and dates; never the keys).
    List {
        #[command(flatten)]
        state: StateArgs,
    },
}

#[derive(Subcommand)]
enum PackageCommand {
    /// Build an algorithm file package (.tar.gz) from a packed algorithm plugin and
    /// print its md5, which the platform sends with the package's URL.
    Build {
        /// The package manifest (package.toml).
        #[arg(long)]
        manifest: PathBuf,
        /// The directory holding the packed plugin (NAME.wasm, NAME.toml, its assets).
        #[arg(long)]
        plugin_dir: PathBuf,
        /// The archive to write.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML); flags override it, embedded defaults fill the rest.
    #[arg(long, short, env = "XPUD_CONFIG")]
    config: Option<PathBuf>,
    /// State and cache directory [default: xpud-data].
    #[arg(long, env = "XPUD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Plugin directory [default: DATA_DIR/plugins].
    #[arg(long, env = "XPUD_PLUGIN_DIR")]
    plugin_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "XPUD_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// ONNX Runtime shared library (libonnxruntime.so) for native inference.
    #[arg(long, env = "XPUD_ONNXRUNTIME")]
    onnxruntime: Option<PathBuf>,
    /// Serve plain HTTP instead of HTTPS: for local development only.
    #[arg(long)]
    insecure_http: bool,
    /// Load drivers of simulated devices (sim-xpu): for trying xpud out, never
    /// production. Their cards are marked simulated wherever they appear.
    #[arg(long)]
    simulated_devices: bool,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Validate a plugin against the WIT contracts and print what it imports and exports.
    /// A manifest beside it (NAME.toml) is checked too, hash included.
    Check {
        /// The plugin's .wasm file.
        file: PathBuf,
    },
    /// Write NAME.wasm and NAME.toml (with the wasm's sha256) into a plugin directory.
    Pack {
        /// Manifest template: every field but sha256.
        #[arg(long)]
        manifest: PathBuf,
        /// The built component.
        #[arg(long)]
        wasm: PathBuf,
        /// Destination plugin directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Load driver NAME from a plugin directory as the server would, and print what
    /// it reports: its devices, one sample, its labels. On a new machine: does the
    /// driver see the cards, with which figures?
    Probe {
        /// The plugin directory (NAME.toml and NAME.wasm).
        #[arg(long)]
        plugin_dir: PathBuf,
        /// The driver's name.
        name: String,
        /// Also make a partition of a seventh of card 0, sample it and destroy it.
        #[arg(long)]
        partition: bool,
        /// With --partition: a process (a CUDA program running on card 0) to bind
        /// to the partition, whose usage its sample then shows, as the server binds
        /// a partition's inference worker.
        #[arg(long, requires = "partition")]
        bind_pid: Option<u32>,
        /// The NVML library to load instead of libnvidia-ml.so.1.
        #[arg(long)]
        nvml_library: Option<PathBuf>,
    },
}

/// Writes `text` and a newline to stdout. A reader that stops early (`| head`)
/// closes the pipe: that ends the output, it is not an error (`println!` would panic).
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out
        .write_all(text.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("write to stdout"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // Inherited by inference workers, which then log as this process does. Set while
    // the process has one thread.
    let format = match cli.log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    std::env::set_var("XPUD_LOG_FORMAT", format);
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Plugin(PluginCommand::Check { file }) => check(&file),
        Command::Plugin(PluginCommand::Probe {
            plugin_dir,
            name,
            partition,
            bind_pid,
            nvml_library,
        }) => probe(
            &plugin_dir,
            &name,
            partition.then_some(bind_pid),
            nvml_library,
        ),
        Command::Plugin(PluginCommand::Pack {
            manifest,
            wasm,
            out,
        }) => pack(&manifest, &wasm, &out),
        Command::Package(PackageCommand::Build {
            manifest,
            plugin_dir,
            out,
        }) => xpud::package::build(&manifest, &plugin_dir, &out)
            .map(|md5| println!("{md5}  {}", out.display())),
        Command::Openapi => print_out(&xpud::http::openapi_json()),
        Command::Client(command) => client(command),
        Command::Keys(command) => keys(command),
        Command::InferenceWorker {
            onnxruntime,
            providers,
            memory_quota_mib,
        } => xpud::runtime::worker::serve(onnxruntime, providers, memory_quota_mib),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,cranelift=warn,wasmtime=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => ServeConfig::from_file(path)?,
        None => ServeConfig::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(dir) = args.plugin_dir {
        config.plugin_dir = Some(dir);
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(library) = args.onnxruntime {
        config.inference.onnxruntime = Some(library);
    }
    if config.inference.worker.is_none() {
        // Models on a device of their own run in workers: this same executable.
        config.inference.worker = std::env::current_exe().ok();
    }
    if args.insecure_http {
        config.tls.insecure_http = true;
    }
    if args.simulated_devices {
        config.runtime.simulated_devices = true;
    }
    // Before any thread starts: it sets the process environment.
    xpud::runtime::cuda::number_devices(config.runtime.nvml_library.as_deref());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start tokio")?;
    runtime.block_on(async move {
        let server = Server::start(&config).await?;
        let scheme = if server.app.tls.is_some() {
            "https"
        } else {
            "http"
        };
        println!("xpud listening on {scheme}://{}", server.addr);
        server.run(shutdown_signal()).await
    })
}

fn client(command: ClientCommand) -> anyhow::Result<()> {
    use xpud::auth::{clients, Scope};
    match command {
        ClientCommand::Add { id, scopes, state } => {
            let scopes = scopes
                .iter()
                .map(|s| {
                    Scope::parse(s)
                        .ok_or_else(|| anyhow::anyhow!("--scopes: {s:?} is not read or write"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let secret = clients::add(&state.store()?, &id, &scopes)?;
            println!("client {id} added; its secret (shown this once):\n{secret}");
        }
        ClientCommand::Remove { id, state } => {
            if !clients::remove(&state.store()?, &id)? {
                anyhow::bail!("no client {id:?}");
            }
            println!("client {id} removed");
        }
        ClientCommand::List { state } => {
            for client in clients::list(&state.store()?)? {
                let scopes: Vec<&str> = client.scopes.iter().map(|s| s.as_str()).collect();
                println!(
                    "{}\t{}\tadded {}",
                    client.id,
                    scopes.join(","),
                    xpud::dates::format_ms(client.created_ms as u64)
                );
            }
        }
        ClientCommand::Hash => {
            let mut secret = String::new();
            std::io::stdin()
                .read_line(&mut secret)
                .context("read the secret from stdin")?;
            let secret = secret.trim_end_matches(['\r', '\n']);
            if secret.is_empty() {
                anyhow::bail!("no secret on stdin");
            }
            println!("{}", clients::hash_secret(secret)?);
        }
    }
    Ok(())
}

fn keys(command: KeysCommand) -> anyhow::Result<()> {
    use xpud::auth::keys;
    match command {
        KeysCommand::Rotate { state } => {
            let (config, store) = state.open()?;
            // Older keys outlive the tokens they signed: the configured lifetime.
            let ttl = std::time::Duration::from_secs(config.auth.token_ttl_s);
            let kid = keys::rotate(&store, ttl)?;
            println!("signing key {kid} added; a running server signs with it within seconds");
        }
        KeysCommand::List { state } => {
            for key in keys::list(&state.store()?)? {
                let retires = key
                    .retire_at_ms
                    .map(|ms| format!("retires {}", xpud::dates::format_ms(ms as u64)))
                    .unwrap_or_else(|| "signing".into());
                println!(
                    "{}\tcreated {}\t{retires}",
                    key.kid,
                    xpud::dates::format_ms(key.created_ms as u64)
                );
            }
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

fn check(file: &Path) -> anyhow::Result<()> {
    let mut report = String::new();
    let result = check_into(file, &mut report);
    let _ = std::io::Write::write_all(&mut std::io::stdout(), report.as_bytes());
    result
}

/// Appends a line to the `plugin check` report.
macro_rules! out {
    ($report:expr, $($arg:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($report, $($arg)*);
    }};
}

/// A runtime for a one-off command on a few plugins: no compile cache, and no
/// model is ever loaded (the inference interface is linked, not used).
fn command_runtime(
    max_memory_bytes: usize,
    nvml_library: Option<PathBuf>,
) -> anyhow::Result<std::sync::Arc<Runtime>> {
    Runtime::new(RuntimeOptions {
        cache_dir: None,
        max_instances: 4,
        max_memory_bytes,
        inference: InferenceOptions {
            library: None,
            providers: vec![],
            batching: Default::default(),
            worker: None,
        },
        limits: PluginLimits::default(),
        nvml_library,
    })
}

/// `partition`: make one, binding the process given to it, if any.
fn probe(
    plugin_dir: &Path,
    name: &str,
    partition: Option<Option<u32>>,
    nvml_library: Option<PathBuf>,
) -> anyhow::Result<()> {
    use xpud::plugins::registry::{Registry, RegistryOptions};
    use xpud::runtime::bindings::driver_types::{Isolation, PartitionSpec, Slicing};
    let defaults = ServeConfig::default();
    let runtime = command_runtime(256 << 20, nvml_library)?;
    let nvml = runtime.nvml().clone();
    let registry = Registry::new(
        runtime,
        RegistryOptions {
            plugin_dir: plugin_dir.to_path_buf(),
            grant_root: defaults.runtime.grant_root.clone(),
            allowed_grants: defaults.runtime.allowed_grants.clone(),
            restart: defaults.restart.clone(),
            // A probe says what a driver reports, simulated or not.
            simulated_devices: true,
        },
    )?;
    registry.scan();
    let Some(plugin) = registry.get(name) else {
        let why = registry
            .views()
            .into_iter()
            .find(|v| v.name == name)
            .and_then(|v| v.refused)
            .unwrap_or_else(|| format!("no {name}.toml in {}", plugin_dir.display()));
        bail!("driver {name} did not load: {why}");
    };
    let Some(driver) = plugin.driver() else {
        bail!("{name} is not a driver");
    };
    print_out(&format!("info:     {:?}", driver.info()))?;
    let devices = driver.devices()?;
    for device in devices.iter() {
        print_out(&format!("device:   {device:?}"))?;
    }
    let sample = driver.sample()?.metrics;
    for card in &sample.cards {
        print_out(&format!("card:     {card:?}"))?;
    }
    for instance in &sample.instances {
        print_out(&format!("instance: {instance:?}"))?;
    }
    for label in driver.labels()? {
        print_out(&format!("label:    {}={}", label.key, label.value))?;
    }
    // Where `xpud serve` would run models placed on each NVIDIA card.
    if let Ok(nvml) = nvml.get() {
        let plan = xpud::runtime::cuda::plan(
            &xpud::runtime::cuda::cards(nvml).map_err(anyhow::Error::msg)?,
        );
        for (index, ordinal) in plan.ordinals.iter().enumerate() {
            let device = ordinal.map_or_else(
                || "none: in MIG mode, models run in their MIG instance's worker".to_string(),
                |o| format!("CUDA device {o}"),
            );
            print_out(&format!("cuda:     card {index} -> {device}"))?;
        }
        if let Some(visible) = plan.visible {
            print_out(&format!("cuda:     CUDA_VISIBLE_DEVICES={visible:?}"))?;
        }
    }
    if let Some(bind_pid) = partition {
        let Some(card) = devices.first() else {
            bail!("no device to make a partition on");
        };
        let spec = PartitionSpec {
            device_index: card.index,
            isolation: Isolation::Soft,
            slicing: Slicing::Time,
            memory_quota_mib: card.memory_total_mib.unwrap_or(1024) / 8,
            compute_share_pct: 14,
        };
        let made = driver.create_partition(spec)?;
        print_out(&format!("made:     {made:?}"))?;
        // Where its replicas' models would run: a partition whose device the
        // driver names has a worker, measured by its process.
        let models = match driver.partition_device(&made.id)? {
            Some(name) => format!("in a worker shown {name} alone, measured by its process"),
            None => "in xpud's process, on the card".to_string(),
        };
        print_out(&format!("models:   {models}"))?;
        if let Some(pid) = bind_pid {
            let bound = match driver.bind_process(&made.id, pid) {
                Ok(()) => format!("process {pid} does the partition's work"),
                Err(e) => format!("process {pid} not bound: {e}"),
            };
            print_out(&format!("bound:    {bound}"))?;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        for instance in driver.sample()?.metrics.instances {
            print_out(&format!("instance: {instance:?}"))?;
        }
        driver.destroy_partition(&made.id)?;
        print_out(&format!(
            "left:     {} partitions after destroying {}",
            driver.partitions()?.len(),
            made.id
        ))?;
    }
    Ok(())
}

fn check_into(file: &Path, report_out: &mut String) -> anyhow::Result<()> {
    let wasm = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    let sha256 = hex::encode(Sha256::digest(&wasm));
    let runtime = command_runtime(64 << 20, None)?;
    let (component, report) = runtime
        .load_component(&wasm, &sha256)
        .context("not a valid WebAssembly component")?;
    out!(
        report_out,
        "file:     {} ({} bytes)",
        file.display(),
        wasm.len()
    );
    out!(report_out, "sha256:   {sha256}");
    out!(
        report_out,
        "compile:  {:.1} ms",
        report.took.as_secs_f64() * 1000.0
    );
    let inspection = inspect(runtime.engine(), &component)?;
    out!(
        report_out,
        "world:    {:?} (xpu:plugin@{})",
        inspection.kind,
        inspection.api
    );
    for name in &inspection.exports {
        out!(report_out, "export:   {name}");
    }
    for name in &inspection.imports {
        out!(report_out, "import:   {name}");
    }
    let pre = runtime
        .linker()
        .instantiate_pre(&component)
        .map_err(anyhow::Error::from)
        .context("does not link against this host")?;
    out!(
        report_out,
        "links:    ok (every import is provided by this host)"
    );
    // The same typed check the server makes at load: the world's export must have
    // the contract's exact signatures, not only the right name.
    let typed = match inspection.kind {
        Kind::Driver => DriverPre::new(inspection.bindings, pre).map(drop),
        Kind::Algorithm => AlgorithmPre::new(inspection.bindings, pre).map(drop),
    };
    typed.map_err(anyhow::Error::from).with_context(|| {
        format!(
            "its {} export does not match the contract",
            inspection.kind.export_interface()
        )
    })?;
    out!(
        report_out,
        "exports:  ok ({} matches the contract)",
        inspection.kind.export_interface()
    );
    let manifest_path = file.with_extension("toml");
    if manifest_path.exists() {
        let manifest = Manifest::read(&manifest_path)?;
        if manifest.sha256 != sha256 {
            bail!(
                "manifest {} pins sha256 {}, the file hashes to {sha256}",
                manifest_path.display(),
                manifest.sha256
            );
        }
        if manifest.kind != inspection.kind {
            bail!(
                "manifest {} says kind {:?}, the component is a {:?}",
                manifest_path.display(),
                manifest.kind,
                inspection.kind
            );
        }
        out!(report_out, "manifest: {} ok", manifest_path.display());
    }
    Ok(())
}

fn pack(template: &Path, wasm_path: &Path, out: &Path) -> anyhow::Result<()> {
    let wasm = std::fs::read(wasm_path).with_context(|| format!("read {}", wasm_path.display()))?;
    let sha256 = hex::encode(Sha256::digest(&wasm));
    let text = std::fs::read_to_string(template)
        .with_context(|| format!("read {}", template.display()))?;
    let mut table: toml::Table = xpud::toml_input::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", template.display()))?;
    table.insert("sha256".into(), toml::Value::String(sha256));
    let text = toml::to_string(&table)?;
    let manifest = Manifest::parse(&text, &template.display().to_string())?;
    std::fs::create_dir_all(out)?;
    // The wasm first, the manifest last: a watcher sees a complete pair only once
    // the manifest that pins it lands.
    let wasm_out = out.join(format!("{}.wasm", manifest.name));
    let toml_out = out.join(format!("{}.toml", manifest.name));
    write_atomically(&wasm_out, &wasm)?;
    write_atomically(&toml_out, text.as_bytes())?;
    println!("{} {}", manifest.name, manifest.version);
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}
