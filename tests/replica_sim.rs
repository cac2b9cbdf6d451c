//! Deterministic simulation of partition replication: leaders, followers, their fetchers and
//! the controller, with crashes, power cuts, network partitions and slow nodes.
//!
//! Five brokers host one partition with three replicas and `min.insync.replicas=2`; now and
//! then an operator moves the replicas to three other brokers (KIP-455 reassignment, by the
//! controller's own rules) or cancels a running move, and a broker that learns it no longer
//! holds the partition deletes its replica, as the broker does. The
//! replication rules are the broker's own (`fjord::partition::rules`: high watermark, KIP-101
//! divergence and KIP-279 truncation, KIP-320 epoch checks, ISR membership and the live-ISR
//! count) over the broker's own leader-epoch cache (`fjord::log::epochs`), and the controller
//! is the broker's (`fjord::quorum::Controller`: registration, heartbeats and session expiry,
//! fencing with election from the ISR, AlterPartition). What is modelled here is the I/O: a
//! replica's log is a list of (epoch, value) records with a synced prefix, a crash keeps only
//! that prefix (a power cut of any set of nodes at once), messages are delayed, lost and
//! partitioned, and nodes learn committed metadata late. The controller quorum itself is
//! proven by `quorum_sim`; here it is one always-available instance.
//!
//! Checked after every step:
//! - below any high watermark a leader ever reached, the log never changes: every record it
//!   covered is the same whenever any replica's high watermark covers that offset again;
//! - every acks=all acknowledgement was for a record committed at its offset;
//!
//! and at the end, once every node is up and the network heals: every acknowledged record is
//! in the final leader's log at its offset, exactly once, every replica holds the leader's log
//! below the high watermark, and no move is left unfinished.
//!
//! `FJORD_REPLICA_SEEDS=N` (how many schedules), `FJORD_REPLICA_SEED_BASE`, and
//! `FJORD_REPLICA_SEED=S` (replay one) as in `quorum_sim`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fjord::log::epochs::{EpochCache, EpochEnd};
use fjord::partition::rules;
use fjord::quorum::controller::{CreateTopicRequest, HeartbeatRequest, RegisterRequest};
use fjord::quorum::record::{Listener, NO_LEADER};
use fjord::quorum::{Controller, ControllerConfig, MetadataImage, MetadataRecord};
use uuid::Uuid;

const NODES: [i32; 5] = [1, 2, 3, 4, 5];
/// The first replicas of the partition (the rest of `NODES` start without it).
const FIRST_REPLICAS: [i32; 3] = [1, 2, 3];
const STEP_MS: u64 = 10;
const SESSION_MS: u64 = 3_000;
const HEARTBEAT_MS: u64 = 500;
const LAG_MAX: Duration = Duration::from_millis(3_000);
const MIN_ISR: usize = 2;
const ISR_CHECK_MS: u64 = 500;
const HW_CHECKPOINT_MS: u64 = 5_000;
const ACK_TIMEOUT_MS: u64 = 30_000;
const FETCH_TIMEOUT_MS: u64 = 2_000;
const FETCH_RECORDS_MAX: usize = 40;
const DEFAULT_SEEDS: u64 = 24;
const DEFAULT_STEPS: usize = 6_000;
const HEAL_STEPS: usize = 6_000;
const TOPIC: u128 = 77;

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
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
    fn uuid(&mut self) -> Uuid {
        Uuid::from_u128(((self.next() as u128) << 64) | self.next() as u128)
    }
}

/// One record per batch: its leader epoch and a unique value.
type Rec = (i32, u64);

#[derive(Debug, Clone)]
enum Msg {
    Fetch {
        from: i32,
        offset: u64,
        last_epoch: i32,
        current_epoch: i32,
    },
    Data {
        from: i32,
        asked: i32,
        offset: u64,
        records: Vec<Rec>,
        leader_hw: u64,
    },
    Diverging {
        from: i32,
        asked: i32,
        end: EpochEnd,
    },
    Refused {
        from: i32,
        asked: i32,
    },
    OutOfRange {
        from: i32,
        asked: i32,
        leader_hw: u64,
    },
}

struct Flight {
    at: u64,
    seq: u64,
    to: i32,
    msg: Msg,
}

