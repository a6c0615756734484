//! Reading files a vendor controls without trusting them: the plugin directory,
//! and the model files in a plugin's package.
//!
//! Whoever can write to the plugin directory can put anything there: a manifest
//! that is a link to the admin secret, a `.wasm` that is a FIFO or a 300 MB file.
//! Only regular files are read (in the plugin directory, links are refused, not
//! followed), and their size is checked before a byte is read.

use std::io::Read;
use std::path::Path;

/// Why a file in the plugin directory is not read. Never quotes its content.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} is a symbolic link: only regular files in the plugin directory are read")]
    Link(String),
    #[error("{0} is not a regular file")]
    NotRegular(String),
    #[error("{0} is {1} bytes; the limit is {2}")]
    TooLarge(String, u64, u64),
}

/// The size of `path` if it is a regular file no larger than `max`.
pub fn regular_file_len(path: &Path, max: u64) -> Result<u64, FileError> {
    let name = path.display().to_string();
    let meta = std::fs::symlink_metadata(path).map_err(|e| FileError::Io(name.clone(), e))?;
    if meta.file_type().is_symlink() {
        return Err(FileError::Link(name));
    }
    if !meta.is_file() {
        return Err(FileError::NotRegular(name));
    }
    if meta.len() > max {
        return Err(FileError::TooLarge(name, meta.len(), max));
    }
    Ok(meta.len())
}

/// The bytes of `path`, a regular file of at most `max` bytes (checked before
/// reading, and again while reading, in case it grows or is swapped meanwhile).
pub fn read_regular_file(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let name = path.display().to_string();
    regular_file_len(path, max)?;
    let file = std::fs::File::open(path).map_err(|e| FileError::Io(name.clone(), e))?;
    read_open_file(file, &name, max)
}

/// The bytes of an opened file, `name` in errors: refused if it is not a regular
/// file or is larger than `max` (by its size before reading, then by what reading
/// finds). Also for files opened through a capability (`cap_std::fs::Dir`).
pub fn read_open_file(file: std::fs::File, name: &str, max: u64) -> Result<Vec<u8>, FileError> {
    let io = |e| FileError::Io(name.to_string(), e);
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(FileError::NotRegular(name.to_string()));
    }
    if meta.len() > max {
        return Err(FileError::TooLarge(name.to_string(), meta.len(), max));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(FileError::TooLarge(
            name.to_string(),
            bytes.len() as u64,
            max,
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_special_files_are_refused_and_sizes_checked_first() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("admin.secret");
        std::fs::write(&secret, "s3cr3t").unwrap();
        let link = dir.path().join("evil.toml");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let err = read_regular_file(&link, 1024).unwrap_err().to_string();
        assert!(
            err.contains("symbolic link") && !err.contains("s3cr3t"),
            "{err}"
        );
        let err = read_regular_file(dir.path(), 1024).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let err = read_regular_file(&secret, 3).unwrap_err().to_string();
        assert!(err.contains("6 bytes; the limit is 3"), "{err}");
        assert_eq!(read_regular_file(&secret, 6).unwrap(), b"s3cr3t");
    }
}
