//! Deterministic simulation of the controller quorum (`fjord::quorum`).
//!
//! Three voters and one learner (a KRaft observer) run the real `QuorumNode` and `Controller`
//! code on one thread, on a simulated clock, over a simulated network that drops, delays,
//! reorders, duplicates and partitions messages; nodes crash and restart from what their storage
//! had synced. Brokers register, heartbeat, crash, come back, and a rogue process now and then
//! claims a live broker id; clients create and delete topics. Everything is drawn from one seed,
//! so a failing schedule replays exactly.
//!
//! Checked after every step:
//! - at most one leader per term;
//! - every node applies committed entries contiguously, and what any node applies at an index is
//!   what every other node applied there (no committed record lost or reordered): a node's
//!   applied sequence is always a prefix of the longest;
//! - every node's image at index i is the image the committed log gives at i (snapshots and
//!   restarts included);
//! - in every committed image a partition's leader is unfenced and in the ISR, and a fenced
//!   broker stays in an ISR only as its last member, leaderless;
//!
//! and at the end, once the network heals and every node is up: all nodes converge on the same
//! image at the same index.
//!
//! `FJORD_QUORUM_SEEDS=N` sets how many schedules run (default below, sized for CI in a debug
//! build) and `FJORD_QUORUM_SEED_BASE` the first (1: CI runs fixed seeds; change it to explore);
//! `FJORD_QUORUM_SEED=S` replays the one schedule S; `FJORD_QUORUM_STEPS` overrides the steps
//! per schedule.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::time::Instant;

use bytes::Bytes;
use fjord::quorum::controller::{CreateTopicRequest, HeartbeatRequest, RegisterRequest};
use fjord::quorum::record::{Listener, NO_LEADER};
use fjord::quorum::{
    Applied, Controller, ControllerConfig, ControllerError, DiskStorage, LogState, MemDisk,
    MemStorage, MetadataImage, MetadataRecord, Proposal, ProposeError, QuorumConfig, QuorumNode,
    QuorumStorage,
};
use raft::eraftpb::{Message, MessageType};
use uuid::Uuid;

const VOTERS: [u64; 3] = [1, 2, 3];
const LEARNER: u64 = 4;
const NODE_IDS: [u64; 4] = [1, 2, 3, 4];
const STEP_MS: u64 = 10;
const TICK_MS: u64 = 100;
const BROKERS: i32 = 5;
const HEARTBEAT_MS: u64 = 2_000;
/// Simulated time allowed for convergence once everything heals (steps of STEP_MS).
const HEAL_STEPS_MAX: usize = 6_000;
const DEFAULT_SEEDS: u64 = 48;
const DEFAULT_STEPS: usize = 4_000;

/// splitmix64: tiny, seedable, good enough to draw schedules.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi_inclusive: u64) -> u64 {
        lo + self.below(hi_inclusive - lo + 1)
    }
    /// True with probability `per_million` / 1e6.
    fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
    fn uuid(&mut self) -> Uuid {
        Uuid::from_u128(((self.next() as u128) << 64) | self.next() as u128)
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

struct Flight {
    at_ms: u64,
    seq: u64,
    msg: Message,
}

/// A node's durable storage as the simulator holds it across crashes.
trait SimDisk {
    type Storage: QuorumStorage;
    /// What a (re)started process finds.
    fn open(&self) -> Self::Storage;
}

/// In memory: crashes lose exactly what was not synced.
impl SimDisk for MemDisk {
    type Storage = MemStorage;
    fn open(&self) -> MemStorage {
        MemStorage::open(self)
    }
}

/// Real files (`DiskStorage`): crashes lose the frames not yet written and synced.
struct DirDisk(std::path::PathBuf);

impl SimDisk for DirDisk {
    type Storage = DiskStorage;
    fn open(&self) -> DiskStorage {
        DiskStorage::open(&self.0, &VOTERS, &[LEARNER]).expect("open the quorum directory")
    }
}

struct Node<D: SimDisk> {
    id: u64,
    disk: D,
    raft: Option<QuorumNode<D::Storage>>,
    /// Broker sessions: memory, lost in a crash.
    ctl: Controller,
    down_until_ms: u64,
    next_tick_ms: u64,
    /// The index this node must apply next (the checker's view).
    next_apply: u64,
}

struct Broker {
    id: i32,
    incarnation: Uuid,
    dir: Uuid,
    epoch: Option<i64>,
    up: bool,
    down_until_ms: u64,
    next_action_ms: u64,
    contact: u64,
}

#[derive(Default, Debug, Clone)]
struct Stats {
    steps: u64,
    terms_with_leader: u64,
    committed: u64,
    node_crashes: u64,
    partitions: u64,
    messages_sent: u64,
    messages_dropped: u64,
    fences: u64,
    unfences: u64,
    controlled_shutdowns: u64,
    registrations: u64,
    duplicates_refused: u64,
    topics_created: u64,
    invalid_replication_factor: u64,
    snapshots_installed: u64,
    not_leader_answers: u64,
    heal_steps: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        self.terms_with_leader += o.terms_with_leader;
        self.committed += o.committed;
        self.node_crashes += o.node_crashes;
        self.partitions += o.partitions;
        self.messages_sent += o.messages_sent;
        self.messages_dropped += o.messages_dropped;
        self.fences += o.fences;
        self.unfences += o.unfences;
        self.controlled_shutdowns += o.controlled_shutdowns;
        self.registrations += o.registrations;
        self.duplicates_refused += o.duplicates_refused;
        self.topics_created += o.topics_created;
        self.invalid_replication_factor += o.invalid_replication_factor;
        self.snapshots_installed += o.snapshots_installed;
        self.not_leader_answers += o.not_leader_answers;
        self.heal_steps += o.heal_steps;
    }
}