/// A replica's durable and volatile state. The log and its synced prefix are the disk; the
/// rest is memory and a crash loses it (the high watermark checkpoint survives).
#[derive(Default)]
struct Replica {
    log: Vec<Rec>,
    synced: usize,
    cache: EpochCache,
    hw: u64,
    hw_saved: u64,
    hw_saved_at: u64,
    // The role, from this node's (possibly stale) view of the metadata.
    initialized: bool,
    leader: bool,
    leader_id: i32,
    leader_epoch: i32,
    isr_followers: Vec<i32>,
    pending_adds: Vec<i32>,
    follower_end: BTreeMap<i32, u64>,
    /// Follower → (leader's durable end when it last answered it, when it last caught up).
    follower_seen: BTreeMap<i32, (u64, u64)>,
    truncate_to: Option<u64>,
    fetch_sent_at: Option<u64>,
    /// Produces waiting for acks=all: (end offset, value, deadline).
    waiting: Vec<(u64, u64, u64)>,
}

impl Replica {
    /// The in-sync replicas that count for min.insync.replicas now (`rules::live_isr`).
    fn live_isr(&self, now: u64) -> usize {
        let ago: Vec<Option<Duration>> = self
            .isr_followers
            .iter()
            .map(|f| {
                self.follower_seen
                    .get(f)
                    .map(|s| Duration::from_millis(now.saturating_sub(s.1)))
            })
            .collect();
        rules::live_isr(&ago, LAG_MAX)
    }
}

struct Node {
    id: i32,
    up: bool,
    down_until: u64,
    incarnation: Uuid,
    broker_epoch: Option<i64>,
    view: MetadataImage,
    next_heartbeat: u64,
    next_isr_check: u64,
    isolated_until: u64,
    slow_until: u64,
    r: Replica,
}

#[derive(Default, Debug, Clone)]
struct Stats {
    steps: u64,
    produced: u64,
    acked: u64,
    refused: u64,
    crashes: u64,
    power_cuts: u64,
    partitions: u64,
    truncations: u64,
    diverged: u64,
    elections: u64,
    isr_changes: u64,
    moves: u64,
    moves_done: u64,
    cancels: u64,
    removed: u64,
}

