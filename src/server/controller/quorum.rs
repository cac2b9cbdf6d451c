//! A voter's controller: the quorum member (`quorum::QuorumNode` over the fsynced metadata log
//! in `<data_dir>/__cluster_metadata-0`) driven on this node's controller shard, its transport
//! to the other voters, and the controller rules it runs while it is the active controller.
//!
//! One task ticks Raft every 100 ms; each peer has one sending task with a bounded queue
//! (Raft tolerates a lost message, so a full queue drops); inbound messages arrive through the
//! controller listener (`listener.rs`). Every Raft step is followed by `drive`, which runs
//! `handle_ready` (the storage syncs before votes and acknowledgements leave), sends, and
//! publishes the committed image. A metadata log that cannot be written stops the process:
//! a voter must not go on without its disk.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};

use super::wire::{self, Conn};
use crate::cluster::node::Node;
use crate::notify::Notify;
use crate::quorum::{
    Applied, Controller, ControllerConfig, ControllerError, DiskStorage, MetadataImage,
    MetadataRecord, Proposal, ProposeError, QuorumConfig, QuorumNode,
};

const TICK: Duration = Duration::from_millis(100);
/// Messages queued for one peer; more are dropped (Raft resends what matters).
const PEER_QUEUE_MAX: usize = 4096;
/// (index, term) of recently applied entries, to tell a proposal that committed from one lost
/// in a change of leader.
const APPLIED_RING: usize = 4096;
/// How long a proposal may wait for its commit before the caller is told to retry.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn metadata_dir(node: &Node) -> std::path::PathBuf {
    node.data_dir.join("__cluster_metadata-0")
}

/// Why a controller request was not done.
#[derive(Debug)]
pub enum ProposeFail {
    /// Not the active controller (any more): retry at the active one.
    NotLeader,
    Rejected(ControllerError),
    /// Appended, but its fate is unknown (a leader change or no quorum in time): retry.
    Timeout,
}

struct Peer {
    id: u64,
    addr: SocketAddr,
    queue: RefCell<VecDeque<Message>>,
    wake: Notify,
}

pub struct QuorumService {
    pub node: Arc<Node>,
    raft: RefCell<QuorumNode<DiskStorage>>,
    ctl: RefCell<Controller>,
    peers: BTreeMap<u64, Rc<Peer>>,
    /// Notified whenever entries are applied or the leader changes.
    pub changed: Notify,
    applied_terms: RefCell<VecDeque<(u64, u64)>>,
    started: Instant,
    /// The term in which this node was last seen active, to log changes once.
    active_term: Cell<Option<u64>>,
    known_leader: Cell<Option<u64>>,
    /// Set by the node's broker side: what to do with every newly committed image.
    pub on_image: RefCell<Option<Box<dyn Fn(&MetadataImage)>>>,
}