/// Fault rates drawn per schedule (swarm testing: some schedules are calm, some are storms).
struct Faults {
    drop_per_million: u64,
    duplicate_per_million: u64,
    delay_max_ms: u64,
    crash_per_million: u64,
    /// Crash a node right after it sent a vote or an append acknowledgement: the moment a
    /// write that was acknowledged but not durable would be lost.
    crash_after_ack_per_million: u64,
    partition_per_million: u64,
    heal_per_million: u64,
}

struct Sim<D: SimDisk> {
    seed: u64,
    rng: Rng,
    now_ms: u64,
    step: usize,
    nodes: Vec<Node<D>>,
    net: Vec<Flight>,
    seq: u64,
    /// Cut links, as (low id, high id).
    cut: BTreeSet<(u64, u64)>,
    faults: Faults,
    chaos: bool,
    brokers: Vec<Broker>,
    leaders: BTreeMap<u64, u64>,
    /// The committed log as the nodes applied it: entry i + 1 is (term, data).
    log: Vec<(u64, Bytes)>,
    /// The image the committed log gives, and its fingerprint after every index.
    reference: MetadataImage,
    fingerprints: Vec<u64>,
    topics_named: u64,
    stats: Stats,
}

fn fingerprint(img: &MetadataImage) -> u64 {
    let mut h = DefaultHasher::new();
    img.encode_snapshot().hash(&mut h);
    h.finish()
}

fn node_config(id: u64, rng: &mut Rng) -> QuorumConfig {
    let mut c = QuorumConfig::new(id);
    // Distinct per voter, redrawn at each restart: elections differ by schedule, yet replay.
    c.election_timeout_ticks = c.election_tick + id as usize * 3 + rng.below(3) as usize;
    // Small, so compaction and snapshot transfer happen in every schedule.
    c.snapshot_entries_max = 24 + rng.below(40);
    c.max_size_per_msg = 16 * 1024;
    c.max_inflight_msgs = 8;
    c
}

