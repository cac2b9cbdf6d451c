//! Sans-IO coordinator of KIP-848 consumer groups (`group.protocol=consumer`): the
//! ConsumerGroupHeartbeat state machine with server-side assignment, for every consumer group of
//! one shard.
//!
//! No I/O, no clock, no async: the shell passes `now_ms` and a view of the topics
//! ([`TopicSource`]) into every call and calls [`ConsumerGroups::tick`] at
//! [`ConsumerGroups::next_deadline_ms`].
//!
//! The model is Kafka's (GroupMetadataManager + CurrentAssignmentBuilder):
//! - a group has a *group epoch*, bumped whenever what the assignor sees changes (a member joins,
//!   leaves or changes its subscription; a subscribed topic appears or grows);
//! - a *target assignment* computed by the assignor at the group epoch (the assignment epoch);
//! - each member has a *member epoch* and converges towards its target one heartbeat at a time:
//!   it first revokes what it must give up (staying at its epoch), and is given a partition only
//!   once no other member still holds it (assigned or pending revocation). So a partition is
//!   never owned by two members at once, which `check_invariants` asserts in the tests.
//!
//! Topics are named here; the shell translates topic ids at the wire boundary.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kafka_protocol::ResponseError as E;
use uuid::Uuid;

use super::consumer_records::{
    AssignmentValue, ConsumerKey, ConsumerRecord, GroupEpochValue, MemberValue, TopicPartitions,
};

/// Kafka's numeric error code.
pub type ErrorCode = i16;

pub use super::state::NONE;

/// Member epoch of a dynamic member leaving the group.
pub const LEAVE_EPOCH: i32 = -1;
/// Member epoch of a static member leaving temporarily (it keeps its partitions until its
/// session expires or it rejoins).
pub const STATIC_LEAVE_EPOCH: i32 = -2;

/// topic → partitions.
pub type Assignment = BTreeMap<String, BTreeSet<i32>>;

/// What the state machine may know of the topics: the shell implements it over the metadata
/// image, tests over a map.
pub trait TopicSource {
    fn partition_count(&self, topic: &str) -> Option<i32>;
    /// Every topic a regex subscription may match (internal topics left out).
    fn for_each_topic(&self, f: &mut dyn FnMut(&str));
}

impl TopicSource for BTreeMap<String, i32> {
    fn partition_count(&self, topic: &str) -> Option<i32> {
        self.get(topic).copied()
    }
    fn for_each_topic(&self, f: &mut dyn FnMut(&str)) {
        for t in self.keys() {
            f(t);
        }
    }
}

/// Server-side assignors (`group.consumer.assignors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Assignor {
    Uniform,
    Range,
}

impl Assignor {
    pub fn name(self) -> &'static str {
        match self {
            Assignor::Uniform => "uniform",
            Assignor::Range => "range",
        }
    }
    pub fn parse(s: &str) -> Option<Assignor> {
        match s {
            "uniform" => Some(Assignor::Uniform),
            "range" => Some(Assignor::Range),
            _ => None,
        }
    }
}

/// Broker settings (Kafka's `group.consumer.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// `group.consumer.heartbeat.interval.ms`
    pub heartbeat_interval_ms: i32,
    /// `group.consumer.session.timeout.ms`
    pub session_timeout_ms: u64,
    /// The first of `group.consumer.assignors`: used when no member names one.
    pub default_assignor: Assignor,
    /// `group.consumer.max.size`
    pub max_size: usize,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            heartbeat_interval_ms: 5_000,
            session_timeout_ms: 45_000,
            default_assignor: Assignor::Uniform,
            max_size: i32::MAX as usize,
        }
    }
}

/// A ConsumerGroupHeartbeat request, topics by name. `None` fields did not change since the
/// member's previous heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatRequest {
    pub group_id: String,
    /// Empty asks the coordinator to generate one (v0; v1 clients generate their own, KIP-1082).
    pub member_id: String,
    pub member_epoch: i32,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    /// -1: unchanged.
    pub rebalance_timeout_ms: i32,
    pub subscribed_topic_names: Option<Vec<String>>,
    pub subscribed_topic_regex: Option<String>,
    pub server_assignor: Option<String>,
    /// The partitions the member owns; `None` when unchanged.
    pub owned: Option<Assignment>,
    pub client_id: String,
    pub client_host: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeartbeatResponse {
    pub error_code: ErrorCode,
    pub error_message: Option<String>,
    pub member_id: Option<String>,
    pub member_epoch: i32,
    pub heartbeat_interval_ms: i32,
    /// The member's assignment, sent when it changed or the member (re)joined or sent a full
    /// request.
    pub assignment: Option<Assignment>,
}

impl HeartbeatResponse {
    fn error(code: ErrorCode, message: String) -> HeartbeatResponse {
        HeartbeatResponse {
            error_code: code,
            error_message: Some(message),
            ..Default::default()
        }
    }
}

/// Kafka's MemberState.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Stable,
    /// Waiting for the member to acknowledge the revocation of `revoking`.
    UnrevokedPartitions,
    /// Some target partitions are still held by other members.
    UnreleasedPartitions,
}

#[derive(Debug, Clone)]
struct Member {
    id: String,
    instance_id: Option<String>,
    rack_id: Option<String>,
    client_id: String,
    client_host: String,
    rebalance_timeout_ms: u64,
    /// Sorted, deduplicated.
    subscribed_names: Vec<String>,
    subscribed_regex: Option<(String, regex::Regex)>,
    server_assignor: Option<Assignor>,
    epoch: i32,
    previous_epoch: i32,
    state: MemberState,
    assigned: Assignment,
    revoking: Assignment,
    session_deadline_ms: u64,
    /// Set while the member must revoke partitions: past it the member is fenced.
    revocation_deadline_ms: Option<u64>,
}

impl Member {
    fn new(id: String, now_ms: u64, session_timeout_ms: u64) -> Member {
        Member {
            id,
            instance_id: None,
            rack_id: None,
            client_id: String::new(),
            client_host: String::new(),
            rebalance_timeout_ms: 300_000,
            subscribed_names: Vec::new(),
            subscribed_regex: None,
            server_assignor: None,
            epoch: 0,
            previous_epoch: 0,
            state: MemberState::Stable,
            assigned: Assignment::new(),
            revoking: Assignment::new(),
            session_deadline_ms: now_ms + session_timeout_ms,
            revocation_deadline_ms: None,
        }
    }

    /// The existing topics this member subscribes to.
    fn resolved_topics(&self, topics: &dyn TopicSource) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .subscribed_names
            .iter()
            .filter(|t| topics.partition_count(t).is_some())
            .cloned()
            .collect();
        if let Some((_, re)) = &self.subscribed_regex {
            topics.for_each_topic(&mut |t| {
                if re.is_match(t) {
                    out.insert(t.to_owned());
                }
            });
        }
        out
    }

    fn deadline_ms(&self) -> u64 {
        match self.revocation_deadline_ms {
            Some(r) => r.min(self.session_deadline_ms),
            None => self.session_deadline_ms,
        }
    }
}

/// Kafka's consumer group states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    Assigning,
    Reconciling,
    Stable,
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::Assigning => "Assigning",
            GroupState::Reconciling => "Reconciling",
            GroupState::Stable => "Stable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub member_epoch: i32,
    pub client_id: String,
    pub client_host: String,
    pub subscribed_topic_names: Vec<String>,
    pub subscribed_topic_regex: Option<String>,
    pub assignment: Assignment,
    pub target_assignment: Assignment,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub group_id: String,
    pub state: GroupState,
    pub group_epoch: i32,
    pub assignment_epoch: i32,
    pub assignor: &'static str,
    pub members: Vec<MemberDescription>,
}

#[derive(Debug, Clone)]
struct Group {
    id: String,
    group_epoch: i32,
    assignment_epoch: i32,
    members: BTreeMap<String, Member>,
    /// instance id → member id.
    static_members: BTreeMap<String, String>,
    /// member id → target assignment at `assignment_epoch`.
    target: BTreeMap<String, Assignment>,
    /// Who holds each partition (assigned or pending revocation): at most one member.
    owners: BTreeMap<(String, i32), String>,
    /// Subscribed topic → partition count, as last seen; a change bumps the group epoch.
    subscribed: BTreeMap<String, i32>,
    /// Restored while what the assignor sees differs from what it saw when the group was
    /// stored (the stored hash, kept until then): the next heartbeat bumps the group epoch.
    metadata_stale: Option<i64>,
    assignor: Assignor,
}

impl Group {
    fn new(id: String, assignor: Assignor) -> Group {
        Group {
            id,
            group_epoch: 0,
            assignment_epoch: 0,
            members: BTreeMap::new(),
            static_members: BTreeMap::new(),
            target: BTreeMap::new(),
            owners: BTreeMap::new(),
            subscribed: BTreeMap::new(),
            metadata_stale: None,
            assignor,
        }
    }

    /// Each member's resolved topics, and the partition count of every subscribed topic.
    fn subscriptions(
        &self,
        topics: &dyn TopicSource,
    ) -> (BTreeMap<String, BTreeSet<String>>, BTreeMap<String, i32>) {
        let mut subs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut counts: BTreeMap<String, i32> = BTreeMap::new();
        for m in self.members.values() {
            let ts = m.resolved_topics(topics);
            for t in &ts {
                if let Some(n) = topics.partition_count(t) {
                    counts.insert(t.clone(), n.max(0));
                }
            }
            subs.insert(m.id.clone(), ts);
        }
        (subs, counts)
    }

