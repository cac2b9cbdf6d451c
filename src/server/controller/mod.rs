//! A node of a multi-node cluster (`fjord serve --controllers …`): the controller quorum
//! member on voters (`quorum.rs`, reached through `listener.rs`), and on every node the broker
//! side as KRaft runs it: register with the active controller (BrokerRegistration), heartbeat
//! (BrokerHeartbeat), follow the committed metadata (a voter from its own quorum member, a
//! broker-only node by fetching the image from a voter) and publish it to the shards.
//! Requests a client sends to any broker that change metadata (CreateTopics, DeleteTopics,
//! auto-creation, producer-id blocks, DescribeQuorum) are forwarded to the active controller
//! through any voter (`forward`).
//!
//! Everything here runs on the node's controller shard, except `forward`, which any shard may
//! call. A node without `--controllers` runs none of it.

pub mod listener;
pub mod quorum;
pub mod wire;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Request, StrBytes};

use self::quorum::QuorumService;
use self::wire::Conn;
use crate::cluster::meta_properties;
use crate::cluster::metadata;
use crate::cluster::node::Node;
use crate::server::errors as ec;
use crate::shard::{self, Shard};

/// The broker side of a clustered node, on its controller shard.
pub struct ClusterHandle {
    node: Arc<Node>,
    pub quorum: Option<Rc<QuorumService>>,
    /// The metadata log position of the image the shards serve.
    applied: Cell<u64>,
    broker_epoch: Cell<i64>,
    fenced: Cell<bool>,
    /// Set by SIGTERM: heartbeats ask to shut down.
    stopping: Cell<bool>,
    may_exit: crate::notify::Notify,
    may_exit_now: Cell<bool>,
    cluster_id_stored: Cell<bool>,
    /// The producer-id block this node hands out from: [next, end).
    producer_ids: Cell<(i64, i64)>,
}

thread_local! {
    static HANDLE: RefCell<Option<Rc<ClusterHandle>>> = const { RefCell::new(None) };
}

/// The handle on this thread (the controller shard of a clustered node).
pub fn handle() -> Option<Rc<ClusterHandle>> {
    HANDLE.with(|h| h.borrow().clone())
}

/// Starts the cluster roles of this node on the controller shard.
pub fn start(shard: &Rc<Shard>) -> anyhow::Result<()> {
    let node = shard.node.clone();
    let Some(settings) = node.cluster.as_ref() else {
        return Ok(());
    };
    let quorum = match node.voter_address() {
        Some(addr) => {
            let q = QuorumService::open(node.clone())?;
            let l = listener::bind(addr)
                .map_err(|e| anyhow::anyhow!("cannot listen for controllers on {addr}: {e}"))?;
            glommio::spawn_local(listener::accept_loop(l, q.clone())).detach();
            q.start();
            tracing::info!(
                "controller voter {} on {addr} (voters: {:?})",
                node.node_id,
                settings.voters
            );
            Some(q)
        }
        None => None,
    };
    let h = Rc::new(ClusterHandle {
        node: node.clone(),
        quorum: quorum.clone(),
        applied: Cell::new(0),
        broker_epoch: Cell::new(-1),
        fenced: Cell::new(true),
        stopping: Cell::new(false),
        may_exit: crate::notify::Notify::new(),
        may_exit_now: Cell::new(false),
        cluster_id_stored: Cell::new(settings.known_cluster_id.is_some()),
        producer_ids: Cell::new((0, 0)),
    });
    HANDLE.with(|x| *x.borrow_mut() = Some(h.clone()));
    match &quorum {
        Some(q) => {
            let h2 = h.clone();
            *q.on_image.borrow_mut() = Some(Box::new(move |img| h2.publish(img)));
            // What the metadata log held before this start.
            let img = q.image().clone();
            h.publish(&img);
        }
        None => {
            glommio::spawn_local(follow(h.clone())).detach();
        }
    }
    glommio::spawn_local(lifecycle(h.clone())).detach();
    Ok(())
}