impl<D: SimDisk> Sim<D> {
    /// `disks` in node id order, fresh.
    fn new(seed: u64, disks: Vec<D>) -> Self {
        let mut rng = Rng(seed);
        let faults = Faults {
            drop_per_million: rng.pick(&[0, 10_000, 50_000, 200_000]),
            duplicate_per_million: rng.pick(&[0, 5_000, 20_000]),
            delay_max_ms: rng.pick(&[5, 30, 120, 400]),
            crash_per_million: rng.pick(&[0, 500, 2_000, 8_000]),
            crash_after_ack_per_million: rng.pick(&[0, 20_000, 100_000]),
            partition_per_million: rng.pick(&[0, 1_000, 3_000]),
            heal_per_million: rng.pick(&[2_000, 10_000]),
        };
        let mut nodes = Vec::new();
        for (id, disk) in NODE_IDS.into_iter().zip(disks) {
            let raft = QuorumNode::open(node_config(id, &mut rng), disk.open())
                .expect("open a fresh node");
            nodes.push(Node {
                id,
                disk,
                raft: Some(raft),
                ctl: Controller::new(ControllerConfig::default()),
                down_until_ms: 0,
                next_tick_ms: rng.range(1, TICK_MS),
                next_apply: 1,
            });
        }
        let brokers = (1..=BROKERS)
            .map(|id| Broker {
                id,
                incarnation: rng.uuid(),
                dir: rng.uuid(),
                epoch: None,
                up: true,
                down_until_ms: 0,
                next_action_ms: rng.range(0, 3_000),
                contact: rng.pick(&NODE_IDS),
            })
            .collect();
        Sim {
            seed,
            rng,
            now_ms: 0,
            step: 0,
            nodes,
            net: Vec::new(),
            seq: 0,
            cut: BTreeSet::new(),
            faults,
            chaos: true,
            brokers,
            leaders: BTreeMap::new(),
            log: Vec::new(),
            reference: MetadataImage::default(),
            fingerprints: Vec::new(),
            topics_named: 0,
            stats: Stats::default(),
        }
    }

    fn run(&mut self, steps: usize) -> Result<(), String> {
        for _ in 0..steps {
            self.step_once()?;
        }
        self.heal();
        for _ in 0..HEAL_STEPS_MAX {
            self.step_once()?;
            self.stats.heal_steps += 1;
            if self.converged() {
                return Ok(());
            }
        }
        Err(format!(
            "no convergence {HEAL_STEPS_MAX} steps after healing: {}",
            self.describe()
        ))
    }

