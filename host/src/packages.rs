//! Algorithm file packages and algorithms (Appendix E), as the platform pushes them.
//!
//! A push records the package as `downloading` and returns; a background task
//! fetches it (size-limited, time-limited, md5-checked), unpacks it into a staging
//! directory, verifies and compiles its plugin, and only then renames it into place
//! and marks it `ready`. Any failure removes what was written and marks it `failed`
//! with the reason. An algorithm is a small JSON document naming the file package it
//! runs (`{"relatedAlgoFilePackageId": "..."}`), or itself a package archive (the
//! standard never says which): then the archive is installed as a file package
//! under the algorithm's id, bundled with it, and deleted with it.
//!
//! Layout under the data directory: `packages/files/<id>/` (unpacked packages) and
//! `packages/incoming/` (downloads and staging, cleared at start).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fetch::{self, Limits};
use crate::package::{self, PackageManifest};
use crate::plugins::registry::Plugin;
use crate::plugins::{Kind, Registry};
use crate::store::{Store, Table};

/// Status as the text's integer: 0 ready, 1 downloading, 2 failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Status {
    Ready,
    Downloading,
    Failed,
}

impl From<Status> for u8 {
    fn from(status: Status) -> u8 {
        match status {
            Status::Ready => 0,
            Status::Downloading => 1,
            Status::Failed => 2,
        }
    }
}