impl ClusterHandle {
    /// Serves a newly committed image: the shards see it at once; topics that are gone are
    /// dropped from the shards and their data removed.
    fn publish(&self, q: &crate::quorum::MetadataImage) {
        if q.applied_index < self.applied.get() {
            return;
        }
        self.applied.set(q.applied_index);
        let next = metadata::from_quorum(q, crate::group::OFFSETS_TOPIC);
        let old = self.node.meta.load_full();
        let gone: Vec<Arc<metadata::TopicMeta>> = old
            .topics
            .values()
            .filter(|t| next.topic_by_id(&t.id).is_none())
            .cloned()
            .collect();
        let me = self.node.node_id;
        // (partition, leader epoch) of the offsets partitions this node leads.
        let offsets_led = |img: &metadata::MetadataImage| -> Vec<(i32, i32)> {
            img.topic(crate::group::OFFSETS_TOPIC)
                .map(|t| {
                    (0..t.partitions)
                        .filter(|p| t.leader(*p, me) == me)
                        .map(|p| {
                            let epoch = t.assignments.get(p as usize).map(|a| a.leader_epoch);
                            (p, epoch.unwrap_or(0))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let coordination_moved = offsets_led(&next) != offsets_led(&old);
        self.node.meta.store(Arc::new(next));
        // Every shard brings its replicas' roles, ISRs and fetchers in line with the image.
        for s in 0..self.node.shards() {
            glommio::spawn_local(shard::invoke(s, |sh| async move {
                crate::server::replication::sync_shard(sh).await;
            }))
            .detach();
        }
        if coordination_moved {
            // Groups whose offsets partition this node now leads are loaded here; those it no
            // longer leads are forgotten (their members are sent to the new coordinator).
            for s in 0..self.node.shards() {
                glommio::spawn_local(shard::invoke(s, |sh| async move {
                    let groups = sh.groups.borrow().clone();
                    if let Some(g) = groups {
                        g.sync_partitions(&sh).await;
                    }
                }))
                .detach();
            }
        }
        if let (Some(id), false) = (q.cluster_id, self.cluster_id_stored.get()) {
            self.store_cluster_id(id);
        }
        if !gone.is_empty() {
            let node = self.node.clone();
            glommio::spawn_local(remove_topics(node, gone)).detach();
        }
    }

    fn store_cluster_id(&self, id: uuid::Uuid) {
        let Some(c) = &self.node.cluster else { return };
        let m = meta_properties::MetaProperties {
            node_id: self.node.node_id,
            directory_id: c.directory_id,
            cluster_id: Some(meta_properties::encode_uuid(&id)),
        };
        match meta_properties::store(&self.node.data_dir, &m) {
            Ok(()) => self.cluster_id_stored.set(true),
            Err(e) => tracing::error!("cannot record the cluster id: {e}"),
        }
    }

    pub fn broker_epoch(&self) -> i64 {
        self.broker_epoch.get()
    }

    /// A producer id no other node hands out: from this node's block, a new block from the
    /// active controller (AllocateProducerIds) when it is used up.
    pub async fn next_producer_id(&self) -> Result<i64, i16> {
        let (next, end) = self.producer_ids.get();
        if next < end {
            self.producer_ids.set((next + 1, end));
            return Ok(next);
        }
        let mut req = AllocateProducerIdsRequest::default();
        req.broker_id = BrokerId(self.node.node_id);
        req.broker_epoch = self.broker_epoch.get();
        let r = forward(&self.node, 0, &req)
            .await
            .map_err(|_| ec::NOT_CONTROLLER)?;
        if r.error_code != ec::NONE {
            return Err(r.error_code);
        }
        let start = r.producer_id_start.0;
        self.producer_ids
            .set((start + 1, start + i64::from(r.producer_id_len.max(1))));
        Ok(start)
    }

    /// Controlled shutdown (SIGTERM): heartbeats ask to shut down until the controller has
    /// moved this node's leaderships away, for at most `d`.
    pub async fn controlled_shutdown(&self, d: Duration) {
        self.stopping.set(true);
        let deadline = Instant::now() + d;
        while !self.may_exit_now.get() {
            let notified = self.may_exit.notified();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("controlled shutdown: no answer from the controller in time");
                return;
            }
            wire::within(left, notified).await;
        }
        tracing::info!("controlled shutdown: the controller moved this node's partitions away");
    }
}

async fn remove_topics(node: Arc<Node>, gone: Vec<Arc<metadata::TopicMeta>>) {
    for t in gone {
        let drops = (0..node.shards()).map(|s| {
            let name = t.name.clone();
            shard::invoke(s, move |sh| async move { sh.drop_topic(&name) })
        });
        futures::future::join_all(drops).await;
        for p in 0..t.partitions {
            let dir = metadata::partition_dir(&node.data_dir, &t.name, p);
            if dir.exists() {
                if let Err(e) = crate::log::storage::remove_dir_all(dir.clone()).await {
                    tracing::warn!("cannot remove {}: {e}", dir.display());
                }
            }
        }
    }
}

/// A broker-only node follows the committed image by long-polling a voter.
async fn follow(h: Rc<ClusterHandle>) {
    let voters = h
        .node
        .cluster
        .as_ref()
        .map(|c| c.voters.clone())
        .unwrap_or_default();
    let mut i = 0usize;
    loop {
        let (_, addr) = voters[i % voters.len()];
        let mut conn = match Conn::connect(addr, Duration::from_millis(500)).await {
            Ok(c) => c,
            Err(_) => {
                i += 1;
                glommio::timer::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let mut body = Vec::with_capacity(12);
            body.put_u64(h.applied.get());
            body.put_u32(1000);
            let Ok(mut resp) = conn.call_private(wire::METADATA_FETCH_KEY, &body).await else {
                i += 1;
                break;
            };
            if resp.remaining() < 20 {
                i += 1;
                break;
            }
            let _applied = resp.get_u64();
            let _leader = resp.get_i32();
            let _term = resp.get_u64();
            if resp.has_remaining() {
                match crate::quorum::MetadataImage::decode_snapshot(&resp) {
                    Ok(img) => h.publish(&img),
                    Err(e) => {
                        tracing::warn!("undecodable metadata image from {addr}: {e}");
                        i += 1;
                        break;
                    }
                }
            }
        }
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers, then heartbeats; registers again when the controller no longer knows this
/// incarnation. A refusal that another start cannot fix stops the process.
async fn lifecycle(h: Rc<ClusterHandle>) {
    let node = h.node.clone();
    let Some(settings) = node.cluster.clone() else {
        return;
    };
    let interval = Duration::from_millis(node.tuning.node.broker_heartbeat_interval_ms.max(50));
    'register: loop {
        let mut req = BrokerRegistrationRequest::default();
        req.broker_id = BrokerId(node.node_id);
        req.cluster_id =
            StrBytes::from_string(settings.known_cluster_id.clone().unwrap_or_default());
        req.incarnation_id = settings.incarnation_id;
        let mut l = broker_registration_request::Listener::default();
        l.name = StrBytes::from_static_str("PLAINTEXT");
        l.host = StrBytes::from_string(node.advertised_host.clone());
        l.port = node.advertised_port as u16;
        req.listeners.push(l);
        req.rack = settings
            .rack
            .as_ref()
            .map(|r| StrBytes::from_string(r.clone()));
        req.log_dirs = vec![settings.directory_id];
        req.previous_broker_epoch = h.broker_epoch.get();
        match forward_quick(&node, 3, &req).await {
            Ok(r) if r.error_code == ec::NONE => {
                h.broker_epoch.set(r.broker_epoch);
                node.broker_epoch
                    .store(r.broker_epoch, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    "registered with the controller, broker epoch {}",
                    r.broker_epoch
                );
            }
            Ok(r) => {
                let e = kafka_protocol::ResponseError::try_from_code(r.error_code);
                match e {
                    Some(kafka_protocol::ResponseError::DuplicateBrokerRegistration) => {
                        tracing::error!(
                            "node id {} is registered by another live process: refusing to start a second one",
                            node.node_id
                        );
                        std::process::exit(1);
                    }
                    Some(kafka_protocol::ResponseError::InconsistentClusterId) => {
                        tracing::error!(
                            "this data dir belongs to cluster {:?}, not to the quorum's: refusing to join",
                            settings.known_cluster_id
                        );
                        std::process::exit(1);
                    }
                    _ => {
                        tracing::debug!("registration not done yet: {e:?}");
                    }
                }
                glommio::timer::sleep(Duration::from_millis(300)).await;
                continue 'register;
            }
            Err(e) => {
                tracing::debug!("registration: {e:#}");
                glommio::timer::sleep(Duration::from_millis(300)).await;
                continue 'register;
            }
        }
        loop {
            let mut hb = BrokerHeartbeatRequest::default();
            hb.broker_id = BrokerId(node.node_id);
            hb.broker_epoch = h.broker_epoch.get();
            hb.current_metadata_offset = h.applied.get() as i64;
            hb.want_shut_down = h.stopping.get();
            match forward_quick(&node, 1, &hb).await {
                Ok(r) if r.error_code == ec::NONE => {
                    if h.fenced.get() != r.is_fenced {
                        tracing::info!(
                            "this broker is {} by the controller",
                            if r.is_fenced { "fenced" } else { "unfenced" }
                        );
                    }
                    h.fenced.set(r.is_fenced);
                    if h.stopping.get() && r.should_shut_down {
                        h.may_exit_now.set(true);
                        h.may_exit.notify_waiters();
                    }
                }
                Ok(r) => {
                    let e = kafka_protocol::ResponseError::try_from_code(r.error_code);
                    if matches!(
                        e,
                        Some(kafka_protocol::ResponseError::StaleBrokerEpoch)
                            | Some(kafka_protocol::ResponseError::BrokerIdNotRegistered)
                    ) {
                        tracing::warn!(
                            "the controller no longer knows this broker ({e:?}): registering again"
                        );
                        continue 'register;
                    }
                }
                Err(e) => tracing::debug!("heartbeat: {e:#}"),
            }
            // Faster while fenced or stopping: both wait on the controller.
            let pause = if h.fenced.get() || h.stopping.get() {
                interval.min(Duration::from_millis(200))
            } else {
                interval
            };
            glommio::timer::sleep(pause).await;
        }
    }
}

thread_local! {
    /// The voter that answered last: tried first next time.
    static LAST_GOOD_VOTER: Cell<usize> = const { Cell::new(0) };
}

/// Sends a request to the active controller through any voter (which relays it), trying the
/// voters in turn for up to 15 s.
pub async fn forward<R: Request>(
    node: &Node,
    version: i16,
    req: &R,
) -> anyhow::Result<R::Response> {
    // A client's request is not retried on another voter while the first may still commit
    // it (a second CreateTopics would answer TOPIC_ALREADY_EXISTS): one try gets it all.
    forward_within(node, version, req, Duration::MAX).await
}

/// The node's own heartbeat-like requests (registration, heartbeats, AlterPartition): the
/// controller answers them at once, so a voter that is silent for a heartbeat interval (at
/// least a second) is skipped. Without this a hung voter made every broker that last talked
/// to it miss its session timeout, and the new controller fenced them all.
pub async fn forward_quick<R: Request>(
    node: &Node,
    version: i16,
    req: &R,
) -> anyhow::Result<R::Response> {
    let per_try = Duration::from_millis(node.tuning.node.broker_heartbeat_interval_ms)
        .max(Duration::from_secs(1));
    forward_within(node, version, req, per_try).await
}

async fn forward_within<R: Request>(
    node: &Node,
    version: i16,
    req: &R,
    per_try: Duration,
) -> anyhow::Result<R::Response> {
    let Some(c) = node.cluster.as_ref() else {
        anyhow::bail!("not a clustered node");
    };
    let n = c.voters.len();
    let deadline = Instant::now() + Duration::from_secs(15);
    let start = LAST_GOOD_VOTER.with(|v| v.get());
    let mut last_err = anyhow::anyhow!("no voter reachable");
    for attempt in 0.. {
        let i = (start + attempt) % n;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let (_, addr) = c.voters[i];
        let call = async {
            let mut conn = Conn::connect(addr, Duration::from_millis(500)).await?;
            conn.call(version, req).await
        };
        match wire::within(left.min(per_try), call).await {
            Some(Ok(r)) => {
                LAST_GOOD_VOTER.with(|v| v.set(i));
                return Ok(r);
            }
            Some(Err(e)) => last_err = e,
            None => last_err = anyhow::anyhow!("voter {} did not answer in time", c.voters[i].0),
        }
        if attempt % n == n - 1 {
            glommio::timer::sleep(Duration::from_millis(200)).await;
        }
    }
    Err(last_err.context("no active controller answered"))
}

/// Forwards a client's request to the active controller wrapped in an Envelope (KIP-590), as
/// a KRaft broker does for the admin requests it receives; the controller answers it as if the
/// client had sent it there.
pub async fn forward_for_client<R: Request>(
    node: &Node,
    version: i16,
    req: &R,
    client_host: &str,
) -> anyhow::Result<R::Response> {
    use kafka_protocol::protocol::{Decodable, HeaderVersion};
    let mut env = EnvelopeRequest::default();
    env.request_data = wire::request_bytes(version, "fjord-forward", req)?;
    env.client_host_address = match client_host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => bytes::Bytes::copy_from_slice(&a.octets()),
        Ok(std::net::IpAddr::V6(a)) => bytes::Bytes::copy_from_slice(&a.octets()),
        Err(_) => bytes::Bytes::from_static(&[127, 0, 0, 1]),
    };
    let resp = forward(node, 0, &env).await?;
    if resp.error_code != ec::NONE {
        anyhow::bail!(
            "the controller refused the envelope: {:?}",
            kafka_protocol::ResponseError::try_from_code(resp.error_code)
        );
    }
    let mut data = resp
        .response_data
        .ok_or_else(|| anyhow::anyhow!("an envelope response without data"))?;
    let _ = ResponseHeader::decode(
        &mut data,
        <R::Response as HeaderVersion>::header_version(version),
    )?;
    R::Response::decode(&mut data, version)
}

/// Waits (up to `d`) until this node's image satisfies `ready`.
pub async fn wait_for_image(
    node: &Node,
    d: Duration,
    ready: impl Fn(&metadata::MetadataImage) -> bool,
) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if ready(&node.image()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
}