    fn describe(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| match &n.raft {
                Some(r) => format!(
                    "{}:{}{} t{} c{} a{}",
                    n.id,
                    if r.is_leader() { "L" } else { "" },
                    r.leader_id().unwrap_or(0),
                    r.term(),
                    r.commit_index(),
                    r.image().applied_index
                ),
                None => format!("{}:down", n.id),
            })
            .collect();
        format!("log {} nodes [{}]", self.log.len(), nodes.join(", "))
    }

    fn step_once(&mut self) -> Result<(), String> {
        self.step += 1;
        self.stats.steps += 1;
        self.now_ms += STEP_MS;
        if self.chaos {
            self.inject_faults();
        }
        self.restart_due()?;
        self.deliver();
        self.tick_nodes();
        if self.chaos {
            self.brokers_act();
            self.clients_act();
        }
        self.controller_duties();
        self.ready_all()?;
        self.check()
    }

    // ---- faults ----

    fn inject_faults(&mut self) {
        if self.rng.chance(self.faults.crash_per_million) {
            let i = self.rng.below(self.nodes.len() as u64) as usize;
            if self.nodes[i].raft.is_some() {
                self.crash(i);
            }
        }
        if self.rng.chance(self.faults.partition_per_million) {
            self.stats.partitions += 1;
            let a = self.rng.pick(&NODE_IDS);
            if self.rng.chance(500_000) {
                // Isolate one node from all others.
                for b in NODE_IDS {
                    if b != a {
                        self.cut.insert((a.min(b), a.max(b)));
                    }
                }
            } else {
                let b = self.rng.pick(&NODE_IDS);
                if a != b {
                    self.cut.insert((a.min(b), a.max(b)));
                }
            }
        }
        if !self.cut.is_empty() && self.rng.chance(self.faults.heal_per_million) {
            self.cut.clear();
        }
    }

    fn crash(&mut self, i: usize) {
        let down_ms = self.rng.range(200, 12_000);
        let n = &mut self.nodes[i];
        n.raft = None;
        n.ctl = Controller::new(ControllerConfig::default());
        n.down_until_ms = self.now_ms + down_ms;
        self.stats.node_crashes += 1;
    }

    fn heal(&mut self) {
        self.chaos = false;
        self.cut.clear();
        self.faults.drop_per_million = 0;
        self.faults.duplicate_per_million = 0;
        self.faults.delay_max_ms = self.faults.delay_max_ms.min(20);
        for n in &mut self.nodes {
            n.down_until_ms = n.down_until_ms.min(self.now_ms);
        }
    }

    fn restart_due(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].raft.is_some() || self.nodes[i].down_until_ms > self.now_ms {
                continue;
            }
            let config = node_config(self.nodes[i].id, &mut self.rng);
            let n = &mut self.nodes[i];
            let raft = QuorumNode::open(config, n.disk.open())
                .map_err(|e| format!("node {} cannot restart: {e}", n.id))?;
            let at = raft.image().applied_index;
            n.next_apply = at + 1;
            n.next_tick_ms = self.now_ms + TICK_MS;
            let fp = fingerprint(raft.image());
            n.raft = Some(raft);
            let id = n.id;
            self.check_image_at(id, at, fp, "restart")?;
        }
        Ok(())
    }

    fn link_up(&self, a: u64, b: u64) -> bool {
        !self.cut.contains(&(a.min(b), a.max(b)))
    }

    fn node_mut(&mut self, id: u64) -> &mut Node<D> {
        &mut self.nodes[(id - 1) as usize]
    }

    fn send(&mut self, msg: Message) {
        self.stats.messages_sent += 1;
        let (from, to) = (msg.from, msg.to);
        let dropped = !self.link_up(from, to) || self.rng.chance(self.faults.drop_per_million);
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            // raft-rs waits for this report before it sends the follower anything else.
            let status = if dropped {
                raft::SnapshotStatus::Failure
            } else {
                raft::SnapshotStatus::Finish
            };
            if let Some(r) = self.node_mut(from).raft.as_mut() {
                r.report_snapshot(to, status);
            }
        }
        if dropped {
            self.stats.messages_dropped += 1;
            return;
        }
        let copies = if self.rng.chance(self.faults.duplicate_per_million) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at_ms = self.now_ms + self.rng.range(1, self.faults.delay_max_ms);
            self.seq += 1;
            self.net.push(Flight {
                at_ms,
                seq: self.seq,
                msg: msg.clone(),
            });
        }
    }

    fn deliver(&mut self) {
        let now = self.now_ms;
        let (mut due, rest): (Vec<Flight>, Vec<Flight>) =
            self.net.drain(..).partition(|f| f.at_ms <= now);
        self.net = rest;
        due.sort_by_key(|f| (f.at_ms, f.seq));
        for f in due {
            let (from, to) = (f.msg.from, f.msg.to);
            if !self.link_up(from, to) {
                self.stats.messages_dropped += 1;
                continue;
            }
            match self.node_mut(to).raft.as_mut() {
                Some(r) => r.step(f.msg),
                None => self.stats.messages_dropped += 1,
            }
        }
    }

    fn tick_nodes(&mut self) {
        let now = self.now_ms;
        for n in &mut self.nodes {
            let Some(r) = n.raft.as_mut() else { continue };
            while n.next_tick_ms <= now {
                r.tick();
                n.next_tick_ms += TICK_MS;
            }
        }
    }

    // ---- workload ----

    /// Runs a controller decision on node `id`, as the broker RPC handler would.
    fn propose(
        &mut self,
        id: u64,
        decide: impl FnOnce(
            &mut Controller,
            &MetadataImage,
            u64,
            u64,
        ) -> Result<Vec<MetadataRecord>, ControllerError>,
    ) -> Option<Result<Proposal, ProposeError<ControllerError>>> {
        let now = self.now_ms;
        let n = self.node_mut(id);
        let r = n.raft.as_mut()?;
        let term = r.term();
        let ctl = &mut n.ctl;
        let res = r.propose_with(|img, index| {
            ctl.activate(term, img, now);
            decide(ctl, img, index, now)
        });
        if let Err(ProposeError::NotLeader { .. }) = res {
            self.stats.not_leader_answers += 1;
        }
        Some(res)
    }

    fn redirect(&mut self, b: usize, leader: Option<u64>) {
        self.brokers[b].contact = match leader {
            Some(id) => id,
            None => self.rng.pick(&NODE_IDS),
        };
        self.brokers[b].next_action_ms = self.now_ms + self.rng.range(50, 300);
    }

    fn brokers_act(&mut self) {
        for b in 0..self.brokers.len() {
            let now = self.now_ms;
            if !self.brokers[b].up {
                if self.brokers[b].down_until_ms <= now {
                    // Restart from the same data dir: new incarnation, same directory id.
                    let br = &mut self.brokers[b];
                    br.up = true;
                    br.incarnation = self.rng.uuid();
                    br.epoch = None;
                    br.next_action_ms = now;
                }
                continue;
            }
            if self.rng.chance(600) {
                let down = self.rng.range(1_000, 20_000);
                // Half the time a SIGTERM: a controlled shutdown asked for first, whatever
                // comes of it (the controller may be away), then the process goes.
                if let (true, Some(broker_epoch)) =
                    (self.rng.chance(500_000), self.brokers[b].epoch)
                {
                    let req = HeartbeatRequest {
                        broker_id: self.brokers[b].id,
                        broker_epoch,
                        metadata_offset: 0,
                        want_shutdown: true,
                    };
                    let contact = self.brokers[b].contact;
                    let res = self.propose(contact, |ctl, img, _, now| {
                        ctl.heartbeat(img, &req, now).map(|(_, recs)| recs)
                    });
                    if let Some(Ok(Proposal::Appended { .. })) = res {
                        self.stats.controlled_shutdowns += 1;
                    }
                }
                let br = &mut self.brokers[b];
                br.up = false;
                br.down_until_ms = now + down;
                continue;
            }
            if self.brokers[b].next_action_ms > now {
                continue;
            }
            // The link from a broker to a controller fails now and then.
            if self.rng.chance(50_000) {
                self.brokers[b].next_action_ms = now + 500;
                continue;
            }
            let contact = self.brokers[b].contact;
            let Some(metadata_offset) = self
                .node_mut(contact)
                .raft
                .as_ref()
                .map(|r| r.image().applied_index)
            else {
                self.redirect(b, None);
                continue;
            };
            let br = &self.brokers[b];
            let (broker_id, epoch) = (br.id, br.epoch);
            let res = match epoch {
                None => {
                    let req = RegisterRequest {
                        broker_id,
                        incarnation_id: br.incarnation,
                        directory_id: br.dir,
                        cluster_id: None,
                        listeners: vec![Listener {
                            name: "PLAINTEXT".into(),
                            host: format!("broker{broker_id}"),
                            port: 9092,
                        }],
                        rack: Some(format!("rack{}", broker_id % 3)),
                    };
                    self.propose(contact, |ctl, img, index, now| {
                        ctl.register(img, &req, index as i64, now)
                    })
                }
                Some(broker_epoch) => {
                    let req = HeartbeatRequest {
                        broker_id,
                        broker_epoch,
                        metadata_offset,
                        want_shutdown: false,
                    };
                    self.propose(contact, |ctl, img, _, now| {
                        ctl.heartbeat(img, &req, now).map(|(_, recs)| recs)
                    })
                }
            };
            let next = now + HEARTBEAT_MS - self.rng.below(200);
            match res {
                None => self.redirect(b, None),
                Some(Ok(Proposal::Appended { index, .. })) => {
                    if epoch.is_none() {
                        self.stats.registrations += 1;
                        self.brokers[b].epoch = Some(index as i64);
                        // Heartbeat soon: it unfences once caught up.
                        self.brokers[b].next_action_ms = now + 300;
                    } else {
                        self.brokers[b].next_action_ms = next;
                    }
                }
                Some(Ok(Proposal::Nothing)) => self.brokers[b].next_action_ms = next,
                Some(Err(ProposeError::NotLeader { leader_id })) => self.redirect(b, leader_id),
                Some(Err(ProposeError::Rejected(e))) => {
                    if let ControllerError::DuplicateBrokerRegistration(_) = e {
                        self.stats.duplicates_refused += 1;
                    }
                    // Stale epoch or unknown: register again (a real broker would too).
                    self.brokers[b].epoch = None;
                    self.brokers[b].next_action_ms = now + 1_000;
                }
                Some(Err(e)) => panic!("seed {}: unexpected proposal error {e}", self.seed),
            }
        }
        // A rogue process claims a random id with its own disk: refused while the owner is live.
        if self.rng.chance(2_000) {
            let broker_id = self.rng.range(1, BROKERS as u64) as i32;
            let req = RegisterRequest {
                broker_id,
                incarnation_id: self.rng.uuid(),
                directory_id: self.rng.uuid(),
                cluster_id: None,
                listeners: vec![],
                rack: None,
            };
            let id = self.leader().unwrap_or(1);
            let res = self.propose(id, |ctl, img, index, now| {
                ctl.register(img, &req, index as i64, now)
            });
            if let Some(Err(ProposeError::Rejected(
                ControllerError::DuplicateBrokerRegistration(_),
            ))) = res
            {
                self.stats.duplicates_refused += 1;
            }
        }
    }

    fn leader(&self) -> Option<u64> {
        self.nodes
            .iter()
            .find(|n| n.raft.as_ref().is_some_and(|r| r.is_leader()))
            .map(|n| n.id)
    }

    fn clients_act(&mut self) {
        if !self.rng.chance(25_000) {
            return;
        }
        let Some(id) = self.leader() else { return };
        let action = self.rng.below(10);
        if action < 7 {
            self.topics_named += 1;
            let req = CreateTopicRequest {
                name: format!("t{}", self.topics_named),
                topic_id: self.rng.uuid(),
                partitions: self.rng.range(1, 4) as i32,
                replication_factor: self.rng.range(1, 5) as i32,
                configs: BTreeMap::new(),
                assignment: None,
            };
            match self.propose(id, |ctl, img, _, _| ctl.create_topic(img, &req)) {
                Some(Ok(_)) => self.stats.topics_created += 1,
                Some(Err(ProposeError::Rejected(ControllerError::InvalidReplicationFactor {
                    ..
                }))) => self.stats.invalid_replication_factor += 1,
                _ => {}
            }
        } else {
            let n = self.rng.range(1, self.topics_named.max(1));
            let name = format!("t{n}");
            self.propose(id, |ctl, img, _, _| {
                if action == 9 {
                    ctl.delete_topic(img, &name)
                } else {
                    let changes = [("retention.ms".to_string(), Some(format!("{action}")))];
                    ctl.alter_topic_configs(img, &name, &changes)
                }
            });
        }
    }

    fn controller_duties(&mut self) {
        let cluster_id = Uuid::from_u128(self.seed as u128);
        for id in NODE_IDS {
            let n = self.node_mut(id);
            let Some(r) = n.raft.as_ref() else { continue };
            if !r.is_leader() {
                n.ctl.deactivate();
                continue;
            }
            if r.image().cluster_id.is_none() {
                self.propose(id, |_, img, _, _| {
                    Ok(Controller::bootstrap(img, cluster_id))
                });
            }
            if self.chaos && self.step.is_multiple_of((TICK_MS / STEP_MS) as usize) {
                self.propose(id, |ctl, img, _, now| Ok(ctl.expire_sessions(img, now)));
            }
        }
    }

    fn ready_all(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            let id = self.nodes[i].id;
            let Some(r) = self.nodes[i].raft.as_mut() else {
                continue;
            };
            let out = r
                .handle_ready()
                .map_err(|e| format!("node {id} stopped: {e}"))?;
            let fp_after = if out.applied.is_empty() {
                0
            } else {
                fingerprint(r.image())
            };
            let n_applied = out.applied.len();
            for (k, a) in out.applied.into_iter().enumerate() {
                // Only the last applied state is observable here; intermediate images are
                // checked through the log (their content is fixed by the entries).
                let last = k + 1 == n_applied;
                self.on_applied(i, a, last.then_some(fp_after))?;
            }
            let acked = out.messages.iter().any(|m| {
                matches!(
                    m.get_msg_type(),
                    MessageType::MsgAppendResponse | MessageType::MsgRequestVoteResponse
                )
            });
            for m in out.messages {
                self.send(m);
            }
            if self.chaos && acked && self.rng.chance(self.faults.crash_after_ack_per_million) {
                self.crash(i);
            }
        }
        Ok(())
    }

    fn on_applied(&mut self, i: usize, a: Applied, fp: Option<u64>) -> Result<(), String> {
        let id = self.nodes[i].id;
        let at = match a {
            Applied::Snapshot { index, .. } => {
                self.nodes[i].next_apply = index + 1;
                self.stats.snapshots_installed += 1;
                // Its image is checked like any other: as the final image of this ready, or
                // through the entries applied on top of it (the node may have compacted into a
                // newer snapshot meanwhile, so its storage cannot tell).
                if index as usize > self.log.len() {
                    return Err(format!(
                        "node {id} installed a snapshot at {index} past the committed log {}",
                        self.log.len()
                    ));
                }
                index
            }
            Applied::Entry { index, term, data } => {
                let want = self.nodes[i].next_apply;
                if index != want {
                    return Err(format!("node {id} applied {index}, expected {want}"));
                }
                self.nodes[i].next_apply = index + 1;
                let at = (index - 1) as usize;
                if at < self.log.len() {
                    if self.log[at] != (term, data.clone()) {
                        return Err(format!(
                            "node {id} applied at {index} term {term} {} bytes, but term {} {} bytes was applied there before: a committed record was lost or reordered",
                            data.len(),
                            self.log[at].0,
                            self.log[at].1.len()
                        ));
                    }
                } else if at == self.log.len() {
                    self.reference.apply_entry(index, term, &data).ok();
                    self.count_records(&data);
                    self.log.push((term, data));
                    self.fingerprints.push(fingerprint(&self.reference));
                    self.stats.committed += 1;
                } else {
                    return Err(format!(
                        "node {id} applied {index} past the committed log's end {}",
                        self.log.len()
                    ));
                }
                index
            }
        };
        match fp {
            Some(fp) => self.check_image_at(id, at, fp, "apply"),
            None => Ok(()),
        }
    }

    fn count_records(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if let Ok(records) = fjord::quorum::record::decode_batch(data) {
            for r in records {
                match r {
                    MetadataRecord::FenceBroker { .. } => self.stats.fences += 1,
                    MetadataRecord::UnfenceBroker { .. } => self.stats.unfences += 1,
                    _ => {}
                }
            }
        }
    }

    fn check_image_at(&self, id: u64, index: u64, fp: u64, when: &str) -> Result<(), String> {
        if index == 0 {
            return Ok(());
        }
        match self.fingerprints.get((index - 1) as usize) {
            Some(want) if *want == fp => Ok(()),
            Some(_) => Err(format!(
                "node {id} image at {index} ({when}) differs from the committed log's"
            )),
            None => Err(format!(
                "node {id} has an image at {index} ({when}) beyond the committed log {}",
                self.log.len()
            )),
        }
    }

    // ---- invariants ----

    fn check(&mut self) -> Result<(), String> {
        for n in &self.nodes {
            let Some(r) = &n.raft else { continue };
            if r.is_leader() {
                let prev = *self.leaders.entry(r.term()).or_insert(n.id);
                if prev != n.id {
                    return Err(format!(
                        "two leaders in term {}: {prev} and {}",
                        r.term(),
                        n.id
                    ));
                }
                if n.id == LEARNER {
                    return Err("the learner became leader".into());
                }
            }
            check_committed_image(r.image()).map_err(|e| format!("node {}: {e}", n.id))?;
        }
        self.stats.terms_with_leader = self.leaders.len() as u64;
        Ok(())
    }

    fn converged(&self) -> bool {
        let Some(leader) = self.leader() else {
            return false;
        };
        let Some(target) = self.nodes[(leader - 1) as usize]
            .raft
            .as_ref()
            .map(|r| r.last_index())
        else {
            return false;
        };
        self.nodes.iter().all(|n| {
            n.raft
                .as_ref()
                .is_some_and(|r| r.image().applied_index == target && r.commit_index() == target)
        }) && self.log.len() as u64 == target
    }
}

