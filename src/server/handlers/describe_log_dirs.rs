//! DescribeLogDirs: the replicas this node holds in its data directory, with their size on disk
//! and how far each follower is behind its leader's high watermark, and the directory's space.

use std::collections::BTreeMap;
use std::sync::Arc;

use kafka_protocol::messages::describe_log_dirs_request::DescribeLogDirsRequest;
use kafka_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResponse, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use kafka_protocol::protocol::StrBytes;

use super::util::tn;
use crate::server::ConnCtx;
use crate::shard::fanout::per_shard;

pub async fn handle(
    ctx: &ConnCtx,
    version: i16,
    req: DescribeLogDirsRequest,
) -> DescribeLogDirsResponse {
    let node = ctx.shard.node.clone();
    let me = node.node_id;
    // The replicas this node hosts, as the image says (on a single node: every partition).
    let mut wanted: Vec<(Arc<str>, i32)> = Vec::new();
    {
        let img = node.image();
        let asked: Option<BTreeMap<String, Vec<i32>>> = req.topics.as_ref().map(|ts| {
            ts.iter()
                .map(|t| (t.topic.0.to_string(), t.partitions.clone()))
                .collect()
        });
        for t in img.topics.values() {
            let only = match &asked {
                Some(a) => match a.get(t.name.as_str()) {
                    Some(ps) => Some(ps),
                    None => continue,
                },
                None => None,
            };
            let name: Arc<str> = Arc::from(t.name.as_str());
            for p in 0..t.partitions {
                if only.is_some_and(|ps| !ps.contains(&p)) {
                    continue;
                }
                let hosted = t.assignments.is_empty()
                    || t.assignments
                        .get(p as usize)
                        .is_some_and(|a| a.replicas.contains(&me));
                if hosted {
                    wanted.push((name.clone(), p));
                }
            }
        }
    }
    // Lag from each replica's shard (a replica not opened since the start has not fetched).
    let keyed: Vec<(usize, (Arc<str>, i32))> = wanted
        .iter()
        .map(|(t, p)| (node.shard_of(t, *p), (t.clone(), *p)))
        .collect();
    let lags: Vec<i64> = per_shard(
        node.shards(),
        keyed,
        |sh, items: Vec<(Arc<str>, i32)>| async move {
            items
                .iter()
                .map(|(t, p)| sh.opened(t, *p).map_or(0, |part| part.replica_lag() as i64))
                .collect()
        },
    )
    .await;
    // Sizes and the directory's space, off the reactor (directory listings and statvfs).
    let data_dir = node.data_dir.clone();
    let dirs: Vec<std::path::PathBuf> = wanted
        .iter()
        .map(|(t, p)| crate::cluster::metadata::partition_dir(&data_dir, t, *p))
        .collect();
    let root = data_dir.clone();
    let (sizes, space) = crate::log::storage::off_reactor(move || {
        let sizes: Vec<i64> = dirs.iter().map(|d| segment_bytes(d)).collect();
        (sizes, disk_space(&root))
    })
    .await;
    let mut by_topic: BTreeMap<Arc<str>, Vec<DescribeLogDirsPartition>> = BTreeMap::new();
    for (((t, p), lag), size) in wanted.into_iter().zip(lags).zip(sizes) {
        let mut x = DescribeLogDirsPartition::default();
        x.partition_index = p;
        x.partition_size = size;
        x.offset_lag = lag;
        by_topic.entry(t).or_default().push(x);
    }
    let mut dir = DescribeLogDirsResult::default();
    dir.log_dir = StrBytes::from_string(
        std::fs::canonicalize(&data_dir)
            .unwrap_or(data_dir)
            .display()
            .to_string(),
    );
    if version >= 4 {
        let (total, usable) = space.unwrap_or((-1, -1));
        dir.total_bytes = total;
        dir.usable_bytes = usable;
    }
    for (t, partitions) in by_topic {
        let mut x = DescribeLogDirsTopic::default();
        x.name = tn(&t);
        x.partitions = partitions;
        dir.topics.push(x);
    }
    let mut resp = DescribeLogDirsResponse::default();
    resp.results.push(dir);
    resp
}

/// Bytes of a partition's segment files.
fn segment_bytes(dir: &std::path::Path) -> i64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len() as i64)
                .sum()
        })
        .unwrap_or(0)
}

/// (total, usable) bytes of the file system holding `dir`.
fn disk_space(dir: &std::path::Path) -> Option<(i64, i64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as i64;
    Some((st.f_blocks as i64 * frsize, st.f_bavail as i64 * frsize))
}
