//! Downloads of packages the platform pushes: HTTP(S) only, streamed to a file with
//! a size limit and an overall deadline, md5 computed on the way. The file lands at a
//! temporary path the caller renames or removes: a failed or mismatched download
//! leaves nothing behind.

use std::path::Path;
use std::time::Duration;

use md5::{Digest, Md5};
use tokio::io::AsyncWriteExt;

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_bytes: u64,
    pub timeout: Duration,
    /// CAs trusted for HTTPS besides the system's (`[platform] ca-bundle`).
    pub extra_roots: Vec<reqwest::Certificate>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 2 << 30,
            timeout: Duration::from_secs(600),
            extra_roots: Vec::new(),
        }
    }
}

/// The certificates of a PEM bundle, for `extra_roots` and the platform client.
pub fn load_ca_bundle(path: &Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    use anyhow::Context;
    let pem = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("{}: not PEM certificates", path.display()))?;
    if certificates.is_empty() {
        anyhow::bail!("{}: no certificate in it", path.display());
    }
    Ok(certificates)
}

/// `md5` must be 32 hex digits.
pub fn valid_md5(md5: &str) -> bool {
    md5.len() == 32 && md5.chars().all(|c| c.is_ascii_hexdigit())
}

/// `url` must be http(s) with a host.
pub fn check_url(url: &str) -> Result<reqwest::Url, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!("url {url:?}: an http or https URL with a host"));
    }
    Ok(parsed)
}

/// Downloads `url` into `dest` and checks its md5 (when there is one to check). On
/// any failure `dest` is removed and the error says what went wrong.
pub async fn download(
    url: &str,
    md5: Option<&str>,
    dest: &Path,
    limits: &Limits,
) -> Result<(), String> {
    let result = tokio::time::timeout(limits.timeout, fetch(url, md5, dest, limits))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "download of {url} took longer than {:?}",
                limits.timeout
            ))
        });
    if result.is_err() {
        let _ = tokio::fs::remove_file(dest).await;
    }
    result
}

async fn fetch(url: &str, md5: Option<&str>, dest: &Path, limits: &Limits) -> Result<(), String> {
    let url = check_url(url)?;
    let mut client = reqwest::Client::builder().connect_timeout(Duration::from_secs(30));
    for root in &limits.extra_roots {
        client = client.add_root_certificate(root.clone());
    }
    let client = client.build().map_err(|e| format!("http client: {e}"))?;
    let mut response = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", response.status()));
    }
    if let Some(length) = response.content_length().filter(|l| *l > limits.max_bytes) {
        return Err(format!(
            "{url} is {length} bytes; the limit is {}",
            limits.max_bytes
        ));
    }
    let mut file = tokio::fs::File::create(dest)
        .await
        .map_err(|e| format!("create {}: {e}", dest.display()))?;
    let mut hasher = Md5::new();
    let mut received: u64 = 0;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
    {
        received += chunk.len() as u64;
        if received > limits.max_bytes {
            return Err(format!(
                "{url} is larger than the {} byte limit",
                limits.max_bytes
            ));
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| format!("write {}: {e}", dest.display()))?;
    }
    file.sync_all()
        .await
        .map_err(|e| format!("write {}: {e}", dest.display()))?;
    let actual = hex::encode(hasher.finalize());
    match md5 {
        Some(md5) if !actual.eq_ignore_ascii_case(md5) => Err(format!(
            "md5 mismatch: expected {md5}, {url} hashes to {actual}"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_md5s_are_checked() {
        assert!(check_url("http://127.0.0.1:8080/p.tar.gz").is_ok());
        assert!(check_url("https://example.org/p").is_ok());
        assert!(check_url("file:///etc/passwd").is_err());
        assert!(check_url("ftp://x/y").is_err());
        assert!(check_url("not a url").is_err());
        assert!(valid_md5("d41d8cd98f00b204e9800998ecf8427e"));
        assert!(!valid_md5("7a90a32d-8ae8-4ffa-b000-07ef71058bab"));
    }
}