struct Sim {
    rng: Rng,
    now: u64,
    step: usize,
    seq: u64,
    ctl: Controller,
    img: MetadataImage,
    /// Images as committed, by index: nodes learn them late.
    history: Vec<MetadataImage>,
    nodes: Vec<Node>,
    flights: Vec<Flight>,
    /// The committed log: what any high watermark ever covered.
    committed: Vec<Rec>,
    /// acks=all acknowledgements: offset → value.
    acked: BTreeMap<u64, u64>,
    next_value: u64,
    stats: Stats,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let mut ctl = Controller::new(ControllerConfig {
            session_timeout_ms: SESSION_MS,
            ..ControllerConfig::default()
        });
        let mut img = MetadataImage::default();
        ctl.activate(1, &img, 0);
        let boot = Controller::bootstrap(&img, rng.uuid());
        img.apply_all(&boot);
        img.applied_index += 1;
        let nodes = NODES
            .iter()
            .map(|id| Node {
                id: *id,
                up: true,
                down_until: 0,
                incarnation: rng.uuid(),
                broker_epoch: None,
                view: MetadataImage::default(),
                next_heartbeat: 0,
                next_isr_check: 0,
                isolated_until: 0,
                slow_until: 0,
                r: Replica::default(),
            })
            .collect();
        let mut sim = Sim {
            rng,
            now: 0,
            step: 0,
            seq: 0,
            ctl,
            img: img.clone(),
            history: vec![img],
            nodes,
            flights: Vec::new(),
            committed: Vec::new(),
            acked: BTreeMap::new(),
            next_value: 1,
            stats: Stats::default(),
        };
        for id in NODES {
            sim.register(id);
        }
        // Every broker catches up with the metadata and is unfenced before the topic exists.
        for id in NODES {
            let epoch = sim.node(id).broker_epoch.expect("registered");
            let req = HeartbeatRequest {
                broker_id: id,
                broker_epoch: epoch,
                metadata_offset: sim.img.applied_index,
                want_shutdown: false,
            };
            let (_, recs) = sim
                .ctl
                .heartbeat(&sim.img, &req, 0)
                .expect("first heartbeat");
            sim.commit(recs);
        }
        let req = CreateTopicRequest {
            name: "t".into(),
            topic_id: Uuid::from_u128(TOPIC),
            partitions: 1,
            replication_factor: 3,
            configs: BTreeMap::new(),
            assignment: Some(vec![FIRST_REPLICAS.to_vec()]),
        };
        let recs = sim
            .ctl
            .create_topic(&sim.img, &req)
            .expect("create the topic");
        sim.commit(recs);
        sim
    }

    fn node(&mut self, id: i32) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.id == id).expect("node")
    }

    fn commit(&mut self, recs: Vec<MetadataRecord>) {
        if recs.is_empty() {
            return;
        }
        for r in &recs {
            if let MetadataRecord::Partition(p) = r {
                let before = self
                    .img
                    .topics
                    .get(&p.topic_id)
                    .and_then(|t| t.partitions.get(&p.partition));
                if before.is_some_and(|b| b.leader != p.leader) {
                    self.stats.elections += 1;
                }
                if before.is_some_and(|b| b.isr != p.isr) {
                    self.stats.isr_changes += 1;
                }
                if before.is_some_and(|b| b.reassigning() && !p.reassigning()) {
                    self.stats.moves_done += 1;
                }
            }
        }
        self.img.apply_all(&recs);
        self.img.applied_index += 1;
        self.history.push(self.img.clone());
    }

    fn reachable(&self, id: i32) -> bool {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .is_some_and(|n| n.up && n.isolated_until <= self.now)
    }

    fn register(&mut self, id: i32) {
        let incarnation = self.node(id).incarnation;
        let req = RegisterRequest {
            broker_id: id,
            incarnation_id: incarnation,
            directory_id: Uuid::from_u128(id as u128),
            cluster_id: None,
            listeners: vec![Listener {
                name: "PLAINTEXT".into(),
                host: format!("b{id}"),
                port: 9092,
            }],
            rack: None,
        };
        let epoch = self.img.applied_index as i64 + 1;
        if let Ok(recs) = self.ctl.register(&self.img, &req, epoch, self.now) {
            self.commit(recs);
            self.node(id).broker_epoch = Some(epoch);
        }
    }

    fn send(&mut self, from: i32, to: i32, msg: Msg) {
        if !self.reachable(from) || !self.reachable(to) || self.rng.chance(20_000) {
            return;
        }
        let slow = self
            .nodes
            .iter()
            .any(|n| (n.id == from || n.id == to) && n.slow_until > self.now);
        let delay = self.rng.range(1, 30) * if slow { 10 } else { 1 };
        self.seq += 1;
        self.flights.push(Flight {
            at: self.now + delay,
            seq: self.seq,
            to,
            msg,
        });
    }

    fn run(&mut self, steps: usize) -> Result<(), String> {
        for _ in 0..steps {
            self.tick(true)?;
        }
        // Heal: everyone up, no partitions, no new faults; the producer stops.
        for n in &mut self.nodes {
            n.isolated_until = 0;
            n.slow_until = 0;
            if !n.up {
                n.down_until = self.now;
            }
        }
        for _ in 0..HEAL_STEPS {
            self.tick(false)?;
        }
        self.final_check()
    }

    fn tick(&mut self, faults: bool) -> Result<(), String> {
        self.step += 1;
        self.stats.steps += 1;
        self.now += STEP_MS;
        if faults {
            self.faults();
        }
        let down: Vec<i32> = self
            .nodes
            .iter()
            .filter(|n| !n.up && n.down_until <= self.now)
            .map(|n| n.id)
            .collect();
        for id in down {
            self.restart(id);
        }
        self.controller();
        self.learn_metadata();
        self.deliver()?;
        for id in NODES {
            if self.node(id).up {
                self.replica_step(id)?;
            }
        }
        if faults && self.rng.chance(300_000) {
            self.produce();
        }
        self.check()
    }

    fn faults(&mut self) {
        if self.rng.chance(1_500) {
            // A power cut: one node or several at once lose what they had not synced.
            let n = if self.rng.chance(300_000) {
                self.rng.range(2, 3)
            } else {
                1
            };
            if n > 1 {
                self.stats.power_cuts += 1;
            }
            let mut ids: Vec<i32> = NODES.to_vec();
            for _ in 0..n {
                let i = self.rng.below(ids.len() as u64) as usize;
                let id = ids.remove(i);
                let until = self.now + self.rng.range(300, 6_000);
                self.crash(id, until);
            }
        }
        if self.rng.chance(1_000) {
            let id = NODES[self.rng.below(NODES.len() as u64) as usize];
            let until = self.now + self.rng.range(500, 8_000);
            self.node(id).isolated_until = until;
            self.stats.partitions += 1;
        }
        if self.rng.chance(1_000) {
            let id = NODES[self.rng.below(NODES.len() as u64) as usize];
            let until = self.now + self.rng.range(500, 5_000);
            self.node(id).slow_until = until;
        }
        if self.rng.chance(400) {
            self.operator_move();
        }
    }

    /// AlterPartitionReassignments: three random brokers as the new replicas, or (sometimes,
    /// while a move runs) a cancel. Refusals (a cancel that would elect uncleanly) change
    /// nothing.
    fn operator_move(&mut self) {
        let moving = self.img.topics[&Uuid::from_u128(TOPIC)].partitions[&0].reassigning();
        let target = if moving && self.rng.chance(300_000) {
            None
        } else {
            let mut pool = NODES.to_vec();
            let mut t = Vec::new();
            for _ in 0..3 {
                t.push(pool.remove(self.rng.below(pool.len() as u64) as usize));
            }
            Some(t)
        };
        if let Ok(recs) = self
            .ctl
            .alter_reassignment(&self.img, "t", 0, target.as_deref(), true)
        {
            if target.is_some() {
                self.stats.moves += 1;
            } else {
                self.stats.cancels += 1;
            }
            self.commit(recs);
        }
    }

    fn crash(&mut self, id: i32, until: u64) {
        let n = self.node(id);
        if !n.up {
            return;
        }
        n.up = false;
        n.down_until = until;
        // The disk keeps the synced prefix and the high watermark checkpoint; memory is gone.
        let synced = n.r.synced;
        let hw_saved = n.r.hw_saved;
        let mut log = std::mem::take(&mut n.r.log);
        log.truncate(synced);
        n.r = Replica {
            log,
            synced,
            hw_saved,
            ..Replica::default()
        };
        n.view = MetadataImage::default();
        self.stats.crashes += 1;
    }

    fn restart(&mut self, id: i32) {
        let now = self.now;
        let n = self.node(id);
        n.up = true;
        n.incarnation = Uuid::from_u128(((id as u128) << 64) | now as u128);
        n.broker_epoch = None;
        // Recovery: the epoch cache is rebuilt from the records' headers, as the broker does.
        let mut cache = EpochCache::default();
        for (i, (e, _)) in n.r.log.iter().enumerate() {
            cache.observe(*e, i as u64);
        }
        n.r.cache = cache;
        n.r.hw = n.r.hw_saved.min(n.r.log.len() as u64);
        n.next_heartbeat = now;
        self.register(id);
    }

    fn controller(&mut self) {
        for id in NODES {
            let due = {
                let n = self.node(id);
                n.up && n.next_heartbeat <= self.now
            };
            if !due {
                continue;
            }
            self.node(id).next_heartbeat = self.now + HEARTBEAT_MS;
            if !self.reachable(id) {
                continue;
            }
            let Some(epoch) = self.node(id).broker_epoch else {
                self.register(id);
                continue;
            };
            let req = HeartbeatRequest {
                broker_id: id,
                broker_epoch: epoch,
                metadata_offset: self.node(id).view.applied_index,
                want_shutdown: false,
            };
            match self.ctl.heartbeat(&self.img, &req, self.now) {
                Ok((_, recs)) => self.commit(recs),
                Err(_) => self.node(id).broker_epoch = None,
            }
        }
        if self.step.is_multiple_of(10) {
            let recs = self.ctl.expire_sessions(&self.img, self.now);
            self.commit(recs);
        }
    }

    /// Each reachable node learns the newest committed image now and then (late, as a broker
    /// following the metadata log does).
    fn learn_metadata(&mut self) {
        for id in NODES {
            if !self.reachable(id) || !self.rng.chance(200_000) {
                continue;
            }
            let img = self.history.last().expect("an image").clone();
            if img.applied_index > self.node(id).view.applied_index {
                self.node(id).view = img;
                self.set_role(id);
            }
        }
    }

    /// The broker's `Partition::set_replication`, from the node's view.
    fn set_role(&mut self, id: i32) {
        let now = self.now;
        let n = self.node(id);
        let Some(p) = n
            .view
            .topics
            .get(&Uuid::from_u128(TOPIC))
            .and_then(|t| t.partitions.get(&0))
            .cloned()
        else {
            return;
        };
        if !p.replicas.contains(&id) {
            // Moved away (or never here): the broker closes the replica and deletes its files.
            if n.r.initialized || !n.r.log.is_empty() {
                n.r = Replica::default();
                self.stats.removed += 1;
            }
            return;
        }
        let r = &mut n.r;
        let leader = p.leader == id;
        let became_leader = leader && !r.leader;
        if p.leader != r.leader_id || p.leader_epoch != r.leader_epoch {
            r.truncate_to = None;
            r.fetch_sent_at = None;
        }
        r.initialized = true;
        r.leader_id = p.leader;
        r.leader_epoch = p.leader_epoch;
        if became_leader {
            r.follower_end.clear();
            r.follower_seen.clear();
        }
        r.leader = leader;
        let followers: Vec<i32> = p.isr.iter().copied().filter(|f| *f != id).collect();
        for f in &followers {
            if became_leader || !r.isr_followers.contains(f) {
                let end = r.follower_seen.get(f).map_or(0, |s| s.0);
                r.follower_seen.insert(*f, (end, now));
            }
        }
        if r.isr_followers != followers || became_leader {
            r.pending_adds.clear();
        }
        r.isr_followers = followers;
        if became_leader {
            r.hw = r.hw.min(r.synced as u64);
        }
        if !leader {
            // A produce waiting here is answered NOT_LEADER_OR_FOLLOWER: not acknowledged.
            r.waiting.clear();
        }
        self.recompute_hw(id);
    }

    fn recompute_hw(&mut self, id: i32) {
        let r = &mut self.node(id).r;
        if !r.leader {
            return;
        }
        let ends: Vec<Option<u64>> = r
            .isr_followers
            .iter()
            .chain(r.pending_adds.iter())
            .map(|f| r.follower_end.get(f).copied())
            .collect();
        let hw = rules::leader_high_watermark(r.synced as u64, &ends);
        if hw > r.hw {
            r.hw = hw;
        }
    }

    fn deliver(&mut self) -> Result<(), String> {
        self.flights.sort_by_key(|f| (f.at, f.seq));
        let due: Vec<Flight> = {
            let split = self.flights.partition_point(|f| f.at <= self.now);
            self.flights.drain(..split).collect()
        };
        for f in due {
            if !self.reachable(f.to) {
                continue;
            }
            match f.msg {
                Msg::Fetch {
                    from,
                    offset,
                    last_epoch,
                    current_epoch,
                } => self.serve_fetch(f.to, from, offset, last_epoch, current_epoch),
                other => self.fetched(f.to, other),
            }
        }
        Ok(())
    }

    /// The leader's side of a follower's fetch (`server::replication::follower_read`).
    fn serve_fetch(&mut self, me: i32, from: i32, offset: u64, last_epoch: i32, current: i32) {
        let now = self.now;
        // Only a replica's fetch moves its position (`follower_read`'s is_replica).
        let is_replica = self
            .node(me)
            .view
            .topics
            .get(&Uuid::from_u128(TOPIC))
            .and_then(|t| t.partitions.get(&0))
            .is_some_and(|p| p.replicas.contains(&from));
        let reply = {
            let r = &mut self.node(me).r;
            let asked = current;
            if !r.leader || rules::check_epoch(r.leader_epoch, current).is_err() {
                Some(Msg::Refused { from: me, asked })
            } else if let Some(end) = rules::diverging(
                &r.cache,
                r.log.len() as u64,
                Some(r.leader_epoch),
                last_epoch,
                offset as i64,
            ) {
                Some(Msg::Diverging {
                    from: me,
                    asked,
                    end,
                })
            } else if offset > r.log.len() as u64 {
                Some(Msg::OutOfRange {
                    from: me,
                    asked,
                    leader_hw: r.hw,
                })
            } else if !is_replica {
                // Not (or no longer) a replica here: served, but it counts for nothing.
                None
            } else {
                r.follower_end.insert(from, offset);
                let end = r.synced as u64;
                let seen = r.follower_seen.get(&from).copied();
                let at = if rules::caught_up(seen.map(|s| s.0), offset, end) {
                    now
                } else {
                    seen.map_or(0, |s| s.1)
                };
                r.follower_seen.insert(from, (end, at));
                None
            }
        };
        if let Some(m) = reply {
            self.send(me, from, m);
            return;
        }
        self.recompute_hw(me);
        self.send_data(me, from, offset, current);
    }

    fn send_data(&mut self, me: i32, from: i32, offset: u64, current: i32) {
        let (records, leader_hw) = {
            let r = &self.node(me).r;
            // Up to what it has written, synced or not (`Partition::read_for_follower`).
            let upto = r.log.len().min(offset as usize + FETCH_RECORDS_MAX);
            let recs = r
                .log
                .get(offset as usize..upto)
                .map(|s| s.to_vec())
                .unwrap_or_default();
            (recs, r.hw)
        };
        self.send(
            me,
            from,
            Msg::Data {
                from: me,
                asked: current,
                offset,
                records,
                leader_hw,
            },
        );
    }

    /// The follower's side of an answer (`server::replication::fetch_loop`).
    fn fetched(&mut self, me: i32, msg: Msg) {
        let r = &mut self.node(me).r;
        let (from, asked) = match &msg {
            Msg::Data { from, asked, .. }
            | Msg::Diverging { from, asked, .. }
            | Msg::Refused { from, asked }
            | Msg::OutOfRange { from, asked, .. } => (*from, *asked),
            Msg::Fetch { .. } => return,
        };
        // Only answers to a fetch sent under the current leader and epoch count.
        if r.leader || r.leader_id != from || r.leader_epoch != asked {
            return;
        }
        r.fetch_sent_at = None;
        match msg {
            Msg::Diverging { end, .. } => {
                let to = rules::truncation_point(
                    &r.cache,
                    r.log.len() as u64,
                    end.epoch,
                    end.end_offset,
                );
                r.truncate_to = Some(to);
                self.stats.diverged += 1;
            }
            Msg::OutOfRange { leader_hw, .. } => {
                if r.cache.latest() < 0 {
                    r.truncate_to = Some(leader_hw.min(r.hw));
                }
            }
            Msg::Data {
                offset,
                records,
                leader_hw,
                ..
            } => {
                if offset == r.log.len() as u64 {
                    // As `Partition::append_replicated`: epochs between this log's last and
                    // the current leader's only.
                    let mut min_epoch = r.cache.latest();
                    for rec in records {
                        if rec.0 < min_epoch || rec.0 > r.leader_epoch {
                            break;
                        }
                        min_epoch = rec.0;
                        r.cache.observe(rec.0, r.log.len() as u64);
                        r.log.push(rec);
                    }
                    // A follower syncs what it appended before it fetches again.
                    r.synced = r.log.len();
                }
                let hw = rules::follower_high_watermark(leader_hw, r.synced as u64);
                r.hw = r.hw.max(hw);
            }
            Msg::Refused { .. } | Msg::Fetch { .. } => {}
        }
    }

    fn replica_step(&mut self, id: i32) -> Result<(), String> {
        let now = self.now;
        // The disk syncs written records now and then (fdatasync latency).
        if self.rng.chance(300_000) {
            let r = &mut self.node(id).r;
            r.synced = r.log.len();
            self.recompute_hw(id);
        }
        {
            let r = &mut self.node(id).r;
            if now.saturating_sub(r.hw_saved_at) >= HW_CHECKPOINT_MS {
                r.hw_saved = r.hw;
                r.hw_saved_at = now;
            }
        }
        if self.node(id).r.leader {
            self.leader_step(id)
        } else {
            self.follower_step(id);
            Ok(())
        }
    }

    fn follower_step(&mut self, id: i32) {
        let now = self.now;
        let mut truncated = false;
        let out = {
            let r = &mut self.node(id).r;
            if !r.initialized || r.leader_id == NO_LEADER {
                return;
            }
            if let Some(to) = r.truncate_to.take() {
                if to < r.log.len() as u64 {
                    r.log.truncate(to as usize);
                    r.synced = r.synced.min(to as usize);
                    r.cache.truncate_from_end(to);
                    r.hw = r.hw.min(to);
                    truncated = true;
                }
            }
            if r.fetch_sent_at
                .is_some_and(|at| now.saturating_sub(at) < FETCH_TIMEOUT_MS)
            {
                None
            } else {
                r.fetch_sent_at = Some(now);
                Some((
                    r.leader_id,
                    Msg::Fetch {
                        from: id,
                        offset: r.log.len() as u64,
                        last_epoch: r.cache.latest(),
                        current_epoch: r.leader_epoch,
                    },
                ))
            }
        };
        if truncated {
            self.stats.truncations += 1;
        }
        if let Some((leader, msg)) = out {
            self.send(id, leader, msg);
        }
    }

    fn leader_step(&mut self, id: i32) -> Result<(), String> {
        let now = self.now;
        // Newly covered offsets are committed: they must agree with what was committed before.
        self.commit_covered(id)?;
        // acks=all answers.
        let (acks, failed) = {
            let r = &mut self.node(id).r;
            let live = r.live_isr(now);
            let mut acks = Vec::new();
            let mut failed = 0;
            let hw = r.hw;
            r.waiting.retain(|(end, value, deadline)| {
                if hw >= *end {
                    acks.push((*end - 1, *value));
                    false
                } else if live < MIN_ISR || now >= *deadline {
                    failed += 1;
                    false
                } else {
                    true
                }
            });
            (acks, failed)
        };
        self.stats.refused += failed;
        for (offset, value) in acks {
            if self.committed.get(offset as usize).map(|c| c.1) != Some(value) {
                return Err(format!(
                    "acknowledged value {value} at {offset}, but the committed log has {:?}",
                    self.committed.get(offset as usize)
                ));
            }
            self.acked.insert(offset, value);
            self.stats.acked += 1;
        }
        // The ISR keeper.
        if self.node(id).next_isr_check <= now {
            self.node(id).next_isr_check = now + ISR_CHECK_MS;
            let (wanted, changed, le, pe) = {
                let n = self.node(id);
                let Some(p) = n
                    .view
                    .topics
                    .get(&Uuid::from_u128(TOPIC))
                    .and_then(|t| t.partitions.get(&0))
                    .cloned()
                else {
                    return Ok(());
                };
                let r = &mut n.r;
                let mut isr = vec![id];
                for f in p.replicas.iter().copied().filter(|f| *f != id) {
                    let ago = r
                        .follower_seen
                        .get(&f)
                        .map(|s| Duration::from_millis(now.saturating_sub(s.1)));
                    let member = r.isr_followers.contains(&f);
                    if rules::in_wanted_isr(
                        member,
                        ago,
                        r.follower_end.get(&f).copied(),
                        r.hw,
                        LAG_MAX,
                    ) {
                        isr.push(f);
                    }
                }
                r.pending_adds = isr[1..]
                    .iter()
                    .copied()
                    .filter(|f| !r.isr_followers.contains(f))
                    .collect();
                let mut a = isr.clone();
                a.sort_unstable();
                let mut cur = p.isr.clone();
                cur.sort_unstable();
                (isr, a != cur, p.leader_epoch, p.partition_epoch)
            };
            if changed && self.reachable(id) {
                let epoch = self.node(id).broker_epoch.unwrap_or(-1);
                if let Ok((_, recs)) = self.ctl.alter_partition(
                    &self.img,
                    id,
                    epoch,
                    Uuid::from_u128(TOPIC),
                    0,
                    le,
                    pe,
                    &wanted,
                ) {
                    self.commit(recs);
                }
            }
        }
        Ok(())
    }

    /// A client's acks=all produce to the partition's leader as the controller knows it.
    fn produce(&mut self) {
        let Some(p) = self
            .img
            .topics
            .get(&Uuid::from_u128(TOPIC))
            .and_then(|t| t.partitions.get(&0))
            .cloned()
        else {
            return;
        };
        if p.leader == NO_LEADER || !self.reachable(p.leader) {
            return;
        }
        let now = self.now;
        let value = self.next_value;
        self.next_value += 1;
        self.stats.produced += 1;
        let r = &mut self.node(p.leader).r;
        if !r.leader {
            self.stats.refused += 1;
            return;
        }
        if r.live_isr(now) < MIN_ISR {
            self.stats.refused += 1;
            return;
        }
        let epoch = r.leader_epoch;
        r.cache.observe(epoch, r.log.len() as u64);
        r.log.push((epoch, value));
        let end = r.log.len() as u64;
        r.waiting.push((end, value, now + ACK_TIMEOUT_MS));
    }

    /// What a leader's high watermark covers joins the committed log; it never changes.
    fn commit_covered(&mut self, id: i32) -> Result<(), String> {
        let (hw, prefix): (u64, Vec<Rec>) = {
            let r = &self.node(id).r;
            (r.hw, r.log[..(r.hw as usize).min(r.log.len())].to_vec())
        };
        for (i, rec) in prefix.iter().enumerate() {
            match self.committed.get(i) {
                Some(c) if c != rec => {
                    return Err(format!(
                        "leader {id} (hw {hw}) holds {rec:?} at {i}, committed was {c:?}"
                    ))
                }
                Some(_) => {}
                None => self.committed.push(*rec),
            }
        }
        Ok(())
    }

    fn check(&mut self) -> Result<(), String> {
        // Whatever a leader's high watermark reached this step is committed from now on.
        for id in NODES {
            let lead = {
                let n = self.node(id);
                n.up && n.r.leader
            };
            if lead {
                self.commit_covered(id)?;
            }
        }
        for n in &self.nodes {
            if !n.up {
                continue;
            }
            let r = &n.r;
            let covered = (r.hw as usize).min(r.log.len()).min(self.committed.len());
            for i in 0..covered {
                if r.log[i] != self.committed[i] {
                    return Err(format!(
                        "node {} (hw {}) holds {:?} at {i}, committed was {:?}",
                        n.id, r.hw, r.log[i], self.committed[i]
                    ));
                }
            }
        }
        Ok(())
    }

    fn final_check(&mut self) -> Result<(), String> {
        let p = self.img.topics[&Uuid::from_u128(TOPIC)].partitions[&0].clone();
        if p.leader == NO_LEADER {
            return Err(format!("no leader after healing: {p:?}"));
        }
        if p.reassigning() {
            return Err(format!("a move is unfinished after healing: {p:?}"));
        }
        let leader = p.leader;
        let log = self.node(leader).r.log.clone();
        let hw = self.node(leader).r.hw;
        for (offset, value) in &self.acked {
            if log.get(*offset as usize).map(|r| r.1) != Some(*value) {
                return Err(format!(
                    "acknowledged value {value} at {offset} is not in leader {leader}'s log (it has {:?})",
                    log.get(*offset as usize)
                ));
            }
        }
        let values: BTreeSet<u64> = log.iter().map(|r| r.1).collect();
        if values.len() != log.len() {
            return Err("a value appears twice in the leader's log".into());
        }
        for n in self.nodes.iter().filter(|n| p.replicas.contains(&n.id)) {
            let upto = (hw as usize).min(n.r.log.len());
            if n.r.log[..upto] != log[..upto] {
                return Err(format!(
                    "node {} differs from leader {leader} below the high watermark",
                    n.id
                ));
            }
        }
        Ok(())
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn replica_simulation() {
    let steps = env_u64("FJORD_REPLICA_STEPS").map_or(DEFAULT_STEPS, |s| s as usize);
    let seeds: Vec<u64> = match env_u64("FJORD_REPLICA_SEED") {
        Some(s) => vec![s],
        None => {
            let n = env_u64("FJORD_REPLICA_SEEDS").unwrap_or(DEFAULT_SEEDS);
            let base = env_u64("FJORD_REPLICA_SEED_BASE").unwrap_or(1);
            (base..base + n).collect()
        }
    };
    let mut failures = Vec::new();
    let mut total = Stats::default();
    for &seed in &seeds {
        let mut sim = Sim::new(seed);
        if let Err(e) = sim.run(steps) {
            eprintln!(
                "replica simulation FAILED: seed {seed}, step {}, t={} ms: {e}\n  replay: \
                 FJORD_REPLICA_SEED={seed} cargo test --test replica_sim -- --nocapture",
                sim.step, sim.now
            );
            failures.push(seed);
        }
        let s = &sim.stats;
        total.steps += s.steps;
        total.produced += s.produced;
        total.acked += s.acked;
        total.refused += s.refused;
        total.crashes += s.crashes;
        total.power_cuts += s.power_cuts;
        total.partitions += s.partitions;
        total.truncations += s.truncations;
        total.diverged += s.diverged;
        total.elections += s.elections;
        total.isr_changes += s.isr_changes;
        total.moves += s.moves;
        total.moves_done += s.moves_done;
        total.cancels += s.cancels;
        total.removed += s.removed;
    }
    eprintln!(
        "replica simulation: {} schedules, {} s simulated\n  {total:?}",
        seeds.len(),
        total.steps * STEP_MS / 1000
    );
    assert!(failures.is_empty(), "failed seeds: {failures:?}");
    // The schedules must exercise what they claim to.
    if seeds.len() >= 10 {
        assert!(total.acked > 0 && total.elections > 0 && total.diverged > 0);
        assert!(total.power_cuts > 0 && total.truncations > 0 && total.isr_changes > 0);
        assert!(total.moves > 0 && total.moves_done > 0 && total.cancels > 0 && total.removed > 0);
    }
}