/// What a committed image must never show.
fn check_committed_image(img: &MetadataImage) -> Result<(), String> {
    for p in img.partitions() {
        let name = &img.topics[&p.topic_id].name;
        if p.leader != NO_LEADER {
            if !img.is_unfenced(p.leader) {
                return Err(format!(
                    "{name}-{}: leader {} is fenced or unknown at {}",
                    p.partition, p.leader, img.applied_index
                ));
            }
            if !p.isr.contains(&p.leader) {
                return Err(format!(
                    "{name}-{}: leader {} not in ISR {:?}",
                    p.partition, p.leader, p.isr
                ));
            }
        }
        for r in &p.isr {
            let sole_leaderless = p.isr.len() == 1 && p.leader == NO_LEADER;
            if !img.is_unfenced(*r) && !sole_leaderless {
                return Err(format!(
                    "{name}-{}: fenced broker {r} in ISR {:?} (leader {})",
                    p.partition, p.isr, p.leader
                ));
            }
        }
    }
    Ok(())
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok())
}

/// Straight to stderr, past the test harness's capture: CI logs show what was checked even
/// when the test passes.
fn say(line: String) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A digest of a whole run: the committed log and every node's final image.
fn mem_disks() -> Vec<MemDisk> {
    NODE_IDS
        .iter()
        .map(|_| MemDisk::new(LogState::new(&VOTERS, &[LEARNER])))
        .collect()
}

