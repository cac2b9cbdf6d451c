//! Sparse offset and time indexes of one segment, kept in memory and written beside a segment
//! when it is closed (`.index`, `.timeindex`). A missing or damaged file is rebuilt by scanning.

use std::io::Write;
use std::path::Path;

const MAGIC: u32 = 0x464a_4958; // "FJIX"

/// Entries are (key, value) pairs of i64: (offset, file position) or (timestamp, offset).
pub fn write_index(path: &Path, segment_bytes: u64, entries: &[(i64, i64)]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(16 + entries.len() * 16 + 4);
    buf.extend_from_slice(&MAGIC.to_be_bytes());
    buf.extend_from_slice(&segment_bytes.to_be_bytes());
    buf.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (k, v) in entries {
        buf.extend_from_slice(&k.to_be_bytes());
        buf.extend_from_slice(&v.to_be_bytes());
    }
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_be_bytes());
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads an index file; `None` when it is missing, damaged, or built for another segment size.
pub fn read_index(path: &Path, segment_bytes: u64) -> Option<Vec<(i64, i64)>> {
    let buf = std::fs::read(path).ok()?;
    if buf.len() < 20 {
        return None;
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32c::crc32c(body) != u32::from_be_bytes(crc.try_into().ok()?) {
        return None;
    }
    if u32::from_be_bytes(body[0..4].try_into().ok()?) != MAGIC {
        return None;
    }
    if u64::from_be_bytes(body[4..12].try_into().ok()?) != segment_bytes {
        return None;
    }
    let n = u32::from_be_bytes(body[12..16].try_into().ok()?) as usize;
    if body.len() != 16 + n * 16 {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let at = 16 + i * 16;
        let k = i64::from_be_bytes(body[at..at + 8].try_into().ok()?);
        let v = i64::from_be_bytes(body[at + 8..at + 16].try_into().ok()?);
        out.push((k, v));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn roundtrip_and_damage() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.index");
        write_index(&p, 100, &[(0, 0), (10, 4096)]).unwrap();
        assert_eq!(read_index(&p, 100), Some(vec![(0, 0), (10, 4096)]));
        assert_eq!(read_index(&p, 101), None);
        let mut b = std::fs::read(&p).unwrap();
        b[20] ^= 1;
        std::fs::write(&p, b).unwrap();
        assert_eq!(read_index(&p, 100), None);
    }
}