impl QuorumService {
    pub fn open(node: Arc<Node>) -> anyhow::Result<Rc<QuorumService>> {
        let settings = node
            .cluster
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("not a clustered node"))?;
        let voters: Vec<u64> = settings.voters.iter().map(|(id, _)| *id as u64).collect();
        let dir = metadata_dir(&node);
        std::fs::create_dir_all(&dir)?;
        let storage = DiskStorage::open(&dir, &voters, &[]).map_err(|e| {
            anyhow::anyhow!("cannot open the metadata log in {}: {e}", dir.display())
        })?;
        let raft = QuorumNode::open(QuorumConfig::new(node.node_id as u64), storage)
            .map_err(|e| anyhow::anyhow!("cannot open the metadata log: {e}"))?;
        let peers = settings
            .voters
            .iter()
            .filter(|(id, _)| *id != node.node_id)
            .map(|(id, addr)| {
                (
                    *id as u64,
                    Rc::new(Peer {
                        id: *id as u64,
                        addr: *addr,
                        queue: RefCell::new(VecDeque::new()),
                        wake: Notify::new(),
                    }),
                )
            })
            .collect();
        let ctl = Controller::new(ControllerConfig {
            session_timeout_ms: node.tuning.node.broker_session_timeout_ms,
            ..ControllerConfig::default()
        });
        Ok(Rc::new(QuorumService {
            node,
            raft: RefCell::new(raft),
            ctl: RefCell::new(ctl),
            peers,
            changed: Notify::new(),
            applied_terms: RefCell::new(VecDeque::new()),
            started: Instant::now(),
            active_term: Cell::new(None),
            known_leader: Cell::new(None),
            on_image: RefCell::new(None),
        }))
    }

    /// Starts the ticker and one sender per peer.
    pub fn start(self: &Rc<Self>) {
        for peer in self.peers.values() {
            glommio::spawn_local(peer_loop(Rc::downgrade(self), peer.clone())).detach();
        }
        glommio::spawn_local(ticker(self.clone())).detach();
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn image(&self) -> std::cell::Ref<'_, MetadataImage> {
        std::cell::Ref::map(self.raft.borrow(), |r| r.image())
    }

    pub fn is_leader(&self) -> bool {
        self.raft.borrow().is_leader()
    }

    pub fn leader_id(&self) -> Option<i32> {
        self.raft.borrow().leader_id().map(|id| id as i32)
    }

    pub fn term(&self) -> u64 {
        self.raft.borrow().term()
    }

    pub fn commit_index(&self) -> u64 {
        self.raft.borrow().commit_index()
    }

    pub fn progress(&self) -> Vec<(u64, u64)> {
        self.raft.borrow().progress()
    }

    /// The controller listener of a voter.
    pub fn voter_addr(&self, id: i32) -> Option<SocketAddr> {
        self.peers.get(&(id as u64)).map(|p| p.addr)
    }

    /// A message from a peer.
    pub fn step(&self, msg: Message) {
        self.raft.borrow_mut().step(msg);
        self.drive();
    }

    /// Runs Raft's ready cycle; sends, records what was applied, publishes the image.
    fn drive(&self) {
        let out = match self.raft.borrow_mut().handle_ready() {
            Ok(out) => out,
            Err(e) => {
                // Going on without the metadata log would let this voter forget a vote or an
                // acknowledged entry: stop, as Kafka does on a metadata log I/O error.
                tracing::error!("metadata log failed, stopping: {e}");
                std::process::exit(1);
            }
        };
        for m in out.messages {
            self.send(m);
        }
        let mut changed = false;
        if !out.applied.is_empty() {
            let mut ring = self.applied_terms.borrow_mut();
            for a in &out.applied {
                if let Applied::Entry { index, term, .. } = a {
                    if ring.len() == APPLIED_RING {
                        ring.pop_front();
                    }
                    ring.push_back((*index, *term));
                }
            }
            changed = true;
        }
        let leader = self.raft.borrow().leader_id();
        if leader != self.known_leader.get() {
            self.known_leader.set(leader);
            changed = true;
            match leader {
                Some(l) if l == self.node.node_id as u64 => {
                    tracing::info!("this node is the active controller (term {})", self.term())
                }
                Some(l) => tracing::info!("active controller is node {l} (term {})", self.term()),
                None => tracing::info!("no active controller (term {})", self.term()),
            }
        }
        if !self.is_leader() && self.active_term.get().is_some() {
            self.active_term.set(None);
            self.ctl.borrow_mut().deactivate();
        }
        if changed {
            if !out.applied.is_empty() {
                if let Some(f) = self.on_image.borrow().as_ref() {
                    f(self.raft.borrow().image());
                }
            }
            self.changed.notify_waiters();
        }
    }

    fn send(&self, m: Message) {
        let Some(peer) = self.peers.get(&m.to) else {
            return;
        };
        let mut q = peer.queue.borrow_mut();
        if q.len() >= PEER_QUEUE_MAX {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                drop(q);
                self.raft
                    .borrow_mut()
                    .report_snapshot(m.to, raft::SnapshotStatus::Failure);
            }
            return;
        }
        q.push_back(m);
        drop(q);
        peer.wake.notify_waiters();
    }

    fn report(&self, to: u64, snapshot: Option<raft::SnapshotStatus>) {
        let mut r = self.raft.borrow_mut();
        match snapshot {
            Some(s) => r.report_snapshot(to, s),
            None => r.report_unreachable(to),
        }
    }

    /// Runs a controller decision as the active controller and waits for its records to
    /// commit. `decide` gets the controller, the image its records will meet, their log index
    /// and the time; it returns a value for the caller and the records.
    pub async fn propose<T>(
        &self,
        decide: impl FnOnce(
            &mut Controller,
            &MetadataImage,
            u64,
            u64,
        ) -> Result<(T, Vec<MetadataRecord>), ControllerError>,
    ) -> Result<T, ProposeFail> {
        let now = self.now_ms();
        let mut value = None;
        let proposal = {
            let mut raft = self.raft.borrow_mut();
            let term = raft.term();
            let mut ctl = self.ctl.borrow_mut();
            if raft.is_leader() {
                self.active_term.set(Some(term));
            }
            raft.propose_with(|img, index| {
                ctl.activate(term, img, now);
                let (v, records) = decide(&mut ctl, img, index, now)?;
                value = Some(v);
                Ok(records)
            })
        };
        let fail = |e| match e {
            ProposeError::NotLeader { .. } => ProposeFail::NotLeader,
            ProposeError::Rejected(e) => ProposeFail::Rejected(e),
            ProposeError::Dropped(_) => ProposeFail::NotLeader,
            ProposeError::Quorum(e) => {
                tracing::error!("metadata log failed, stopping: {e}");
                std::process::exit(1);
            }
        };
        match proposal.map_err(fail)? {
            Proposal::Nothing => {}
            Proposal::Appended { index, term } => {
                self.drive();
                self.wait_committed(index, term).await?;
            }
        }
        value.ok_or(ProposeFail::Timeout)
    }

    async fn wait_committed(&self, index: u64, term: u64) -> Result<(), ProposeFail> {
        let deadline = Instant::now() + COMMIT_TIMEOUT;
        loop {
            let notified = self.changed.notified();
            if self.image().applied_index >= index {
                let ring = self.applied_terms.borrow();
                return match ring.iter().find(|(i, _)| *i == index) {
                    Some((_, t)) if *t == term => Ok(()),
                    Some(_) => Err(ProposeFail::NotLeader),
                    // Applied through a snapshot: its fate cannot be told here.
                    None => Err(ProposeFail::Timeout),
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ProposeFail::Timeout);
            }
            wire::within(left, notified).await;
        }
    }

    /// Waits until some node is the active controller, for at most `d`.
    pub async fn wait_for_leader(&self, d: Duration) -> Option<i32> {
        let deadline = Instant::now() + d;
        loop {
            let notified = self.changed.notified();
            if let Some(l) = self.leader_id() {
                return Some(l);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            wire::within(left.min(TICK), notified).await;
        }
    }

    /// Waits until the committed image moves past `index`, for at most `d`.
    pub async fn wait_applied_past(&self, index: u64, d: Duration) {
        let deadline = Instant::now() + d;
        loop {
            let notified = self.changed.notified();
            if self.image().applied_index > index {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            wire::within(left, notified).await;
        }
    }
}

/// Elections one rebalance pass makes at most (the rest wait for the next pass).
const REBALANCE_ELECTIONS_MAX: usize = 1000;

async fn ticker(q: Rc<QuorumService>) {
    let mut last_expiry_ms = 0;
    let mut last_rebalance_ms = q.now_ms();
    loop {
        glommio::timer::sleep(TICK).await;
        q.raft.borrow_mut().tick();
        q.drive();
        if !q.is_leader() {
            continue;
        }
        if q.image().cluster_id.is_none() {
            // The first leader of a new quorum names the cluster.
            let id = uuid::Uuid::new_v4();
            let q2 = q.clone();
            glommio::spawn_local(async move {
                let r = q2
                    .propose(|_, img, _, _| Ok(((), Controller::bootstrap(img, id))))
                    .await;
                if r.is_ok() {
                    tracing::info!(
                        "formed cluster {}",
                        crate::cluster::meta_properties::encode_uuid(&id)
                    );
                }
            })
            .detach();
            continue;
        }
        let now = q.now_ms();
        let tuning = &q.node.tuning.node;
        if tuning.auto_leader_rebalance_enable
            && now.saturating_sub(last_rebalance_ms) >= tuning.leader_imbalance_check_interval_ms
        {
            last_rebalance_ms = now;
            let q2 = q.clone();
            glommio::spawn_local(async move {
                let moved = q2
                    .propose(|_, img, _, _| {
                        let recs = crate::quorum::controller::preferred_rebalance(
                            img,
                            REBALANCE_ELECTIONS_MAX,
                        );
                        Ok((recs.len(), recs))
                    })
                    .await;
                if let Ok(n @ 1..) = moved {
                    tracing::info!("moved {n} partitions back to their preferred leaders");
                }
            })
            .detach();
        }
        if now.saturating_sub(last_expiry_ms) >= 500 {
            last_expiry_ms = now;
            let q2 = q.clone();
            glommio::spawn_local(async move {
                let _ = q2
                    .propose(|ctl, img, _, now| {
                        let mut fenced = ctl.expire_sessions(img, now);
                        if fenced.is_empty() {
                            fenced = crate::quorum::controller::pending_unclean_elections(img);
                        }
                        for r in &fenced {
                            if let MetadataRecord::FenceBroker { broker_id, .. } = r {
                                tracing::warn!(
                                    "broker {broker_id} missed its session timeout: fenced"
                                );
                            }
                        }
                        Ok(((), fenced))
                    })
                    .await;
            })
            .detach();
        }
    }
}

/// Sends one peer's queued messages over one connection, reconnecting when it breaks.
async fn peer_loop(q: std::rc::Weak<QuorumService>, peer: Rc<Peer>) {
    let mut conn: Option<Conn> = None;
    loop {
        let notified = peer.wake.notified();
        let next = peer.queue.borrow_mut().pop_front();
        let Some(msg) = next else {
            wire::within(Duration::from_secs(1), notified).await;
            continue;
        };
        let Some(svc) = q.upgrade() else { return };
        let snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
        if conn.is_none() {
            match Conn::connect(peer.addr, Duration::from_millis(500)).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    // Unreachable: drop what is queued (Raft probes again) and back off.
                    peer.queue.borrow_mut().clear();
                    if snapshot {
                        svc.report(peer.id, Some(raft::SnapshotStatus::Failure));
                    }
                    svc.report(peer.id, None);
                    drop(svc);
                    glommio::timer::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let bytes = match msg.write_to_bytes() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("cannot encode a raft message: {e}");
                continue;
            }
        };
        let c = conn.as_mut().expect("connected above");
        match c.send_private(wire::RAFT_MESSAGE_KEY, &bytes).await {
            Ok(()) => {
                if snapshot {
                    svc.report(peer.id, Some(raft::SnapshotStatus::Finish));
                }
            }
            Err(_) => {
                conn = None;
                if snapshot {
                    svc.report(peer.id, Some(raft::SnapshotStatus::Failure));
                }
                svc.report(peer.id, None);
            }
        }
    }
}
