//! TLS on every interface (§9), with rustls only.
//!
//! The server certificate comes from configured PEM files or, when none are
//! configured, from a local CA that xpud creates in `DATA_DIR/tls` on first start:
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key` | the local CA: clients trust `ca.pem` |
//! | `server.pem`, `server.key` | this xpud's certificate, for its names and addresses (reissued at each start) |
//!
//! xpud authorises clients by OAuth2 token (§9), not by certificate: it checks no
//! client certificate, so it issues and hands out none (A.6 carries the CA only).
//! Every file is written 0600 in a 0700 directory. The served certificate files are
//! watched: replaced on disk, they are served from the next handshake on; files
//! that do not load leave the previous certificate in place (and say why in the log).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::sync::{read, write};

/// How often the served certificate files are checked for replacement.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// `[tls]` in the configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsConfig {
    /// Serve plain HTTP instead: for local development only, and logged loudly.
    pub insecure_http: bool,
    /// The server's certificate chain (PEM), leaf first; with `key`. Neither: a
    /// local CA in the data directory issues one.
    pub cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    pub key: Option<PathBuf>,
    /// The CA clients should trust, handed out by A.6 when `cert` is configured.
    pub ca: Option<PathBuf>,
}

impl TlsConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.cert.is_some() != self.key.is_some() {
            bail!("tls.cert and tls.key: give both or neither");
        }
        Ok(())
    }
}

/// The certificate being served, and where it comes from.
pub struct Tls {
    resolver: Arc<ReloadingCert>,
    server_config: Arc<rustls::ServerConfig>,
    /// The CA clients trust, if known.
    ca: Option<PathBuf>,
}

impl Tls {
    /// Loads the configured certificate, or creates or reuses the local CA and issues
    /// this server's certificate for `names` and `addresses`.
    pub fn prepare(
        config: &TlsConfig,
        data_dir: &Path,
        names: &[String],
        addresses: &[IpAddr],
    ) -> anyhow::Result<Tls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (cert, key, ca) = match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone(), config.ca.clone()),
            _ => {
                let local = LocalCa::open_or_create(&data_dir.join("tls"))?;
                local.issue_server(names, addresses)?;
                (
                    local.path("server.pem"),
                    local.path("server.key"),
                    Some(local.path("ca.pem")),
                )
            }
        };
        let resolver = Arc::new(ReloadingCert::load(cert, key, provider.clone())?);
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            resolver,
            server_config: Arc::new(server_config),
            ca,
        })
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server_config.clone())
    }

    /// The CA certificate file clients should trust, if xpud knows it.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// The CA certificate clients trust, as it is on disk now (PEM); none when xpud
    /// is not told which CA signed a configured certificate. A CA file that cannot
    /// be read is an error, never an empty answer.
    pub fn ca_pem(&self) -> anyhow::Result<Option<String>> {
        self.ca
            .as_deref()
            .map(|path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("read the CA certificate {}", path.display()))
            })
            .transpose()
    }

    /// Watches the served certificate files and swaps them in when replaced.
    pub fn spawn_reloader(&self) -> tokio::task::JoinHandle<()> {
        let resolver = self.resolver.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(RELOAD_CHECK);
            loop {
                ticks.tick().await;
                let resolver = resolver.clone();
                // A reload that panicked must be seen: the old certificate keeps
                // serving, and the operator needs to know why the new one does not.
                if let Err(e) =
                    tokio::task::spawn_blocking(move || resolver.reload_if_changed()).await
                {
                    tracing::error!(
                        "certificate reload failed: {e}; the old certificate keeps serving"
                    );
                }
            }
        })
    }
}

/// The served certificate, swapped when its files change.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>)>,
}

impl ReloadingCert {
    fn load(cert: PathBuf, key: PathBuf, provider: Arc<CryptoProvider>) -> anyhow::Result<Self> {
        let stamp = modified(&cert, &key);
        let certified = certified_key(&cert, &key, &provider)?;
        Ok(ReloadingCert {
            cert,
            key,
            provider,
            current: RwLock::new((certified, stamp)),
        })
    }

    fn reload_if_changed(&self) {
        let stamp = modified(&self.cert, &self.key);
        if stamp == read(&self.current).1 {
            return;
        }
        match certified_key(&self.cert, &self.key, &self.provider) {
            Ok(certified) => {
                *write(&self.current) = (certified, stamp);
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                // Half-written files are common mid-replacement: try again at the next
                // check, keep serving the previous certificate meanwhile.
                write(&self.current).1 = stamp;
                tracing::error!(cert = %self.cert.display(), "TLS certificate not reloaded, the previous one stays: {e:#}");
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(read(&self.current).0.clone())
    }
}

/// The later of the two files' modification times.
fn modified(cert: &Path, key: &Path) -> Option<SystemTime> {
    let time = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    time(cert).max(time(key))
}

fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("read certificate chain {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{}: no certificate in it", cert.display());
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("read private key {}", key.display()))?;
    let certified = CertifiedKey::from_der(chain, private, provider).with_context(|| {
        format!(
            "{} and {} do not make a certificate and its key",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Arc::new(certified))
}

/// The local CA in `DATA_DIR/tls`.
struct LocalCa {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

/// The CA's identity: the same every time, so that certificates issued after a
/// restart chain to the `ca.pem` clients already trust.
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "xpud local CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

impl LocalCa {
    fn open_or_create(dir: &Path) -> anyhow::Result<LocalCa> {
        create_private_dir(dir)?;
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let key = if key_path.exists() && cert_path.exists() {
            let pem = std::fs::read_to_string(&key_path)
                .with_context(|| format!("read {}", key_path.display()))?;
            KeyPair::from_pem(&pem).with_context(|| format!("{}", key_path.display()))?
        } else {
            let key = KeyPair::generate()?;
            let cert = ca_params()?.self_signed(&key)?;
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            write_private(&cert_path, cert.pem().as_bytes())?;
            tracing::info!(ca = %cert_path.display(), "created a local certificate authority: clients trust this file");
            key
        };
        Ok(LocalCa {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(ca_params()?, key),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A fresh server certificate for this start's names and addresses.
    fn issue_server(&self, names: &[String], addresses: &[IpAddr]) -> anyhow::Result<()> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params
            .subject_alt_names
            .extend(addresses.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().map_or("xpud", |n| n.as_str()),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        self.issue(params, "server")
    }

    /// Writes NAME.key then NAME.pem: the watcher sees the pair complete when the
    /// certificate lands.
    fn issue(&self, params: CertificateParams, name: &str) -> anyhow::Result<()> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        write_private(
            &self.path(&format!("{name}.key")),
            key.serialize_pem().as_bytes(),
        )?;
        write_private(&self.path(&format!("{name}.pem")), cert.pem().as_bytes())
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restrict {}", dir.display()))
}

/// Writes a file only its owner can read, atomically (a temporary file renamed).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("create {}", temporary.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_local_ca_is_created_once_private_and_reused() {
        let data = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string()];
        let addresses = [IpAddr::from([127, 0, 0, 1])];
        let tls = Tls::prepare(&TlsConfig::default(), data.path(), &names, &addresses).unwrap();
        let first = tls.ca_pem().unwrap().unwrap();
        assert!(first.starts_with("-----BEGIN CERTIFICATE-----"));
        for name in ["ca.pem", "ca.key", "server.pem", "server.key"] {
            let mode = std::fs::metadata(data.path().join("tls").join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let again = Tls::prepare(&TlsConfig::default(), data.path(), &names, &addresses).unwrap();
        assert_eq!(again.ca_pem().unwrap().unwrap(), first);
        // No client pair: nothing checks one.
        assert!(!data.path().join("tls/client.key").exists());
        // A CA file that cannot be read is an error, not "".
        std::fs::remove_file(data.path().join("tls/ca.pem")).unwrap();
        let error = again.ca_pem().unwrap_err();
        assert!(format!("{error:#}").contains("ca.pem"), "{error:#}");
    }

    #[test]
    fn a_cert_without_its_key_is_a_configuration_error() {
        let config = TlsConfig {
            cert: Some("server.pem".into()),
            ..Default::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("tls.key"));
    }
}