    /// The group's persistent form: Kafka's records for the group, its target assignment and
    /// each member. Partitions of topics without an id (deleted) are left out.
    fn records(&self, topic_id: &dyn Fn(&str) -> Option<Uuid>) -> Vec<ConsumerRecord> {
        let by_id = |a: &Assignment| -> TopicPartitions {
            a.iter()
                .filter_map(|(t, ps)| Some((topic_id(t)?, ps.iter().copied().collect())))
                .collect()
        };
        let mut out = vec![
            ConsumerRecord::Metadata(Some(GroupEpochValue {
                epoch: self.group_epoch,
                metadata_hash: self
                    .metadata_stale
                    .unwrap_or_else(|| metadata_hash(&self.subscribed)),
            })),
            ConsumerRecord::TargetMetadata(Some(self.assignment_epoch)),
        ];
        for m in self.members.values() {
            out.push(ConsumerRecord::Member(
                m.id.clone(),
                Some(MemberValue {
                    instance_id: m.instance_id.clone(),
                    rack_id: m.rack_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    subscribed_topic_names: m.subscribed_names.clone(),
                    subscribed_topic_regex: m.subscribed_regex.as_ref().map(|r| r.0.clone()),
                    rebalance_timeout_ms: i32::try_from(m.rebalance_timeout_ms).unwrap_or(i32::MAX),
                    server_assignor: m.server_assignor.map(|a| a.name().to_owned()),
                }),
            ));
            if let Some(t) = self.target.get(&m.id) {
                out.push(ConsumerRecord::TargetMember(m.id.clone(), Some(by_id(t))));
            }
            out.push(ConsumerRecord::Assignment(
                m.id.clone(),
                Some(AssignmentValue {
                    member_epoch: m.epoch,
                    previous_member_epoch: m.previous_epoch,
                    state: match m.state {
                        MemberState::Stable => 0,
                        MemberState::UnrevokedPartitions => 1,
                        MemberState::UnreleasedPartitions => 2,
                    },
                    assigned: by_id(&m.assigned),
                    revoking: by_id(&m.revoking),
                }),
            ));
        }
        out
    }

    fn state(&self) -> GroupState {
        if self.members.is_empty() {
            GroupState::Empty
        } else if self.group_epoch != self.assignment_epoch {
            GroupState::Assigning
        } else if self.members.values().any(|m| {
            m.epoch != STATIC_LEAVE_EPOCH
                && (m.epoch != self.assignment_epoch || m.state != MemberState::Stable)
        }) {
            GroupState::Reconciling
        } else {
            GroupState::Stable
        }
    }

    /// Replaces `member_id`'s holdings, keeping `owners` in step.
    fn set_holdings(&mut self, member_id: &str, assigned: Assignment, revoking: Assignment) {
        let Some(m) = self.members.get_mut(member_id) else {
            return;
        };
        for (t, ps) in m.assigned.iter().chain(m.revoking.iter()) {
            for p in ps {
                let key = (t.clone(), *p);
                if self.owners.get(&key).map(String::as_str) == Some(member_id) {
                    self.owners.remove(&key);
                }
            }
        }
        for (t, ps) in assigned.iter().chain(revoking.iter()) {
            for p in ps {
                let prev = self.owners.insert((t.clone(), *p), member_id.to_owned());
                // Reconciliation only hands out free partitions; a second owner is a bug.
                debug_assert!(
                    prev.is_none(),
                    "{t}-{p} given to {member_id} while held by {prev:?}"
                );
            }
        }
        m.assigned = assigned;
        m.revoking = revoking;
    }

    fn remove_member(&mut self, member_id: &str) {
        self.set_holdings(member_id, Assignment::new(), Assignment::new());
        if let Some(m) = self.members.remove(member_id) {
            if let Some(i) = &m.instance_id {
                if self.static_members.get(i).map(String::as_str) == Some(member_id) {
                    self.static_members.remove(i);
                }
            }
        }
        self.target.remove(member_id);
        self.group_epoch += 1;
    }

    /// The assignor members ask for most (ties: the first by name), else the default.
    fn preferred_assignor(&self, default: Assignor) -> Assignor {
        let mut counts: BTreeMap<Assignor, usize> = BTreeMap::new();
        for m in self.members.values() {
            if let Some(a) = m.server_assignor {
                *counts.entry(a).or_default() += 1;
            }
        }
        let mut best: Option<(Assignor, usize)> = None;
        for (a, n) in counts {
            if best.is_none_or(|(_, bn)| n > bn) {
                best = Some((a, n));
            }
        }
        best.map(|(a, _)| a).unwrap_or(default)
    }

    /// Bumps the group epoch if what the assignor sees changed, and recomputes the target
    /// assignment if it is behind the group epoch.
    /// `changed`: the heartbeat changed membership or a subscription. One heartbeat bumps the
    /// group epoch at most once.
    fn refresh_target(
        &mut self,
        topics: &dyn TopicSource,
        default_assignor: Assignor,
        changed: bool,
    ) {
        let mut bump = changed || self.metadata_stale.take().is_some();
        let (subs, counts) = self.subscriptions(topics);
        if counts != self.subscribed {
            self.subscribed = counts;
            bump = true;
        }
        let assignor = self.preferred_assignor(default_assignor);
        if assignor != self.assignor {
            self.assignor = assignor;
            bump = true;
        }
        if bump {
            self.group_epoch += 1;
        }
        if self.group_epoch > self.assignment_epoch {
            self.target = assign(self.assignor, &subs, &self.subscribed, &self.target);
            self.assignment_epoch = self.group_epoch;
        }
    }

    /// Kafka's CurrentAssignmentBuilder: moves `member_id` one step towards its target.
    fn reconcile(&mut self, member_id: &str, owned: Option<&Assignment>, now_ms: u64) {
        let Some(m) = self.members.get(member_id) else {
            return;
        };
        let from_epoch = match m.state {
            MemberState::Stable if m.epoch == self.assignment_epoch => return,
            MemberState::Stable | MemberState::UnreleasedPartitions => m.epoch,
            MemberState::UnrevokedPartitions => {
                if owns_any(owned, &m.revoking) {
                    return;
                }
                (m.epoch + 1).min(self.assignment_epoch)
            }
        };
        let empty = Assignment::new();
        let target = self.target.get(member_id).unwrap_or(&empty);
        let mut kept = Assignment::new();
        let mut revoking = Assignment::new();
        let mut pending = Assignment::new();
        let mut unreleased = false;
        let topics: BTreeSet<&String> = m.assigned.keys().chain(target.keys()).collect();
        for t in topics {
            let had = m.assigned.get(t).unwrap_or(&BTreeSet::new()).clone();
            let want = target.get(t).cloned().unwrap_or_default();
            let k: BTreeSet<i32> = had.intersection(&want).copied().collect();
            let r: BTreeSet<i32> = had.difference(&k).copied().collect();
            let mut a = BTreeSet::new();
            for p in want.difference(&k) {
                match self.owners.get(&(t.clone(), *p)) {
                    Some(o) if o != member_id => unreleased = true,
                    _ => {
                        a.insert(*p);
                    }
                }
            }
            if !k.is_empty() {
                kept.insert(t.clone(), k);
            }
            if !r.is_empty() {
                revoking.insert(t.clone(), r);
            }
            if !a.is_empty() {
                pending.insert(t.clone(), a);
            }
        }
        let target_epoch = self.assignment_epoch;
        let rebalance_timeout_ms = m.rebalance_timeout_ms;
        let old_epoch = m.epoch;
        let (state, epoch, assigned, revoke) = if !revoking.is_empty() && owns_any(owned, &revoking)
        {
            (MemberState::UnrevokedPartitions, from_epoch, kept, revoking)
        } else {
            for (t, ps) in pending {
                kept.entry(t).or_default().extend(ps);
            }
            let state = if unreleased {
                MemberState::UnreleasedPartitions
            } else {
                MemberState::Stable
            };
            (state, target_epoch, kept, Assignment::new())
        };
        self.set_holdings(member_id, assigned, revoke);
        let Some(m) = self.members.get_mut(member_id) else {
            return;
        };
        if epoch != old_epoch {
            m.previous_epoch = old_epoch;
            m.epoch = epoch;
        }
        m.revocation_deadline_ms = match (state, m.state) {
            (MemberState::UnrevokedPartitions, MemberState::UnrevokedPartitions) => {
                m.revocation_deadline_ms
            }
            (MemberState::UnrevokedPartitions, _) => Some(now_ms + rebalance_timeout_ms),
            _ => None,
        };
        m.state = state;
    }
}

/// True if `owned` may still hold any partition of `parts` (unknown ownership counts as yes).
fn owns_any(owned: Option<&Assignment>, parts: &Assignment) -> bool {
    let Some(owned) = owned else { return true };
    parts.iter().any(|(t, ps)| {
        owned
            .get(t)
            .is_some_and(|o| ps.iter().any(|p| o.contains(p)))
    })
}

fn is_subset(owned: Option<&Assignment>, of: &Assignment) -> bool {
    let Some(owned) = owned else { return false };
    owned
        .iter()
        .all(|(t, ps)| ps.is_empty() || of.get(t).is_some_and(|o| ps.is_subset(o)))
}

