//! Content-addressed guest modules: `<dir>/<sha256 hex>.wasm`.
//!
//! A write goes to a uniquely named temporary file in the same directory, is fsynced, renamed
//! over the final name and the directory is fsynced, so a crash at any point leaves either no
//! file or the whole file under its hash, never a partial one. Temporary files left by a crash
//! are removed by [`BlobStore::sweep`] at startup, together with blobs no guest refers to.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub struct BlobStore {
    dir: PathBuf,
}

const TMP_SUFFIX: &str = ".tmp";

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn valid_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl BlobStore {
    pub fn open(dir: &Path) -> std::io::Result<BlobStore> {
        std::fs::create_dir_all(dir)?;
        Ok(BlobStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("{hash}.wasm"))
    }

    /// Stores `bytes` and returns their hash. Storing bytes already present is a no-op.
    pub fn put(&self, bytes: &[u8]) -> std::io::Result<String> {
        let hash = sha256_hex(bytes);
        let dest = self.path(&hash);
        if dest.exists() {
            return Ok(hash);
        }
        let mut tmp = tempfile_in(&self.dir)?;
        tmp.1.write_all(bytes)?;
        tmp.1.sync_all()?;
        drop(tmp.1);
        if let Err(e) = std::fs::rename(&tmp.0, &dest) {
            let _ = std::fs::remove_file(&tmp.0);
            return Err(e);
        }
        // Make the rename itself durable.
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(hash)
    }

    pub fn get(&self, hash: &str) -> std::io::Result<Vec<u8>> {
        if !valid_hash(hash) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a sha256 hash",
            ));
        }
        let bytes = std::fs::read(self.path(hash))?;
        // A blob is trusted only if it still hashes to its name (disk corruption, tampering).
        if sha256_hex(&bytes) != hash {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("guest blob {hash} does not match its hash"),
            ));
        }
        Ok(bytes)
    }

    pub fn remove(&self, hash: &str) -> std::io::Result<()> {
        if !valid_hash(hash) {
            return Ok(());
        }
        match std::fs::remove_file(self.path(hash)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Removes leftover temporary files and every blob whose hash `keep` rejects; returns how
    /// many files were removed.
    pub fn sweep(&self, keep: impl Fn(&str) -> bool) -> std::io::Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stale = if name.ends_with(TMP_SUFFIX) {
                true
            } else if let Some(h) = name.strip_suffix(".wasm") {
                valid_hash(h) && !keep(h)
            } else {
                false
            };
            if stale {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let mut rnd = [0u8; 8];
    rand::Fill::fill(&mut rnd, &mut rand::rng());
    let path = dir.join(format!(".upload-{}{TMP_SUFFIX}", hex::encode(rnd)));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok((path, f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let h = s.put(b"hello").unwrap();
        assert_eq!(h, sha256_hex(b"hello"));
        assert_eq!(s.put(b"hello").unwrap(), h);
        assert_eq!(s.get(&h).unwrap(), b"hello");
        let h2 = s.put(b"other").unwrap();
        // A crash mid-upload leaves only a temporary file, which the sweep removes.
        std::fs::write(dir.path().join(".upload-dead.tmp"), b"hal").unwrap();
        assert_eq!(s.sweep(|x| x == h).unwrap(), 2);
        assert!(s.get(&h2).is_err());
        assert_eq!(s.get(&h).unwrap(), b"hello");
        // A corrupted blob is refused rather than served.
        std::fs::write(dir.path().join(format!("{h}.wasm")), b"jello").unwrap();
        assert_eq!(
            s.get(&h).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        assert!(s.get("../etc/passwd").is_err());
    }
}
