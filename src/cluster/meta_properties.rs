//! The node's identity on disk, as Kafka keeps it: `meta.properties` in the data dir with the
//! node id, the directory id (KIP-858) and, once known, the cluster id; and an exclusive lock
//! on the data dir so that two processes never share one.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use uuid::Uuid;

pub const FILE: &str = "meta.properties";
const LOCK_FILE: &str = ".lock";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaProperties {
    pub node_id: i32,
    pub directory_id: Uuid,
    /// Kafka's form: 22 characters of URL-safe base64.
    pub cluster_id: Option<String>,
}

/// Held for the life of the process: the kernel drops the lock when the process dies, so a
/// kill -9 never leaves a stale lock behind.
pub struct DirLock {
    _file: std::fs::File,
}

pub fn lock(data_dir: &Path) -> Result<DirLock, String> {
    let path = data_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // Safety: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(format!(
            "data dir {} is in use by another process (locked: {})",
            data_dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(DirLock { _file: file })
}

fn parse(text: &str) -> Result<MetaProperties, String> {
    let mut node_id = None;
    let mut directory_id = None;
    let mut cluster_id = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {line:?} is not key=value"));
        };
        match k.trim() {
            "node.id" => {
                node_id = Some(
                    v.trim()
                        .parse::<i32>()
                        .map_err(|_| format!("node.id {v:?} is not a number"))?,
                )
            }
            "directory.id" => {
                directory_id = Some(
                    decode_uuid(v.trim())
                        .ok_or_else(|| format!("directory.id {v:?} is invalid"))?,
                )
            }
            "cluster.id" => cluster_id = Some(v.trim().to_string()),
            _ => {}
        }
    }
    Ok(MetaProperties {
        node_id: node_id.ok_or("node.id is missing")?,
        directory_id: directory_id.ok_or("directory.id is missing")?,
        cluster_id,
    })
}

pub fn load(data_dir: &Path) -> Result<Option<MetaProperties>, String> {
    let path = data_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Written whole to a temp file, fsynced, renamed, and the directory fsynced.
pub fn store(data_dir: &Path, m: &MetaProperties) -> Result<(), String> {
    let path = data_dir.join(FILE);
    let tmp = data_dir.join("meta.properties.tmp");
    let mut text = String::from("#\n# Written by fjord; do not edit.\nversion=1\n");
    text.push_str(&format!("node.id={}\n", m.node_id));
    text.push_str(&format!("directory.id={}\n", encode_uuid(&m.directory_id)));
    if let Some(c) = &m.cluster_id {
        text.push_str(&format!("cluster.id={c}\n"));
    }
    let io = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// Reads the node's identity, creating it on first start; a data dir that belongs to another
/// node id is refused.
pub fn load_or_create(data_dir: &Path, node_id: i32) -> Result<MetaProperties, String> {
    match load(data_dir)? {
        Some(m) if m.node_id != node_id => Err(format!(
            "data dir {} belongs to node {} (meta.properties), not node {node_id}: pass --node-id {} or use another --data-dir",
            data_dir.display(),
            m.node_id,
            m.node_id
        )),
        Some(m) => Ok(m),
        None => {
            let m = MetaProperties {
                node_id,
                directory_id: Uuid::new_v4(),
                cluster_id: None,
            };
            store(data_dir, &m)?;
            Ok(m)
        }
    }
}

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Kafka's textual UUID: URL-safe base64 without padding (22 characters).
pub fn encode_uuid(id: &Uuid) -> String {
    super::metadata::base64_url(id.as_bytes())
}

pub fn decode_uuid(s: &str) -> Option<Uuid> {
    if s.len() != 22 {
        return Uuid::parse_str(s).ok();
    }
    let mut bytes = Vec::with_capacity(17);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            bytes.push(((acc >> bits) & 0xff) as u8);
        }
    }
    bytes.truncate(16);
    Uuid::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_and_a_foreign_node_id_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let m = load_or_create(d.path(), 3).unwrap();
        assert_eq!(load_or_create(d.path(), 3).unwrap(), m);
        let err = load_or_create(d.path(), 4).unwrap_err();
        assert!(err.contains("belongs to node 3"), "{err}");
        let id = Uuid::new_v4();
        assert_eq!(decode_uuid(&encode_uuid(&id)), Some(id));
        let with = MetaProperties {
            cluster_id: Some(encode_uuid(&id)),
            ..m
        };
        store(d.path(), &with).unwrap();
        assert_eq!(load(d.path()).unwrap(), Some(with));
    }

    #[test]
    fn a_locked_data_dir_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let _held = lock(d.path()).unwrap();
        // flock locks belong to the open file description: a second open is a second owner.
        let err = lock(d.path()).err().unwrap();
        assert!(err.contains("in use by another process"), "{err}");
    }
}