fn run_digest(seed: u64, steps: usize) -> u64 {
    let mut sim = Sim::new(seed, mem_disks());
    sim.run(steps).expect("schedule passes");
    let mut h = DefaultHasher::new();
    sim.log.hash(&mut h);
    for n in &sim.nodes {
        n.raft.as_ref().map(|r| fingerprint(r.image())).hash(&mut h);
    }
    h.finish()
}

/// The same schedules on real files: `DiskStorage` under raft-rs, crashes included (a crash
/// loses what was not synced; power loss below the page cache is out of its reach).
#[test]
fn quorum_simulation_on_disk() {
    let seeds = env_u64("FJORD_QUORUM_DISK_SEEDS").unwrap_or(8);
    let started = Instant::now();
    let mut steps = 0;
    for seed in 1..=seeds {
        let root = tempfile::tempdir().expect("temp dir");
        let disks = NODE_IDS
            .iter()
            .map(|id| DirDisk(root.path().join(format!("node{id}"))))
            .collect();
        let mut sim = Sim::new(seed, disks);
        if let Err(e) = sim.run(DEFAULT_STEPS) {
            panic!(
                "quorum simulation on disk failed: seed {seed}, step {}: {e}",
                sim.step
            );
        }
        steps += sim.stats.steps;
    }
    say(format!(
        "quorum simulation on disk: {seeds} schedules, {steps} steps in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}

#[test]
fn quorum_simulation_replays_exactly() {
    assert_eq!(run_digest(77, 1_500), run_digest(77, 1_500));
}

#[test]
fn quorum_simulation() {
    let started = Instant::now();
    let steps = env_u64("FJORD_QUORUM_STEPS").map_or(DEFAULT_STEPS, |s| s as usize);
    let (seeds, replay): (Vec<u64>, bool) = match env_u64("FJORD_QUORUM_SEED") {
        Some(s) => (vec![s], true),
        None => {
            let n = env_u64("FJORD_QUORUM_SEEDS").unwrap_or(DEFAULT_SEEDS);
            let base = env_u64("FJORD_QUORUM_SEED_BASE").unwrap_or(1);
            ((base..base.saturating_add(n)).collect(), false)
        }
    };
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for &seed in &seeds {
        let mut sim = Sim::new(seed, mem_disks());
        // A panic inside raft-rs (it asserts its own invariants) is a failed schedule too:
        // report its seed like any other.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run(steps)))
            .unwrap_or_else(|p| {
                let what = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(format!("panic: {what}"))
            });
        if let Err(e) = outcome {
            say(format!(
                "quorum simulation FAILED: seed {seed}, step {}, t={} ms: {e}\n  replay: \
                 FJORD_QUORUM_SEED={seed} cargo test --test quorum_sim -- --nocapture",
                sim.step, sim.now_ms
            ));
            failures.push(seed);
        }
        total.add(&sim.stats);
    }
    say(format!(
        "quorum simulation: {} schedules, {} steps ({} s simulated) checked in {:.1} s\n  {total:?}",
        seeds.len(),
        total.steps,
        total.steps * STEP_MS / 1000,
        started.elapsed().as_secs_f64()
    ));
    assert!(
        failures.is_empty(),
        "{} of {} schedules failed, seeds {failures:?} (see above)",
        failures.len(),
        seeds.len()
    );
    if !replay && seeds.len() >= 8 {
        // The schedules must exercise what they claim to check.
        assert!(total.terms_with_leader > seeds.len() as u64, "{total:?}");
        assert!(total.node_crashes > 0 && total.partitions > 0, "{total:?}");
        assert!(total.fences > 0 && total.unfences > 0, "{total:?}");
        assert!(total.controlled_shutdowns > 0, "{total:?}");
        assert!(total.duplicates_refused > 0, "{total:?}");
        assert!(
            total.topics_created > 0 && total.invalid_replication_factor > 0,
            "{total:?}"
        );
        assert!(total.snapshots_installed > 0, "{total:?}");
    }
}