/// Runs `assignor` over members' resolved subscriptions and the partition counts; `prev` is the
/// previous target, which the uniform assignor keeps where balance allows.
pub fn assign(
    assignor: Assignor,
    subs: &BTreeMap<String, BTreeSet<String>>,
    counts: &BTreeMap<String, i32>,
    prev: &BTreeMap<String, Assignment>,
) -> BTreeMap<String, Assignment> {
    match assignor {
        Assignor::Range => assign_range(subs, counts),
        Assignor::Uniform => assign_uniform(subs, counts, prev),
    }
}

/// Per topic, its subscribers sorted by member id get contiguous ranges; the first
/// `partitions % members` get one more.
fn assign_range(
    subs: &BTreeMap<String, BTreeSet<String>>,
    counts: &BTreeMap<String, i32>,
) -> BTreeMap<String, Assignment> {
    let mut out: BTreeMap<String, Assignment> = subs
        .keys()
        .map(|m| (m.clone(), Assignment::new()))
        .collect();
    for (t, &n) in counts {
        let members: Vec<&String> = subs
            .iter()
            .filter(|(_, ts)| ts.contains(t))
            .map(|(m, _)| m)
            .collect();
        if members.is_empty() || n <= 0 {
            continue;
        }
        let k = members.len() as i32;
        let (base, extra) = (n / k, n % k);
        let mut start = 0;
        for (i, m) in members.into_iter().enumerate() {
            let len = base + i32::from((i as i32) < extra);
            if len > 0 {
                out.entry(m.clone())
                    .or_default()
                    .insert(t.clone(), (start..start + len).collect());
            }
            start += len;
        }
    }
    out
}

/// Balances the number of partitions per member (across topics), keeping each partition where
/// the previous target had it when balance allows. Subscriptions may differ between members.
fn assign_uniform(
    subs: &BTreeMap<String, BTreeSet<String>>,
    counts: &BTreeMap<String, i32>,
    prev: &BTreeMap<String, Assignment>,
) -> BTreeMap<String, Assignment> {
    let mut owner: BTreeMap<(String, i32), String> = BTreeMap::new();
    let mut load: BTreeMap<String, usize> = subs.keys().map(|m| (m.clone(), 0)).collect();
    // Stickiness: keep what is still valid.
    for (m, a) in prev {
        let Some(ts) = subs.get(m) else { continue };
        for (t, ps) in a {
            let Some(&n) = counts.get(t) else { continue };
            if !ts.contains(t) {
                continue;
            }
            for &p in ps {
                if p < n && !owner.contains_key(&(t.clone(), p)) {
                    owner.insert((t.clone(), p), m.clone());
                    *load.entry(m.clone()).or_default() += 1;
                }
            }
        }
    }
    let subscribers: BTreeMap<&String, Vec<&String>> = counts
        .keys()
        .map(|t| {
            (
                t,
                subs.iter()
                    .filter(|(_, ts)| ts.contains(t))
                    .map(|(m, _)| m)
                    .collect(),
            )
        })
        .collect();
    // The rest goes to the least loaded eligible member.
    for (t, &n) in counts {
        let eligible = &subscribers[t];
        if eligible.is_empty() {
            continue;
        }
        for p in 0..n {
            if owner.contains_key(&(t.clone(), p)) {
                continue;
            }
            let Some(m) = eligible.iter().min_by_key(|m| (load[**m], **m)) else {
                continue;
            };
            owner.insert((t.clone(), p), (*m).clone());
            *load.get_mut(*m).expect("member has a load") += 1;
        }
    }
    // Balance: move a partition from a member to an eligible one with at least two fewer.
    // Each move lowers the sum of squared loads, so this ends; the cap is a backstop.
    let total: usize = load.values().sum();
    let mut moves_left = total * subs.len().max(1) + 1;
    loop {
        let mut moved = false;
        let keys: Vec<(String, i32)> = owner.keys().rev().cloned().collect();
        for key in keys {
            if moves_left == 0 {
                break;
            }
            let from = owner[&key].clone();
            let eligible = &subscribers[&key.0];
            let Some(to) = eligible.iter().min_by_key(|m| (load[**m], **m)) else {
                continue;
            };
            if load[*to] + 1 < load[&from] {
                let to = (*to).clone();
                *load.get_mut(&from).expect("load") -= 1;
                *load.get_mut(&to).expect("load") += 1;
                owner.insert(key, to);
                moves_left -= 1;
                moved = true;
            }
        }
        if !moved || moves_left == 0 {
            break;
        }
    }
    let mut out: BTreeMap<String, Assignment> = subs
        .keys()
        .map(|m| (m.clone(), Assignment::new()))
        .collect();
    for ((t, p), m) in owner {
        out.entry(m).or_default().entry(t).or_default().insert(p);
    }
    out
}

/// Every consumer group of one shard.
pub struct ConsumerGroups {
    cfg: ConsumerConfig,
    groups: BTreeMap<String, Group>,
    id_seed: u64,
    id_counter: u64,
    /// What `__consumer_offsets` holds for each group, as far as this coordinator knows:
    /// record key → hash of the value stored (odd), [`REWRITE`] or [`TOMBSTONE_SENT`].
    stored: HashMap<String, HashMap<ConsumerKey, u64>>,
}

/// A stored record whose last write may have failed: written again with the next store.
const REWRITE: u64 = 0;
/// A tombstone handed out and not yet confirmed: handed out again until a store succeeds.
const TOMBSTONE_SENT: u64 = 2;

/// A subscription regex as Kafka applies it: to the whole topic name (RE2J `matches`).
fn compile_subscription(r: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{r})$"))
}

/// The hash of a value as [`ConsumerGroups::stored`] keeps it; never 0.
fn value_hash(value: &Option<Vec<u8>>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish() | 1
}

/// KIP-1101's role, with Fjord's own hash: what the assignor last saw of the subscribed topics
/// (FNV-1a over names and partition counts).
fn metadata_hash(subscribed: &BTreeMap<String, i32>) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (t, n) in subscribed {
        for b in t.bytes().chain([0]).chain(n.to_be_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h as i64
}

/// A member removed by [`ConsumerGroups::tick`], for the shell's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub group_id: String,
    pub member_id: String,
    pub reason: &'static str,
}

impl ConsumerGroups {
    pub fn new(cfg: ConsumerConfig, id_seed: u64) -> ConsumerGroups {
        ConsumerGroups {
            cfg,
            groups: BTreeMap::new(),
            id_seed,
            id_counter: 0,
            stored: HashMap::new(),
        }
    }

    /// The records that bring `__consumer_offsets` in line with the group's state: what changed
    /// since the last call, and tombstones for what is gone (every record of a deleted group).
    /// The shell appends them, one store of a group at a time, and reports the outcome to
    /// [`ConsumerGroups::store_done`].
    pub fn records_to_store(
        &mut self,
        group_id: &str,
        topic_id: &dyn Fn(&str) -> Option<Uuid>,
    ) -> Vec<ConsumerRecord> {
        let desired = self
            .groups
            .get(group_id)
            .map(|g| g.records(topic_id))
            .unwrap_or_default();
        if desired.is_empty() && !self.stored.contains_key(group_id) {
            return Vec::new();
        }
        let stored = self.stored.entry(group_id.to_owned()).or_default();
        let mut out = Vec::new();
        let mut keep = BTreeSet::new();
        for rec in desired {
            let key = rec.key();
            let h = value_hash(&rec.encode_value());
            if stored.get(&key) != Some(&h) {
                stored.insert(key.clone(), h);
                out.push(rec);
            }
            keep.insert(key);
        }
        for (k, h) in stored.iter_mut() {
            if !keep.contains(k) {
                out.push(ConsumerRecord::tombstone(k.clone()));
                *h = TOMBSTONE_SENT;
            }
        }
        out
    }

    /// The outcome of storing what [`ConsumerGroups::records_to_store`] last handed out. On
    /// success its tombstones are done with (a deleted group is forgotten); on failure the
    /// next call writes the whole group again, tombstones included.
    pub fn store_done(&mut self, group_id: &str, ok: bool) {
        let Some(stored) = self.stored.get_mut(group_id) else {
            return;
        };
        if ok {
            stored.retain(|_, h| *h != TOMBSTONE_SENT);
            if stored.is_empty() {
                self.stored.remove(group_id);
            }
        } else {
            stored
                .values_mut()
                .filter(|h| **h != TOMBSTONE_SENT)
                .for_each(|h| *h = REWRITE);
        }
    }