impl TryFrom<u8> for Status {
    type Error = String;
    fn try_from(value: u8) -> std::result::Result<Status, String> {
        match value {
            0 => Ok(Status::Ready),
            1 => Ok(Status::Downloading),
            2 => Ok(Status::Failed),
            other => Err(format!("unknown package status {other}")),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FilePackage {
    pub id: String,
    /// Empty when the push carried none (I.2): the plugin's pinned sha256 still holds.
    pub md5: String,
    pub url: String,
    pub status: Status,
    /// Why it failed, or what it is doing.
    pub status_desc: String,
    pub manifest: Option<PackageManifest>,
    pub created_ms: u64,
    /// The algorithm whose own archive this package is (E.6 pushed an archive, not
    /// a document): it is deleted with that algorithm.
    #[serde(default)]
    pub bundled_with: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Algorithm {
    pub id: String,
    pub md5: String,
    pub url: String,
    pub status: Status,
    pub status_desc: String,
    pub file_package_id: Option<String>,
    pub created_ms: u64,
}

/// The algorithm document an algorithm URL serves.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AlgorithmDocument {
    related_algo_file_package_id: String,
}

/// Largest algorithm document.
const MAX_ALGORITHM_BYTES: u64 = 64 * 1024;

#[derive(Default)]
struct State {
    files: Vec<FilePackage>,
    algorithms: Vec<Algorithm>,
    /// Plugins of ready file packages, by package id.
    plugins: HashMap<String, Arc<Plugin>>,
}

pub struct Packages {
    store: Arc<Store>,
    registry: Arc<Registry>,
    root: PathBuf,
    limits: Limits,
    state: RwLock<State>,
}

/// Ids become file names: 1-128 characters, no path separators, no control or
/// blank characters, no leading dot. (The text's own ids look like
/// `7a90a32d-8ae8-4ffa-b000-07ef71058bab` and `MEGCITY:3843938347`.)
fn check_id(field: &str, id: &str) -> Result<()> {
    if id.is_empty()
        || id.chars().count() > 128
        || id.starts_with('.')
        || id
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control() || c.is_whitespace())
    {
        return Err(Error::Invalid(format!(
            "{field} {id:?}: 1-128 characters, no '/', '\\', blanks or control characters, no leading '.'"
        )));
    }
    Ok(())
}

/// An empty md5 is "not given" (the text's own E.6 example sends `""`): accepted,
/// and the log says the download will not be checked.
fn check_push(id: &str, md5: &str, url: &str) -> Result<()> {
    check_id("id", id)?;
    if !md5.is_empty() && !fetch::valid_md5(md5) {
        return Err(Error::Invalid(format!(
            "md5 {md5:?}: 32 hex digits, or empty"
        )));
    }
    fetch::check_url(url).map_err(Error::Invalid)?;
    if md5.is_empty() {
        tracing::warn!(
            id,
            "pushed without an md5: the download will not be checked"
        );
    }
    Ok(())
}

impl Packages {
    /// Loads the records and the plugins of ready packages. Downloads that a restart
    /// interrupted are marked failed.
    pub fn load(
        store: Arc<Store>,
        registry: Arc<Registry>,
        root: &Path,
        limits: Limits,
    ) -> anyhow::Result<Packages> {
        let incoming = root.join("incoming");
        let _ = std::fs::remove_dir_all(&incoming);
        std::fs::create_dir_all(&incoming)?;
        std::fs::create_dir_all(root.join("files"))?;
        let packages = Packages {
            store,
            registry,
            root: root.to_path_buf(),
            limits,
            state: RwLock::new(State::default()),
        };
        let mut files: Vec<FilePackage> = packages
            .store
            .load(Table::FilePackages)?
            .into_iter()
            .map(|(_, f)| f)
            .collect();
        let mut algorithms: Vec<Algorithm> = packages
            .store
            .load(Table::Algorithms)?
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        let mut plugins = HashMap::new();
        for file in &mut files {
            match file.status {
                Status::Downloading => {
                    file.status = Status::Failed;
                    file.status_desc =
                        "the download was interrupted by a restart; push it again".into();
                    packages.store.put(Table::FilePackages, &file.id, &*file)?;
                }
                Status::Ready => match packages.load_plugin(file) {
                    Ok(plugin) => {
                        plugins.insert(file.id.clone(), plugin);
                    }
                    Err(e) => {
                        file.status = Status::Failed;
                        file.status_desc = format!("cannot load its plugin: {e:#}");
                        tracing::error!(package = %file.id, "{}", file.status_desc);
                        packages.store.put(Table::FilePackages, &file.id, &*file)?;
                    }
                },
                Status::Failed => {}
            }
        }
        for algorithm in &mut algorithms {
            if algorithm.status == Status::Downloading {
                algorithm.status = Status::Failed;
                algorithm.status_desc =
                    "the download was interrupted by a restart; push it again".into();
                packages
                    .store
                    .put(Table::Algorithms, &algorithm.id, &*algorithm)?;
            }
        }
        *packages.write() = State {
            files,
            algorithms,
            plugins,
        };
        Ok(packages)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        crate::sync::read(&self.state)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        crate::sync::write(&self.state)
    }

    fn package_dir(&self, id: &str) -> PathBuf {
        self.root.join("files").join(id)
    }

    fn load_plugin(&self, file: &FilePackage) -> anyhow::Result<Arc<Plugin>> {
        let manifest = file
            .manifest
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no manifest recorded"))?;
        let dir = self.package_dir(&file.id).join(package::PLUGIN_DIR);
        let plugin = self.registry.load_bundle(&dir, &manifest.package.plugin)?;
        if plugin.manifest.kind != Kind::Algorithm {
            anyhow::bail!("plugin {} is not an algorithm", manifest.package.plugin);
        }
        Ok(plugin)
    }

    pub fn files(&self) -> Vec<FilePackage> {
        self.read().files.clone()
    }

    pub fn file(&self, id: &str) -> Result<FilePackage> {
        self.read()
            .files
            .iter()
            .find(|f| f.id == id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no algorithm file package {id:?}")))
    }

    pub fn package_path(&self, id: &str) -> PathBuf {
        self.package_dir(id)
    }

    pub fn algorithms(&self) -> Vec<Algorithm> {
        self.read().algorithms.clone()
    }

    pub fn algorithm(&self, id: &str) -> Result<Algorithm> {
        self.read()
            .algorithms
            .iter()
            .find(|a| a.id == id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no algorithm {id:?}")))
    }

    /// The plugin of a ready file package.
    pub fn plugin_of_file(&self, id: &str) -> Option<Arc<Plugin>> {
        self.read().plugins.get(id).cloned()
    }

    /// The plugin an algorithm runs, if it is ready.
    pub fn plugin_of_algorithm(&self, id: &str) -> Result<Arc<Plugin>> {
        let algorithm = self.algorithm(id)?;
        let file_id = match (algorithm.status, &algorithm.file_package_id) {
            (Status::Ready, Some(file_id)) => file_id.clone(),
            _ => {
                return Err(Error::Conflict(format!(
                    "algorithm {id} is not ready: {}",
                    algorithm.status_desc
                )))
            }
        };
        self.read().plugins.get(&file_id).cloned().ok_or_else(|| {
            Error::Conflict(format!(
                "algorithm {id}: file package {file_id} is not ready"
            ))
        })
    }

    /// E.2: records the push; the caller runs [`Packages::install_file`] next.
    pub fn push_file(&self, id: &str, md5: &str, url: &str) -> Result<()> {
        check_push(id, md5, url)?;
        self.record_file(id, md5, url)
    }

    /// I.2: a package the platform serves at `url`, with no md5 to check.
    pub fn push_file_unchecked(&self, id: &str, url: &str) -> Result<()> {
        check_id("algoFilePackageId", id)?;
        fetch::check_url(url).map_err(Error::Invalid)?;
        self.record_file(id, "", url)
    }

    fn record_file(&self, id: &str, md5: &str, url: &str) -> Result<()> {
        let mut state = self.write();
        if let Some(existing) = state.files.iter().find(|f| f.id == id) {
            if existing.status != Status::Failed {
                return Err(Error::Conflict(format!(
                    "algorithm file package {id} already exists; delete it first"
                )));
            }
        }
        let record = FilePackage {
            id: id.to_string(),
            md5: md5.to_ascii_lowercase(),
            url: url.to_string(),
            status: Status::Downloading,
            status_desc: "downloading".into(),
            manifest: None,
            created_ms: crate::dates::now_ms(),
            bundled_with: None,
        };
        self.store.put(Table::FilePackages, id, &record)?;
        state.files.retain(|f| f.id != id);
        state.files.push(record);
        Ok(())
    }

    /// Downloads, unpacks, verifies and installs a pushed file package.
    pub async fn install_file(self: Arc<Self>, id: String) {
        let Ok(record) = self.file(&id) else { return };
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let archive = self
            .root
            .join("incoming")
            .join(format!("{id}-{nonce}.tar.gz"));
        let outcome = match fetch::download(
            &record.url,
            (!record.md5.is_empty()).then_some(record.md5.as_str()),
            &archive,
            &self.limits,
        )
        .await
        {
            Err(reason) => Err(reason),
            Ok(()) => {
                let packages = self.clone();
                let (id, archive) = (id.clone(), archive.clone());
                tokio::task::spawn_blocking(move || packages.unpack_and_load(&id, &archive, &nonce))
                    .await
                    .unwrap_or_else(|e| Err(format!("install task failed: {e}")))
            }
        };
        let _ = std::fs::remove_file(&archive);
        self.finish_file(&id, outcome);
    }

    fn unpack_and_load(
        &self,
        id: &str,
        archive: &Path,
        nonce: &str,
    ) -> std::result::Result<(PackageManifest, Arc<Plugin>), String> {
        let staging = self.root.join("incoming").join(format!("{id}-{nonce}"));
        let dest = self.package_dir(id);
        let result = (|| {
            let manifest = package::unpack(archive, &staging, self.limits.max_bytes)
                .map_err(|e| format!("{e:#}"))?;
            let code_taken = self.read().files.iter().any(|f| {
                f.id != id
                    && f.manifest
                        .as_ref()
                        .is_some_and(|m| m.package.code == manifest.package.code)
            });
            if code_taken {
                return Err(format!(
                    "package code {} is used by another package",
                    manifest.package.code
                ));
            }
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::rename(&staging, &dest)
                .map_err(|e| format!("install into {}: {e}", dest.display()))?;
            // Loaded from its final place, so that its asset paths point there.
            let plugin = self
                .registry
                .load_bundle(&dest.join(package::PLUGIN_DIR), &manifest.package.plugin)
                .map_err(|e| format!("plugin {}: {e:#}", manifest.package.plugin))?;
            if plugin.manifest.kind != Kind::Algorithm {
                return Err(format!(
                    "plugin {} is not an algorithm",
                    manifest.package.plugin
                ));
            }
            Ok((manifest, plugin))
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&staging);
            let _ = std::fs::remove_dir_all(&dest);
        }
        result
    }

    fn finish_file(
        &self,
        id: &str,
        outcome: std::result::Result<(PackageManifest, Arc<Plugin>), String>,
    ) {
        let mut state = self.write();
        let Some(record) = state.files.iter_mut().find(|f| f.id == id) else {
            return;
        };
        let plugin = match outcome {
            Ok((manifest, plugin)) => {
                tracing::info!(package = %id, code = %manifest.package.code, "algorithm file package installed");
                record.status = Status::Ready;
                record.status_desc = "ready".into();
                record.manifest = Some(manifest);
                Some(plugin)
            }
            Err(reason) => {
                tracing::warn!(package = %id, "algorithm file package failed: {reason}");
                record.status = Status::Failed;
                record.status_desc = reason;
                None
            }
        };
        let record = record.clone();
        if let Err(e) = self.store.put(Table::FilePackages, id, &record) {
            tracing::error!(package = %id, "cannot record the package's state: {e:#}");
        }
        match plugin {
            Some(plugin) => {
                state.plugins.insert(id.to_string(), plugin);
            }
            None => {
                state.plugins.remove(id);
            }
        }
    }

    /// E.3 / I.3: refused while it downloads, while an algorithm uses it, or while
    /// `in_use` names another user (an installed machine package).
    pub fn delete_file(&self, id: &str, in_use: Option<String>) -> Result<()> {
        if let Some(user) = in_use {
            return Err(Error::Conflict(format!(
                "algorithm file package {id} is used by {user}"
            )));
        }
        let mut state = self.write();
        let record = state
            .files
            .iter()
            .find(|f| f.id == id)
            .ok_or_else(|| Error::NotFound(format!("no algorithm file package {id:?}")))?;
        if record.status == Status::Downloading {
            return Err(Error::Conflict(format!(
                "algorithm file package {id} is still downloading"
            )));
        }
        if let Some(user) = state
            .algorithms
            .iter()
            .find(|a| a.file_package_id.as_deref() == Some(id))
        {
            return Err(Error::Conflict(format!(
                "algorithm file package {id} is used by algorithm {}",
                user.id
            )));
        }
        self.forget_file(&mut state, id)
    }

    /// Removes a file package: its record, its plugin and its directory.
    fn forget_file(&self, state: &mut State, id: &str) -> Result<()> {
        self.store.delete(Table::FilePackages, id)?;
        state.files.retain(|f| f.id != id);
        state.plugins.remove(id);
        let _ = std::fs::remove_dir_all(self.package_dir(id));
        Ok(())
    }

    /// E.6: records the push; the caller runs [`Packages::install_algorithm`] next.
    pub fn push_algorithm(&self, id: &str, md5: &str, url: &str) -> Result<()> {
        check_push(id, md5, url)?;
        let mut state = self.write();
        if let Some(existing) = state.algorithms.iter().find(|a| a.id == id) {
            if existing.status != Status::Failed {
                return Err(Error::Conflict(format!(
                    "algorithm {id} already exists; delete it first"
                )));
            }
        }
        let record = Algorithm {
            id: id.to_string(),
            md5: md5.to_ascii_lowercase(),
            url: url.to_string(),
            status: Status::Downloading,
            status_desc: "downloading".into(),
            file_package_id: None,
            created_ms: crate::dates::now_ms(),
        };
        self.store.put(Table::Algorithms, id, &record)?;
        state.algorithms.retain(|a| a.id != id);
        state.algorithms.push(record);
        Ok(())
    }

    /// Downloads an algorithm and links it to its (ready) file package: the one its
    /// document names, or the archive it is itself, installed under its id.
    pub async fn install_algorithm(self: Arc<Self>, id: String) {
        let Ok(record) = self.algorithm(&id) else {
            return;
        };
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let path = self
            .root
            .join("incoming")
            .join(format!("{id}-{nonce}.download"));
        // An archive may be as large as any package; a document is checked below.
        let md5 = (!record.md5.is_empty()).then_some(record.md5.as_str());
        let outcome = match fetch::download(&record.url, md5, &path, &self.limits).await {
            Err(reason) => Err(reason),
            Ok(()) if is_gzip(&path) => self.clone().install_bundled(&record, &path, &nonce).await,
            Ok(()) => self.document_target(&path),
        };
        let _ = std::fs::remove_file(&path);
        let mut state = self.write();
        let Some(record) = state.algorithms.iter_mut().find(|a| a.id == id) else {
            return;
        };
        match outcome {
            Ok(file_id) => {
                record.status = Status::Ready;
                record.status_desc = "ready".into();
                record.file_package_id = Some(file_id);
            }
            Err(reason) => {
                tracing::warn!(algorithm = %id, "algorithm failed: {reason}");
                record.status = Status::Failed;
                record.status_desc = reason;
            }
        }
        let record = record.clone();
        if let Err(e) = self.store.put(Table::Algorithms, &id, &record) {
            tracing::error!(algorithm = %id, "cannot record the algorithm's state: {e:#}");
        }
    }

    /// The file package that came in algorithm `id`'s own archive, if any.
    pub fn bundled_package(&self, id: &str) -> Option<String> {
        bundled_in(&self.read(), id)
    }

    /// The file package an algorithm document names, if it is ready.
    fn document_target(&self, path: &Path) -> std::result::Result<String, String> {
        // The download was allowed a package's size: measured before it is read.
        let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
        if size > MAX_ALGORITHM_BYTES {
            return Err(format!(
                "the algorithm is neither a package archive (gzip) nor a document of at most \
                 {MAX_ALGORITHM_BYTES} bytes"
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let doc = serde_json::from_slice::<AlgorithmDocument>(&bytes)
            .map_err(|e| format!("the algorithm document is not valid: {e}"))?;
        match self.file(&doc.related_algo_file_package_id) {
            Ok(file) if file.status == Status::Ready => Ok(file.id),
            Ok(file) => Err(format!(
                "its file package {} is not ready: {}",
                file.id, file.status_desc
            )),
            Err(_) => Err(format!(
                "its file package {} is not installed",
                doc.related_algo_file_package_id
            )),
        }
    }

    /// Installs an algorithm's own archive as the file package of the same id.
    async fn install_bundled(
        self: Arc<Self>,
        algorithm: &Algorithm,
        archive: &Path,
        nonce: &str,
    ) -> std::result::Result<String, String> {
        let id = algorithm.id.clone();
        {
            let mut state = self.write();
            if let Some(other) = state.files.iter().find(|f| f.id == id) {
                if other.bundled_with.as_deref() != Some(id.as_str()) {
                    return Err(format!(
                        "the algorithm is a package archive, installed under its own id, and \
                         file package {id} exists already"
                    ));
                }
            }
            let record = FilePackage {
                id: id.clone(),
                md5: algorithm.md5.clone(),
                url: algorithm.url.clone(),
                status: Status::Downloading,
                status_desc: "installing the algorithm's own archive".into(),
                manifest: None,
                created_ms: crate::dates::now_ms(),
                bundled_with: Some(id.clone()),
            };
            self.store
                .put(Table::FilePackages, &id, &record)
                .map_err(|e| format!("cannot record its package: {e:#}"))?;
            state.files.retain(|f| f.id != id);
            state.files.push(record);
        }
        let packages = self.clone();
        let (owned_id, archive, nonce) = (id.clone(), archive.to_path_buf(), nonce.to_string());
        let outcome = tokio::task::spawn_blocking(move || {
            packages.unpack_and_load(&owned_id, &archive, &nonce)
        })
        .await
        .unwrap_or_else(|e| Err(format!("install task failed: {e}")));
        match outcome {
            Ok(installed) => {
                self.finish_file(&id, Ok(installed));
                Ok(id)
            }
            Err(reason) => {
                // Nothing of a failed bundle stays behind: the algorithm says why.
                if let Err(e) = self.forget_file(&mut self.write(), &id) {
                    tracing::error!(algorithm = %id, "cannot remove its failed package: {e}");
                }
                Err(format!("its package archive: {reason}"))
            }
        }
    }

    /// E.7. `in_use` names what still uses it (a service), if anything. A package
    /// that came bundled in the algorithm's archive goes with it.
    pub fn delete_algorithm(&self, id: &str, in_use: Option<String>) -> Result<()> {
        let mut state = self.write();
        let record = state
            .algorithms
            .iter()
            .find(|a| a.id == id)
            .ok_or_else(|| Error::NotFound(format!("no algorithm {id:?}")))?;
        if record.status == Status::Downloading {
            return Err(Error::Conflict(format!(
                "algorithm {id} is still downloading"
            )));
        }
        if let Some(user) = in_use {
            return Err(Error::Conflict(format!("algorithm {id} is used by {user}")));
        }
        let bundled = bundled_in(&state, id);
        self.store.delete(Table::Algorithms, id)?;
        state.algorithms.retain(|a| a.id != id);
        match bundled {
            Some(file) => self.forget_file(&mut state, &file),
            None => Ok(()),
        }
    }
}

/// The file package that came in algorithm `id`'s own archive, if any.
fn bundled_in(state: &State, id: &str) -> Option<String> {
    state
        .files
        .iter()
        .find(|f| f.bundled_with.as_deref() == Some(id))
        .map(|f| f.id.clone())
}

/// Whether a download is a gzip stream (a package archive), by its magic bytes.
fn is_gzip(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic == [0x1f, 0x8b])
}