    /// Rebuilds a group from the records read back from `__consumer_offsets` (latest per key,
    /// tombstones applied), as Kafka's coordinator replays them when it takes over the
    /// partition. Sessions start now; a member revoking partitions gets a new rebalance
    /// timeout. Records of members the group no longer has are tombstoned by the next
    /// [`ConsumerGroups::records_to_store`].
    pub fn restore(
        &mut self,
        now_ms: u64,
        group_id: &str,
        records: &BTreeMap<ConsumerKey, ConsumerRecord>,
        topics: &dyn TopicSource,
        topic_name: &dyn Fn(&Uuid) -> Option<String>,
    ) {
        self.groups.remove(group_id);
        let stored = self.stored.entry(group_id.to_owned()).or_default();
        stored.clear();
        for (k, r) in records {
            stored.insert(k.clone(), value_hash(&r.encode_value()));
        }
        if stored.is_empty() {
            self.stored.remove(group_id);
        }
        let Some(ConsumerRecord::Metadata(Some(meta))) = records.get(&ConsumerKey::Metadata) else {
            return;
        };
        let by_name = |tps: &TopicPartitions| -> Assignment {
            let mut a = Assignment::new();
            for (id, ps) in tps {
                if let Some(t) = topic_name(id) {
                    a.entry(t).or_default().extend(ps.iter().copied());
                }
            }
            a
        };
        let mut g = Group::new(group_id.to_owned(), self.cfg.default_assignor);
        g.group_epoch = meta.epoch;
        if let Some(ConsumerRecord::TargetMetadata(Some(e))) =
            records.get(&ConsumerKey::TargetMetadata)
        {
            g.assignment_epoch = (*e).min(meta.epoch);
        }
        for r in records.values() {
            let ConsumerRecord::Member(id, Some(v)) = r else {
                continue;
            };
            let mut m = Member::new(id.clone(), now_ms, self.cfg.session_timeout_ms);
            m.instance_id = v.instance_id.clone();
            m.rack_id = v.rack_id.clone();
            m.client_id = v.client_id.clone();
            m.client_host = v.client_host.clone();
            if let Ok(t) = u64::try_from(v.rebalance_timeout_ms) {
                m.rebalance_timeout_ms = t;
            }
            let mut names = v.subscribed_topic_names.clone();
            names.sort();
            names.dedup();
            m.subscribed_names = names;
            m.subscribed_regex = v
                .subscribed_topic_regex
                .as_ref()
                .and_then(|r| Some((r.clone(), compile_subscription(r).ok()?)));
            m.server_assignor = v.server_assignor.as_deref().and_then(Assignor::parse);
            if let Some(ConsumerRecord::Assignment(_, Some(a))) =
                records.get(&ConsumerKey::Assignment(id.clone()))
            {
                m.epoch = a.member_epoch.min(g.assignment_epoch);
                m.previous_epoch = a.previous_member_epoch;
                m.state = match a.state {
                    1 => MemberState::UnrevokedPartitions,
                    2 => MemberState::UnreleasedPartitions,
                    _ => MemberState::Stable,
                };
                // A partition two members claim (a damaged log) stays with the first.
                let mut take = |held: &TopicPartitions| -> Assignment {
                    let mut a = by_name(held);
                    for (t, ps) in a.iter_mut() {
                        ps.retain(|p| {
                            let key = (t.clone(), *p);
                            if g.owners.contains_key(&key) {
                                return false;
                            }
                            g.owners.insert(key, id.clone());
                            true
                        });
                    }
                    a.retain(|_, ps| !ps.is_empty());
                    a
                };
                m.assigned = take(&a.assigned);
                m.revoking = take(&a.revoking);
            }
            if m.state == MemberState::UnrevokedPartitions {
                m.revocation_deadline_ms = Some(now_ms + m.rebalance_timeout_ms);
            }
            if let Some(ConsumerRecord::TargetMember(_, Some(t))) =
                records.get(&ConsumerKey::TargetMember(id.clone()))
            {
                g.target.insert(id.clone(), by_name(t));
            }
            if let Some(i) = &m.instance_id {
                g.static_members.insert(i.clone(), id.clone());
            }
            g.members.insert(id.clone(), m);
        }
        g.assignor = g.preferred_assignor(self.cfg.default_assignor);
        let (_, counts) = g.subscriptions(topics);
        g.subscribed = counts;
        if metadata_hash(&g.subscribed) != meta.metadata_hash {
            g.metadata_stale = Some(meta.metadata_hash);
        }
        self.groups.insert(group_id.to_owned(), g);
    }

    /// Forgets the groups `unload` selects, as a coordinator does when another node takes over
    /// their `__consumer_offsets` partition.
    pub fn unload(&mut self, mut unload: impl FnMut(&str) -> bool) {
        self.groups.retain(|id, _| !unload(id));
        self.stored.retain(|id, _| !unload(id));
    }

    /// Every group id this state machine knows or has records stored for.
    pub fn group_ids(&self) -> Vec<String> {
        let mut ids: BTreeSet<String> = self.groups.keys().cloned().collect();
        ids.extend(self.stored.keys().cloned());
        ids.into_iter().collect()
    }

    pub fn config(&self) -> &ConsumerConfig {
        &self.cfg
    }

    pub fn set_config(&mut self, cfg: ConsumerConfig) {
        self.cfg = cfg;
    }

    /// A UUID-shaped member id (splitmix64 over a seed and a counter: deterministic in tests).
    fn new_member_id(&mut self) -> String {
        let mut next = || {
            self.id_counter += 1;
            let mut z = self
                .id_seed
                .wrapping_add(self.id_counter.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let (hi, lo) = (next(), next());
        uuid::Uuid::from_u64_pair(hi, lo).to_string()
    }

    pub fn contains(&self, group_id: &str) -> bool {
        self.groups.contains_key(group_id)
    }

    /// True if the group exists and has members: the classic protocol cannot take it over.
    pub fn is_active(&self, group_id: &str) -> bool {
        self.groups
            .get(group_id)
            .is_some_and(|g| !g.members.is_empty())
    }

    pub fn heartbeat(
        &mut self,
        now_ms: u64,
        topics: &dyn TopicSource,
        req: HeartbeatRequest,
    ) -> HeartbeatResponse {
        match self.heartbeat_inner(now_ms, topics, req) {
            Ok(r) => r,
            Err((code, msg)) => HeartbeatResponse::error(code, msg),
        }
    }

    fn heartbeat_inner(
        &mut self,
        now_ms: u64,
        topics: &dyn TopicSource,
        req: HeartbeatRequest,
    ) -> Result<HeartbeatResponse, (ErrorCode, String)> {
        let bad = |m: &str| Err((E::InvalidRequest.code(), m.to_owned()));
        if req.group_id.is_empty() {
            return bad("GroupId can't be empty.");
        }
        if req.instance_id.as_deref() == Some("") {
            return bad("InstanceId can't be empty.");
        }
        let epoch = req.member_epoch;
        if epoch < STATIC_LEAVE_EPOCH {
            return bad("MemberEpoch is invalid.");
        }
        if epoch != 0 && req.member_id.is_empty() {
            return bad("MemberId can't be empty.");
        }
        if epoch == STATIC_LEAVE_EPOCH && req.instance_id.is_none() {
            return bad("InstanceId can't be null.");
        }
        if epoch == 0 {
            if req.rebalance_timeout_ms == -1 {
                return bad("RebalanceTimeoutMs must be provided in first request.");
            }
            if req
                .owned
                .as_ref()
                .is_some_and(|o| o.values().any(|ps| !ps.is_empty()))
            {
                return bad("TopicPartitions must be empty when (re-)joining.");
            }
            if req.subscribed_topic_names.is_none() && req.subscribed_topic_regex.is_none() {
                return bad(
                    "SubscribedTopicNames or SubscribedTopicRegex must be set in first request.",
                );
            }
        }
        let assignor = match req.server_assignor.as_deref() {
            None => None,
            Some(a) => Some(Assignor::parse(a).ok_or((
                E::UnsupportedAssignor.code(),
                format!(
                    "ServerAssignor {a} is not supported. Supported assignors: uniform, range."
                ),
            ))?),
        };
        let regex = match req.subscribed_topic_regex.as_deref() {
            None => None,
            Some("") => Some(None),
            Some(r) => Some(Some((
                r.to_owned(),
                compile_subscription(r).map_err(|e| {
                    (
                        E::InvalidRegularExpression.code(),
                        format!(
                            "SubscribedTopicRegex `{r}` is not a valid regular expression: {e}"
                        ),
                    )
                })?,
            ))),
        };
        if epoch == LEAVE_EPOCH || epoch == STATIC_LEAVE_EPOCH {
            return self.leave(&req);
        }

        let default_assignor = self.cfg.default_assignor;
        let session_timeout_ms = self.cfg.session_timeout_ms;
        let max_size = self.cfg.max_size;
        let member_id = if req.member_id.is_empty() {
            self.new_member_id()
        } else {
            req.member_id.clone()
        };
        if epoch != 0
            && !self
                .groups
                .get(&req.group_id)
                .is_some_and(|g| g.members.contains_key(&member_id))
        {
            return Err((
                E::UnknownMemberId.code(),
                format!(
                    "Member {member_id} is not a member of group {}.",
                    req.group_id
                ),
            ));
        }
        let group = self
            .groups
            .entry(req.group_id.clone())
            .or_insert_with(|| Group::new(req.group_id.clone(), default_assignor));

        let mut changed = false;
        if epoch == 0 {
            let replaced = match &req.instance_id {
                Some(inst) => match group.static_members.get(inst).cloned() {
                    Some(old) if old != member_id => {
                        let old_epoch = group.members.get(&old).map(|m| m.epoch);
                        if old_epoch != Some(STATIC_LEAVE_EPOCH) {
                            return Err((
                                E::UnreleasedInstanceId.code(),
                                format!("Static member {old} with instance id {inst} is present in group {}.", group.id),
                            ));
                        }
                        // The static member rejoins under a new id and takes over its old
                        // assignment without a rebalance.
                        let Some(old_m) = group.members.get(&old).cloned() else {
                            unreachable!("checked above")
                        };
                        group.set_holdings(&old, Assignment::new(), Assignment::new());
                        group.members.remove(&old);
                        let mut m = Member::new(member_id.clone(), now_ms, session_timeout_ms);
                        m.instance_id = Some(inst.clone());
                        m.subscribed_names = old_m.subscribed_names.clone();
                        m.subscribed_regex = old_m.subscribed_regex.clone();
                        m.server_assignor = old_m.server_assignor;
                        group.members.insert(member_id.clone(), m);
                        group.set_holdings(&member_id, old_m.assigned.clone(), Assignment::new());
                        if let Some(t) = group.target.remove(&old) {
                            group.target.insert(member_id.clone(), t);
                        }
                        group.static_members.insert(inst.clone(), member_id.clone());
                        true
                    }
                    _ => false,
                },
                None => false,
            };
            if !replaced {
                if group.members.contains_key(&member_id) {
                    // A fenced member rejoining: it dropped its partitions before rejoining.
                    group.set_holdings(&member_id, Assignment::new(), Assignment::new());
                    let m = group.members.get_mut(&member_id).expect("present");
                    m.epoch = 0;
                    m.previous_epoch = 0;
                    m.state = MemberState::Stable;
                    m.revocation_deadline_ms = None;
                } else {
                    if group.members.len() >= max_size {
                        return Err((E::GroupMaxSizeReached.code(), format!("The consumer group has reached its maximum capacity of {max_size} members.")));
                    }
                    group.members.insert(
                        member_id.clone(),
                        Member::new(member_id.clone(), now_ms, session_timeout_ms),
                    );
                    changed = true;
                }
                if let Some(inst) = &req.instance_id {
                    group.static_members.insert(inst.clone(), member_id.clone());
                }
            }
        }

        let m = group.members.get_mut(&member_id).expect("member present");
        if epoch != 0 {
            if epoch > m.epoch {
                return Err((
                    E::FencedMemberEpoch.code(),
                    format!("The consumer group member has a greater member epoch ({epoch}) than the one known by the group coordinator ({}). The member must abandon all its partitions and rejoin.", m.epoch),
                ));
            }
            // A member that missed the response bumping its epoch may come back once with the
            // previous epoch, as long as it owns nothing it was not given.
            if epoch < m.epoch
                && (epoch != m.previous_epoch || !is_subset(req.owned.as_ref(), &m.assigned))
            {
                return Err((
                    E::FencedMemberEpoch.code(),
                    format!("The consumer group member has a smaller member epoch ({epoch}) than the one known by the group coordinator ({}). The member must abandon all its partitions and rejoin.", m.epoch),
                ));
            }
        }
        if req.instance_id.is_some() {
            m.instance_id = req.instance_id.clone();
        }
        if req.rack_id.is_some() {
            m.rack_id = req.rack_id.clone();
        }
        if req.rebalance_timeout_ms > 0 {
            m.rebalance_timeout_ms = req.rebalance_timeout_ms as u64;
        }
        m.client_id = req.client_id.clone();
        m.client_host = req.client_host.clone();
        if let Some(names) = &req.subscribed_topic_names {
            let mut names = names.clone();
            names.sort();
            names.dedup();
            if names != m.subscribed_names {
                m.subscribed_names = names;
                changed = true;
            }
        }
        if let Some(r) = regex {
            if r.as_ref().map(|x| &x.0) != m.subscribed_regex.as_ref().map(|x| &x.0) {
                m.subscribed_regex = r;
                changed = true;
            }
        }
        if assignor.is_some() && assignor != m.server_assignor {
            m.server_assignor = assignor;
            changed = true;
        }
        m.session_deadline_ms = now_ms + session_timeout_ms;
        let assigned_before = if epoch == 0 {
            None
        } else {
            Some(m.assigned.clone())
        };
        group.refresh_target(topics, default_assignor, changed);
        group.reconcile(&member_id, req.owned.as_ref(), now_ms);
        let m = &group.members[&member_id];
        let send_assignment =
            epoch == 0 || req.owned.is_some() || assigned_before.as_ref() != Some(&m.assigned);
        Ok(HeartbeatResponse {
            error_code: NONE,
            error_message: None,
            member_id: Some(member_id.clone()),
            member_epoch: m.epoch,
            heartbeat_interval_ms: self.cfg.heartbeat_interval_ms,
            assignment: send_assignment.then(|| m.assigned.clone()),
        })
    }

    fn leave(&mut self, req: &HeartbeatRequest) -> Result<HeartbeatResponse, (ErrorCode, String)> {
        let unknown = || {
            (
                E::UnknownMemberId.code(),
                format!(
                    "Member {} is not a member of group {}.",
                    req.member_id, req.group_id
                ),
            )
        };
        let group = self.groups.get_mut(&req.group_id).ok_or_else(unknown)?;
        let member_id = if group.members.contains_key(&req.member_id) {
            req.member_id.clone()
        } else {
            req.instance_id
                .as_ref()
                .and_then(|i| group.static_members.get(i))
                .cloned()
                .ok_or_else(unknown)?
        };
        if req.member_epoch == STATIC_LEAVE_EPOCH {
            // Kept with its partitions until its session expires or it rejoins.
            let m = group.members.get_mut(&member_id).expect("present");
            m.epoch = STATIC_LEAVE_EPOCH;
            m.revocation_deadline_ms = None;
        } else {
            group.remove_member(&member_id);
        }
        Ok(HeartbeatResponse {
            error_code: NONE,
            error_message: None,
            member_id: Some(member_id),
            member_epoch: req.member_epoch,
            heartbeat_interval_ms: 0,
            assignment: None,
        })
    }

    /// Fences members whose session expired or who did not revoke in time.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Expired> {
        let mut out = Vec::new();
        for g in self.groups.values_mut() {
            let due: Vec<(String, &'static str)> = g
                .members
                .values()
                .filter(|m| m.deadline_ms() <= now_ms)
                .map(|m| {
                    let why = if m.session_deadline_ms <= now_ms {
                        "session timeout"
                    } else {
                        "revocation timeout"
                    };
                    (m.id.clone(), why)
                })
                .collect();
            for (id, reason) in due {
                g.remove_member(&id);
                out.push(Expired {
                    group_id: g.id.clone(),
                    member_id: id,
                    reason,
                });
            }
        }
        out
    }

    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.groups
            .values()
            .flat_map(|g| g.members.values().map(Member::deadline_ms))
            .min()
    }

    /// OffsetCommit from a consumer group (`None`: not a consumer group, classic rules apply).
    /// Kafka's ConsumerGroup.validateOffsetCommit.
    pub fn validate_commit(
        &self,
        group_id: &str,
        member_id: &str,
        member_epoch: i32,
    ) -> Option<Result<(), ErrorCode>> {
        let g = self.groups.get(group_id)?;
        // Admin clients and manual commits, allowed while the group is empty.
        if member_epoch < 0 && g.members.is_empty() {
            return Some(Ok(()));
        }
        let Some(m) = g.members.get(member_id) else {
            return Some(Err(E::UnknownMemberId.code()));
        };
        Some(if member_epoch != m.epoch {
            Err(E::StaleMemberEpoch.code())
        } else {
            Ok(())
        })
    }

    /// OffsetFetch v9 from a consumer group member; `member_epoch` -1 is an admin fetch.
    pub fn validate_fetch(
        &self,
        group_id: &str,
        member_id: Option<&str>,
        member_epoch: i32,
    ) -> Result<(), ErrorCode> {
        let Some(g) = self.groups.get(group_id) else {
            return Ok(());
        };
        if member_epoch == -1 {
            return Ok(());
        }
        let Some(m) = member_id.and_then(|id| g.members.get(id)) else {
            return Err(E::UnknownMemberId.code());
        };
        if member_epoch != m.epoch {
            return Err(E::StaleMemberEpoch.code());
        }
        Ok(())
    }

    pub fn state(&self, group_id: &str) -> Option<GroupState> {
        self.groups.get(group_id).map(Group::state)
    }

    /// (group id, state name) for ListGroups.
    pub fn list(&self) -> Vec<(String, String)> {
        self.groups
            .values()
            .map(|g| (g.id.clone(), g.state().as_str().to_owned()))
            .collect()
    }

    pub fn describe(&self, group_id: &str) -> Option<GroupDescription> {
        let g = self.groups.get(group_id)?;
        Some(GroupDescription {
            group_id: g.id.clone(),
            state: g.state(),
            group_epoch: g.group_epoch,
            assignment_epoch: g.assignment_epoch,
            assignor: g.assignor.name(),
            members: g
                .members
                .values()
                .map(|m| MemberDescription {
                    member_id: m.id.clone(),
                    instance_id: m.instance_id.clone(),
                    rack_id: m.rack_id.clone(),
                    member_epoch: m.epoch,
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    subscribed_topic_names: m.subscribed_names.clone(),
                    subscribed_topic_regex: m.subscribed_regex.as_ref().map(|r| r.0.clone()),
                    assignment: m.assigned.clone(),
                    target_assignment: g.target.get(&m.id).cloned().unwrap_or_default(),
                })
                .collect(),
        })
    }

    /// DeleteGroups, or a classic JoinGroup taking over an empty group.
    pub fn delete(&mut self, group_id: &str) -> Result<(), ErrorCode> {
        match self.groups.get(group_id) {
            None => Err(E::GroupIdNotFound.code()),
            Some(g) if !g.members.is_empty() => Err(E::NonEmptyGroup.code()),
            Some(_) => {
                self.groups.remove(group_id);
                Ok(())
            }
        }
    }

    /// Asserts the coordinator's invariants: `owners` matches the members' holdings, and no
    /// partition is held by two members. For tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        for g in self.groups.values() {
            let mut seen: BTreeMap<(String, i32), &str> = BTreeMap::new();
            for m in g.members.values() {
                for (t, ps) in m.assigned.iter().chain(m.revoking.iter()) {
                    for p in ps {
                        if let Some(o) = seen.insert((t.clone(), *p), &m.id) {
                            return Err(format!(
                                "group {}: {t}-{p} held by {o} and {}",
                                g.id, m.id
                            ));
                        }
                    }
                }
                if m.epoch > g.assignment_epoch {
                    return Err(format!(
                        "member {} epoch {} ahead of assignment epoch {}",
                        m.id, m.epoch, g.assignment_epoch
                    ));
                }
            }
            let owners: BTreeMap<(String, i32), &str> = g
                .owners
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str()))
                .collect();
            if owners != seen {
                return Err(format!(
                    "group {}: owners map out of step with members",
                    g.id
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: u64 = 5_000;

    fn topics(ts: &[(&str, i32)]) -> BTreeMap<String, i32> {
        ts.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    }

    fn cg() -> ConsumerGroups {
        ConsumerGroups::new(ConsumerConfig::default(), 7)
    }

    fn join(id: &str, subs: &[&str]) -> HeartbeatRequest {
        HeartbeatRequest {
            group_id: "g".into(),
            member_id: id.into(),
            member_epoch: 0,
            rebalance_timeout_ms: 300_000,
            subscribed_topic_names: Some(subs.iter().map(|s| s.to_string()).collect()),
            owned: Some(Assignment::new()),
            ..Default::default()
        }
    }

    /// A simulated client: it owns exactly what the coordinator last told it (revoking is
    /// immediate), and acknowledges by reporting its owned partitions.
    #[derive(Debug, Clone)]
    struct Client {
        id: String,
        epoch: i32,
        owned: Assignment,
        subs: Vec<String>,
        joined: bool,
    }

    impl Client {
        fn new(id: &str, subs: &[&str]) -> Client {
            Client {
                id: id.into(),
                epoch: 0,
                owned: Assignment::new(),
                subs: subs.iter().map(|s| s.to_string()).collect(),
                joined: false,
            }
        }

        fn beat(
            &mut self,
            c: &mut ConsumerGroups,
            now: u64,
            t: &BTreeMap<String, i32>,
        ) -> HeartbeatResponse {
            let req = if !self.joined {
                join(
                    &self.id,
                    &self.subs.iter().map(String::as_str).collect::<Vec<_>>(),
                )
            } else {
                HeartbeatRequest {
                    group_id: "g".into(),
                    member_id: self.id.clone(),
                    member_epoch: self.epoch,
                    rebalance_timeout_ms: -1,
                    owned: Some(self.owned.clone()),
                    ..Default::default()
                }
            };
            let r = c.heartbeat(now, t, req);
            match r.error_code {
                NONE => {
                    self.joined = true;
                    self.epoch = r.member_epoch;
                    if let Some(a) = &r.assignment {
                        self.owned = a.clone();
                    }
                }
                code if code == E::UnknownMemberId.code()
                    || code == E::FencedMemberEpoch.code() =>
                {
                    self.joined = false;
                    self.epoch = 0;
                    self.owned.clear();
                }
                other => panic!("unexpected error {other}: {:?}", r.error_message),
            }
            c.check_invariants().unwrap();
            r
        }

        fn count(&self) -> usize {
            self.owned.values().map(BTreeSet::len).sum()
        }
    }

    /// No partition owned by two simulated clients at once (what the clients believe).
    fn clients_disjoint(cs: &[Client]) -> Result<(), String> {
        let mut seen = BTreeMap::new();
        for c in cs {
            for (t, ps) in &c.owned {
                for p in ps {
                    if let Some(o) = seen.insert((t.clone(), *p), c.id.clone()) {
                        return Err(format!("{t}-{p} owned by {o} and {}", c.id));
                    }
                }
            }
        }
        Ok(())
    }

    fn converge(
        c: &mut ConsumerGroups,
        cs: &mut [Client],
        now: &mut u64,
        t: &BTreeMap<String, i32>,
    ) {
        for _ in 0..20 {
            for cl in cs.iter_mut() {
                cl.beat(c, *now, t);
            }
            clients_disjoint(cs).unwrap();
            *now += HB;
            if c.state("g") == Some(GroupState::Stable) {
                return;
            }
        }
        panic!("group did not converge: {:?}", c.describe("g"));
    }

    #[test]
    fn single_member_gets_everything() {
        let t = topics(&[("a", 6)]);
        let mut c = cg();
        let r = c.heartbeat(0, &t, join("m1", &["a"]));
        assert_eq!(r.error_code, 0);
        assert_eq!(r.member_epoch, 1);
        assert_eq!(r.heartbeat_interval_ms, 5000);
        assert_eq!(r.assignment.unwrap()["a"].len(), 6);
        assert_eq!(c.state("g"), Some(GroupState::Stable));
    }

    #[test]
    fn server_generates_member_id_when_empty() {
        let t = topics(&[("a", 1)]);
        let mut c = cg();
        let r = c.heartbeat(0, &t, join("", &["a"]));
        let id = r.member_id.unwrap();
        assert_eq!(id.len(), 36);
        let r2 = c.heartbeat(0, &t, join("", &["a"]));
        assert_ne!(r2.member_id.unwrap(), id);
    }

    #[test]
    fn second_member_gets_half_after_revocation() {
        let t = topics(&[("a", 6)]);
        let mut c = cg();
        let mut a = Client::new("A", &["a"]);
        let mut b = Client::new("B", &["a"]);
        a.beat(&mut c, 0, &t);
        assert_eq!(a.count(), 6);
        // B joins: the target splits 3/3 but A still holds everything, so B gets nothing yet.
        let r = b.beat(&mut c, 10, &t);
        assert_eq!(r.member_epoch, 2);
        assert_eq!(b.count(), 0);
        assert_eq!(c.state("g"), Some(GroupState::Reconciling));
        // A is told to keep 3 (revoking 3) at its old epoch.
        let r = a.beat(&mut c, 20, &t);
        assert_eq!(r.member_epoch, 1);
        assert_eq!(a.count(), 3);
        // A's ack (owned = 3) moves it to epoch 2.
        let r = a.beat(&mut c, 30, &t);
        assert_eq!(r.member_epoch, 2);
        // B now receives the released partitions.
        b.beat(&mut c, 40, &t);
        assert_eq!(b.count(), 3);
        clients_disjoint(&[a.clone(), b.clone()]).unwrap();
        b.beat(&mut c, 50, &t);
        assert_eq!(c.state("g"), Some(GroupState::Stable));
    }

    #[test]
    fn leave_gives_everything_back_to_the_survivor() {
        let t = topics(&[("a", 6)]);
        let mut c = cg();
        let mut cs = vec![Client::new("A", &["a"]), Client::new("B", &["a"])];
        let mut now = 0;
        converge(&mut c, &mut cs, &mut now, &t);
        assert_eq!(cs[0].count(), 3);
        assert_eq!(cs[1].count(), 3);
        let r = c.heartbeat(
            now,
            &t,
            HeartbeatRequest {
                group_id: "g".into(),
                member_id: "B".into(),
                member_epoch: -1,
                ..Default::default()
            },
        );
        assert_eq!((r.error_code, r.member_epoch), (0, -1));
        cs.truncate(1);
        converge(&mut c, &mut cs, &mut now, &t);
        assert_eq!(cs[0].count(), 6);
    }

    #[test]
    fn session_expiry_fences_and_frees() {
        let t = topics(&[("a", 4)]);
        let mut c = cg();
        let mut cs = vec![Client::new("A", &["a"]), Client::new("B", &["a"])];
        let mut now = 0;
        converge(&mut c, &mut cs, &mut now, &t);
        // B stops heartbeating; A keeps going.
        let deadline = c.next_deadline_ms().unwrap();
        let mut fenced = Vec::new();
        while now < deadline + 45_000 {
            cs[0].beat(&mut c, now, &t);
            fenced.extend(c.tick(now));
            now += HB;
        }
        assert_eq!(fenced.len(), 1);
        assert_eq!(fenced[0].member_id, "B");
        cs[0].beat(&mut c, now, &t);
        cs[0].beat(&mut c, now, &t);
        assert_eq!(cs[0].count(), 4);
        // B comes back with its old epoch: unknown member, rejoins from scratch.
        let r = cs[1].beat(&mut c, now, &t);
        assert_eq!(r.error_code, E::UnknownMemberId.code());
        assert!(cs[1].owned.is_empty());
    }

    #[test]
    fn errors() {
        let t = topics(&[("a", 1)]);
        let mut c = cg();
        let mut r = join("m", &["a"]);
        r.server_assignor = Some("sticky".into());
        assert_eq!(
            c.heartbeat(0, &t, r).error_code,
            E::UnsupportedAssignor.code()
        );
        let mut r = join("m", &["a"]);
        r.rebalance_timeout_ms = -1;
        assert_eq!(c.heartbeat(0, &t, r).error_code, E::InvalidRequest.code());
        let mut r = join("m", &[]);
        r.subscribed_topic_names = None;
        assert_eq!(c.heartbeat(0, &t, r).error_code, E::InvalidRequest.code());
        let mut r = join("m", &["a"]);
        r.group_id = String::new();
        assert_eq!(c.heartbeat(0, &t, r).error_code, E::InvalidRequest.code());
        let r = HeartbeatRequest {
            group_id: "g".into(),
            member_id: "x".into(),
            member_epoch: 3,
            ..Default::default()
        };
        assert_eq!(c.heartbeat(0, &t, r).error_code, E::UnknownMemberId.code());
        assert_eq!(c.heartbeat(0, &t, join("m", &["a"])).member_epoch, 1);
        let r = HeartbeatRequest {
            group_id: "g".into(),
            member_id: "m".into(),
            member_epoch: 5,
            ..Default::default()
        };
        assert_eq!(
            c.heartbeat(0, &t, r).error_code,
            E::FencedMemberEpoch.code()
        );
        let mut r = join("m", &["a"]);
        r.subscribed_topic_regex = Some("(".into());
        assert_eq!(
            c.heartbeat(0, &t, r).error_code,
            E::InvalidRegularExpression.code()
        );
        // Offsets: stale epoch, unknown member.
        assert_eq!(c.validate_commit("g", "m", 1), Some(Ok(())));
        assert_eq!(
            c.validate_commit("g", "m", 0),
            Some(Err(E::StaleMemberEpoch.code()))
        );
        assert_eq!(
            c.validate_commit("g", "z", 1),
            Some(Err(E::UnknownMemberId.code()))
        );
        assert_eq!(c.validate_commit("other", "m", 1), None);
        assert_eq!(
            c.validate_fetch("g", Some("m"), 0),
            Err(E::StaleMemberEpoch.code())
        );
        assert_eq!(c.validate_fetch("g", None, -1), Ok(()));
        assert_eq!(c.delete("g"), Err(E::NonEmptyGroup.code()));
    }

    #[test]
    fn rejoin_after_fencing_keeps_member_id() {
        let t = topics(&[("a", 2)]);
        let mut c = cg();
        let mut a = Client::new("A", &["a"]);
        a.beat(&mut c, 0, &t);
        // A stale epoch (not the previous one) fences; the client rejoins with epoch 0.
        a.epoch = 7;
        assert_eq!(
            a.beat(&mut c, 1, &t).error_code,
            E::FencedMemberEpoch.code()
        );
        let r = a.beat(&mut c, 2, &t);
        assert_eq!(r.error_code, 0);
        assert_eq!(a.count(), 2);
    }

    #[test]
    fn previous_epoch_is_tolerated_once() {
        let t = topics(&[("a", 2)]);
        let mut c = cg();
        let mut a = Client::new("A", &["a"]);
        a.beat(&mut c, 0, &t);
        assert_eq!(a.epoch, 1);
        let mut b = Client::new("B", &["a"]);
        b.beat(&mut c, 1, &t); // epoch 2
        a.beat(&mut c, 2, &t); // revoke one
        a.beat(&mut c, 3, &t); // ack -> epoch 2
        assert_eq!(a.epoch, 2);
        // The response with epoch 2 was lost: epoch 1 with a subset of the assignment is fine.
        let r = c.heartbeat(
            4,
            &t,
            HeartbeatRequest {
                group_id: "g".into(),
                member_id: "A".into(),
                member_epoch: 1,
                owned: Some(a.owned.clone()),
                rebalance_timeout_ms: -1,
                ..Default::default()
            },
        );
        assert_eq!((r.error_code, r.member_epoch), (0, 2));
    }

    #[test]
    fn static_member_leave_and_rejoin_keeps_assignment() {
        let t = topics(&[("a", 4)]);
        let mut c = cg();
        let mut r = join("s1", &["a"]);
        r.instance_id = Some("i1".into());
        let resp = c.heartbeat(0, &t, r);
        let epoch = resp.member_epoch;
        let mut r = join("s2", &["a"]);
        r.instance_id = Some("i1".into());
        assert_eq!(
            c.heartbeat(1, &t, r.clone()).error_code,
            E::UnreleasedInstanceId.code()
        );
        let leave = HeartbeatRequest {
            group_id: "g".into(),
            member_id: "s1".into(),
            member_epoch: -2,
            instance_id: Some("i1".into()),
            ..Default::default()
        };
        assert_eq!(c.heartbeat(2, &t, leave).member_epoch, -2);
        let resp = c.heartbeat(3, &t, r);
        assert_eq!(resp.error_code, 0);
        assert_eq!(resp.member_epoch, epoch, "no rebalance");
        assert_eq!(resp.assignment.unwrap()["a"].len(), 4);
        assert_eq!(c.describe("g").unwrap().members.len(), 1);
        c.check_invariants().unwrap();
    }

    #[test]
    fn new_topic_and_partitions_bump_the_epoch() {
        let mut t = topics(&[("a", 2)]);
        let mut c = cg();
        let mut a = Client::new("A", &["a", "b"]);
        a.beat(&mut c, 0, &t);
        assert_eq!(a.count(), 2);
        t.insert("b".into(), 3);
        a.beat(&mut c, 1, &t);
        assert_eq!(a.count(), 5);
        t.insert("a".into(), 4);
        a.beat(&mut c, 2, &t);
        assert_eq!(a.count(), 7);
        assert_eq!(a.epoch, 3);
    }

    #[test]
    fn regex_subscription() {
        let t = topics(&[("orders-1", 1), ("orders-2", 2), ("other", 3)]);
        let mut c = cg();
        let mut r = join("m", &[]);
        r.subscribed_topic_names = None;
        r.subscribed_topic_regex = Some("orders-.*".into());
        let a = c.heartbeat(0, &t, r).assignment.unwrap();
        assert_eq!(
            a.keys().cloned().collect::<Vec<_>>(),
            vec!["orders-1", "orders-2"]
        );
    }

    #[test]
    fn range_assignor() {
        let subs: BTreeMap<String, BTreeSet<String>> = [
            ("m1", vec!["a", "b"]),
            ("m2", vec!["a"]),
            ("m3", vec!["a", "b"]),
        ]
        .iter()
        .map(|(m, ts)| (m.to_string(), ts.iter().map(|t| t.to_string()).collect()))
        .collect();
        let out = assign(
            Assignor::Range,
            &subs,
            &topics(&[("a", 7), ("b", 3)]),
            &BTreeMap::new(),
        );
        assert_eq!(out["m1"]["a"], (0..3).collect());
        assert_eq!(out["m2"]["a"], (3..5).collect());
        assert_eq!(out["m3"]["a"], (5..7).collect());
        assert_eq!(out["m1"]["b"], (0..2).collect());
        assert_eq!(out["m3"]["b"], (2..3).collect());
        let mut c = cg();
        let mut r = join("m", &["a"]);
        r.server_assignor = Some("range".into());
        c.heartbeat(0, &topics(&[("a", 7)]), r);
        assert_eq!(c.describe("g").unwrap().assignor, "range");
    }

    #[test]
    fn uniform_is_balanced_and_sticky() {
        let subs: BTreeMap<String, BTreeSet<String>> = ["m1", "m2", "m3"]
            .iter()
            .map(|m| {
                (
                    m.to_string(),
                    ["a", "b"].iter().map(|t| t.to_string()).collect(),
                )
            })
            .collect();
        let counts = topics(&[("a", 5), ("b", 6)]);
        let first = assign(Assignor::Uniform, &subs, &counts, &BTreeMap::new());
        let loads: Vec<usize> = first
            .values()
            .map(|a| a.values().map(BTreeSet::len).sum())
            .collect();
        assert!(
            loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 1,
            "{loads:?}"
        );
        // A fourth member takes from each without moving anything else.
        let mut subs4 = subs.clone();
        subs4.insert("m4".into(), subs["m1"].clone());
        let second = assign(Assignor::Uniform, &subs4, &counts, &first);
        let loads: Vec<usize> = second
            .values()
            .map(|a| a.values().map(BTreeSet::len).sum())
            .collect();
        assert!(
            loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 1,
            "{loads:?}"
        );
        for m in ["m1", "m2", "m3"] {
            for (t, ps) in &second[m] {
                assert!(ps.is_subset(&first[m][t]), "{m} gained {t} {ps:?}");
            }
        }
    }

    /// Randomized schedules: members join, heartbeat, leave, stall past their session, topics
    /// grow, and the coordinator fails over to one rebuilt from its stored records; the coordinator never lets two members hold a partition, clients never
    /// believe they share one, and once quiet the group converges to a balanced assignment.
    #[test]
    fn randomized_schedules_never_double_assign() {
        let seed0: u64 = std::env::var("FJORD_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed);
        for run in 0..200u64 {
            let seed = seed0.wrapping_add(run);
            if let Err(e) = std::panic::catch_unwind(|| simulate(seed)) {
                eprintln!("randomized schedule failed: replay with FJORD_SEED={seed}");
                std::panic::resume_unwind(e);
            }
        }
    }

    fn sim_topic_id(name: &str) -> Option<Uuid> {
        Some(Uuid::from_u64_pair(
            metadata_hash(&topics(&[(name, 0)])) as u64,
            7,
        ))
    }

    /// Applies what the coordinator hands out to a simulated `__consumer_offsets` (latest value
    /// per key, tombstones remove).
    fn store(c: &mut ConsumerGroups, log: &mut BTreeMap<ConsumerKey, ConsumerRecord>) {
        for r in c.records_to_store("g", &sim_topic_id) {
            if r.encode_value().is_some() {
                log.insert(r.key(), r);
            } else {
                log.remove(&r.key());
            }
        }
        c.store_done("g", true);
    }

    /// A new coordinator rebuilt from the stored records, as after a failover: it must describe
    /// the group exactly as the old one did and have nothing to write back.
    fn fail_over(
        c: &ConsumerGroups,
        log: &BTreeMap<ConsumerKey, ConsumerRecord>,
        now: u64,
        t: &BTreeMap<String, i32>,
        seed: u64,
    ) -> ConsumerGroups {
        let mut fresh = ConsumerGroups::new(c.cfg.clone(), seed ^ now);
        let names: BTreeMap<Uuid, String> = t
            .keys()
            .map(|n| (sim_topic_id(n).unwrap(), n.clone()))
            .collect();
        fresh.restore(now, "g", log, t, &|id| names.get(id).cloned());
        // The assignor is not stored: a restored group uses the one its members prefer now,
        // which differs only after a member left, and then the group epoch moved anyway.
        let without_assignor = |c: &ConsumerGroups| {
            c.describe("g").map(|mut d| {
                d.assignor = "";
                d
            })
        };
        assert_eq!(
            without_assignor(&fresh),
            without_assignor(c),
            "seed {seed}: restored group"
        );
        fresh.check_invariants().unwrap();
        fresh.store_done("g", true);
        assert!(
            fresh.records_to_store("g", &sim_topic_id).is_empty(),
            "seed {seed}: a restored group has nothing new to store"
        );
        fresh
    }

    #[test]
    fn a_failed_store_is_written_again_in_full_and_deletion_tombstones_everything() {
        let t = topics(&[("a", 4)]);
        let mut c = cg();
        let mut log = BTreeMap::new();
        let r = c.heartbeat(0, &t, join("m1", &["a"]));
        store(&mut c, &mut log);
        assert_eq!(
            log.len(),
            5,
            "group, target epoch, member, its target, its assignment"
        );
        // The next change is lost: the shell reports it, and everything is written again.
        let mut hb = join("m1", &["a"]);
        hb.member_epoch = r.member_epoch;
        hb.member_id = r.member_id.clone().unwrap();
        hb.subscribed_topic_names = None;
        c.heartbeat(HB, &t, hb);
        let lost = c.records_to_store("g", &sim_topic_id);
        c.store_done("g", false);
        let again = c.records_to_store("g", &sim_topic_id);
        assert!(again.len() >= lost.len() && again.len() == 5, "{again:?}");
        c.store_done("g", true);
        assert!(c.records_to_store("g", &sim_topic_id).is_empty());
        // Leaving and deleting: every record gets its tombstone.
        let mut leave = join("m1", &["a"]);
        leave.member_id = r.member_id.unwrap();
        leave.member_epoch = LEAVE_EPOCH;
        c.heartbeat(2 * HB, &t, leave);
        // The tombstones are lost once: they are handed out again.
        let lost = c.records_to_store("g", &sim_topic_id);
        assert_eq!(
            lost.iter().filter(|r| r.encode_value().is_none()).count(),
            3
        );
        c.store_done("g", false);
        store(&mut c, &mut log);
        assert_eq!(log.len(), 2, "the member's three records are gone: {log:?}");
        c.delete("g").unwrap();
        store(&mut c, &mut log);
        assert!(log.is_empty(), "{log:?}");
        assert!(c.group_ids().is_empty());
    }

    #[test]
    fn a_restored_group_with_changed_topics_rebalances() {
        let mut t = topics(&[("a", 2)]);
        let mut c = cg();
        let mut log = BTreeMap::new();
        let r = c.heartbeat(0, &t, join("m1", &["a"]));
        store(&mut c, &mut log);
        // The topic grows while no coordinator runs.
        t.insert("a".into(), 4);
        let names = |id: &Uuid| (sim_topic_id("a") == Some(*id)).then(|| "a".to_string());
        let mut fresh = cg();
        fresh.restore(HB, "g", &log, &t, &names);
        let before = fresh.describe("g").unwrap().group_epoch;
        let mut hb = join("m1", &["a"]);
        hb.member_id = r.member_id.unwrap();
        hb.member_epoch = r.member_epoch;
        hb.subscribed_topic_names = None;
        let r2 = fresh.heartbeat(HB, &t, hb);
        assert_eq!(r2.error_code, NONE);
        assert!(fresh.describe("g").unwrap().group_epoch > before);
        assert_eq!(r2.assignment.unwrap()["a"].len(), 4);
    }

    /// OffsetCommit (v9: member id and epoch) of what a client owns, as a consumer commits
    /// what it read. Accepted only at the member's current epoch, and then every partition it
    /// commits is one the coordinator has it hold (assigned or still being revoked): a fenced
    /// or stale member never overwrites the owner's offsets. OffsetFetch then reports the last
    /// accepted commit of every partition.
    fn commit(
        c: &ConsumerGroups,
        cl: &Client,
        step: i64,
        offsets: &mut crate::group::offsets::CommittedOffsets,
        expected: &mut BTreeMap<(String, i32), i64>,
        seed: u64,
    ) {
        let r = c.validate_commit("g", &cl.id, cl.epoch);
        let Some(Ok(())) = r else {
            return;
        };
        let m = &c.groups["g"].members[&cl.id];
        let mut commits = Vec::new();
        for (t, ps) in &cl.owned {
            for p in ps {
                let held = m.assigned.get(t).is_some_and(|s| s.contains(p))
                    || m.revoking.get(t).is_some_and(|s| s.contains(p));
                assert!(
                    held,
                    "seed {seed}: {} committed {t}-{p} it does not hold",
                    cl.id
                );
                let v = crate::group::records::OffsetValue {
                    offset: step,
                    leader_epoch: -1,
                    metadata: String::new(),
                    commit_timestamp_ms: 0,
                };
                commits.push((t.clone(), *p, v));
                expected.insert((t.clone(), *p), step);
            }
        }
        offsets.stored("g", commits);
        for (t, rows) in offsets.fetch("g", None) {
            for r in rows {
                assert_eq!(Some(&r.offset), expected.get(&(t.clone(), r.partition)));
            }
        }
    }

    fn simulate(seed: u64) {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut rand = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n.max(1)
        };
        let mut t = topics(&[("a", 1 + rand(8) as i32), ("b", 1 + rand(5) as i32)]);
        let mut c = ConsumerGroups::new(
            ConsumerConfig {
                session_timeout_ms: 20_000,
                ..Default::default()
            },
            seed,
        );
        let mut clients: Vec<Client> = Vec::new();
        let mut stalled: BTreeSet<String> = BTreeSet::new();
        let mut next_id = 0;
        let mut now = 0u64;
        let subs_choices: [&[&str]; 3] = [&["a"], &["b"], &["a", "b"]];
        let mut log = BTreeMap::new();
        let mut offsets = crate::group::offsets::CommittedOffsets::default();
        let mut expected: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for step in 0..300 {
            now += 1 + rand(2_000);
            match rand(20) {
                5 => c = fail_over(&c, &log, now, &t, seed),
                6 if !clients.is_empty() => {
                    let i = rand(clients.len() as u64) as usize;
                    let cl = &clients[i];
                    commit(&c, cl, step, &mut offsets, &mut expected, seed);
                }
                0..=1 if clients.len() < 6 => {
                    next_id += 1;
                    clients.push(Client::new(
                        &format!("c{next_id}"),
                        subs_choices[rand(3) as usize],
                    ));
                }
                2 if !clients.is_empty() => {
                    let i = rand(clients.len() as u64) as usize;
                    let cl = clients.remove(i);
                    if cl.joined {
                        c.heartbeat(
                            now,
                            &t,
                            HeartbeatRequest {
                                group_id: "g".into(),
                                member_id: cl.id,
                                member_epoch: -1,
                                ..Default::default()
                            },
                        );
                    }
                }
                3 if !clients.is_empty() => {
                    let i = rand(clients.len() as u64) as usize;
                    stalled.insert(clients[i].id.clone());
                }
                4 => {
                    let k = if rand(2) == 0 { "a" } else { "b" };
                    *t.get_mut(k).unwrap() += 1;
                }
                _ if !clients.is_empty() => {
                    let i = rand(clients.len() as u64) as usize;
                    if stalled.contains(&clients[i].id) {
                        if rand(10) == 0 {
                            stalled.remove(&clients[i].id);
                        }
                    } else {
                        clients[i].beat(&mut c, now, &t);
                    }
                }
                _ => {}
            }
            for e in c.tick(now) {
                // A fenced client's next heartbeat tells it; it would have lost its
                // partitions on its own (session lost), so drop them now as librdkafka does.
                if let Some(cl) = clients.iter_mut().find(|cl| cl.id == e.member_id) {
                    cl.owned.clear();
                }
            }
            c.check_invariants().unwrap();
            store(&mut c, &mut log);
            // A stalled client keeps believing it owns its partitions until fenced.
            clients_disjoint(&clients).unwrap();
        }
        // Quiet period: everyone heartbeats; the group must converge.
        stalled.clear();
        for _ in 0..40 {
            now += 1000;
            for cl in clients.iter_mut() {
                cl.beat(&mut c, now, &t);
            }
            c.tick(now);
            store(&mut c, &mut log);
            clients_disjoint(&clients).unwrap();
        }
        c = fail_over(&c, &log, now, &t, seed);
        if clients.is_empty() {
            return;
        }
        assert_eq!(
            c.state("g"),
            Some(GroupState::Stable),
            "seed {seed}: {:?}",
            c.describe("g")
        );
        let d = c.describe("g").unwrap();
        for m in &d.members {
            assert_eq!(m.assignment, m.target_assignment, "seed {seed}");
        }
        let total: usize = d
            .members
            .iter()
            .map(|m| m.assignment.values().map(BTreeSet::len).sum::<usize>())
            .sum();
        let wanted: BTreeSet<&str> = clients
            .iter()
            .flat_map(|c| c.subs.iter().map(String::as_str))
            .collect();
        let expect: i32 = wanted.iter().map(|w| t[*w]).sum();
        assert_eq!(
            total as i32, expect,
            "seed {seed}: every subscribed partition assigned"
        );
    }
}
