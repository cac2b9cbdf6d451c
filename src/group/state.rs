//! Sans-IO classic consumer-group coordinator: Kafka's JoinGroup / SyncGroup / Heartbeat /
//! LeaveGroup protocol with KIP-345 static membership, for every group of one shard.
//!
//! No I/O, no clock, no async. The shell passes `now_ms` into every call, answers a pending
//! request (`Token`) when an [`Action`] names it, and calls [`GroupCoordinator::tick`] at
//! [`GroupCoordinator::next_deadline_ms`]. A request answered synchronously returns its answer
//! directly (heartbeat, leave) or as an action in the returned vector (join, sync).
//!
//! Group states follow Kafka: Empty → PreparingRebalance → CompletingRebalance → Stable. Dead
//! is never stored: a deleted group is simply gone from the map.

use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};

use kafka_protocol::ResponseError as E;

use super::records::{GroupMetadataValue, MemberMetadataValue};

/// Identifies a pending client request; the shell answers it when an [`Action`] says so.
pub type Token = u64;
/// Kafka's numeric error code.
pub type ErrorCode = i16;

/// No error (Kafka's code 0); every other code is `kafka_protocol::ResponseError`'s.
pub const NONE: ErrorCode = 0;

/// Broker settings that shape the protocol (Kafka's `group.*` configs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// `group.min.session.timeout.ms`
    pub min_session_timeout_ms: i32,
    /// `group.max.session.timeout.ms`
    pub max_session_timeout_ms: i32,
    /// `group.initial.rebalance.delay.ms`; 0 disables the initial delay.
    pub initial_rebalance_delay_ms: u64,
    /// `group.max.size`: members plus members that were told MEMBER_ID_REQUIRED.
    pub max_size: usize,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            min_session_timeout_ms: 6_000,
            max_session_timeout_ms: 1_800_000,
            initial_rebalance_delay_ms: 3_000,
            max_size: i32::MAX as usize,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    pub group_id: String,
    /// Empty for a member joining for the first time.
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    /// JoinGroup v0 has none: pass a value <= 0 and the session timeout is used, as in Kafka.
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    /// (protocol name, metadata), in the member's order of preference.
    pub protocols: Vec<(String, Bytes)>,
    /// True for JoinGroup v4+: a new dynamic member first gets MEMBER_ID_REQUIRED.
    pub require_known_member_id: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinMember {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    /// The member's metadata for the selected protocol.
    pub metadata: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinResponse {
    pub error_code: ErrorCode,
    pub generation_id: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// Always false: KIP-814 is not implemented (see `join_static_member`).
    pub skip_assignment: bool,
    /// Non-empty only in the leader's response.
    pub members: Vec<JoinMember>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRequest {
    pub group_id: String,
    pub generation_id: i32,
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    /// Only the leader sends assignments.
    pub assignments: Vec<(String, Bytes)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncResponse {
    pub error_code: ErrorCode,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignment: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRequest {
    pub group_id: String,
    pub generation_id: i32,
    pub member_id: String,
    pub group_instance_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaveMember {
    /// May be empty when `group_instance_id` is set (LeaveGroup v3+).
    pub member_id: String,
    pub group_instance_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    /// Empty unless the group is Stable, as in Kafka's DescribeGroups.
    pub metadata: Bytes,
    pub assignment: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub group_id: String,
    pub state: &'static str,
    pub protocol_type: String,
    /// Empty unless the group is Stable.
    pub protocol: String,
    pub members: Vec<MemberDescription>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    JoinResponse {
        token: Token,
        resp: JoinResponse,
    },
    SyncResponse {
        token: Token,
        resp: SyncResponse,
    },
    /// The group's persisted metadata changed; the shell may write
    /// [`GroupCoordinator::group_metadata`] to `__consumer_offsets`.
    GroupChanged {
        group_id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

#[derive(Debug)]
struct Member {
    id: String,
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout_ms: u64,
    rebalance_timeout_ms: u64,
    protocol_type: String,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    awaiting_join: Option<Token>,
    awaiting_sync: Option<Token>,
    session_deadline_ms: u64,
}

impl Member {
    fn metadata(&self, protocol: Option<&str>) -> Bytes {
        protocol
            .and_then(|p| self.protocols.iter().find(|(n, _)| n == p))
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }

    fn supports(&self, protocol: &str) -> bool {
        self.protocols.iter().any(|(n, _)| n == protocol)
    }

    fn update(&mut self, now_ms: u64, req: &JoinRequest) {
        self.client_id.clone_from(&req.client_id);
        self.client_host.clone_from(&req.client_host);
        self.session_timeout_ms = session_timeout(req);
        self.rebalance_timeout_ms = rebalance_timeout(req);
        self.protocol_type.clone_from(&req.protocol_type);
        self.protocols.clone_from(&req.protocols);
        self.session_deadline_ms = now_ms + self.session_timeout_ms;
    }

    /// A member waiting for a join or sync answer is not expired by its session: the rebalance
    /// timeout bounds the join wait and the pending-sync timeout bounds the sync wait (Kafka's
    /// `shouldKeepAlive`).
    fn expiry_ms(&self) -> Option<u64> {
        if self.awaiting_join.is_some() || self.awaiting_sync.is_some() {
            None
        } else {
            Some(self.session_deadline_ms)
        }
    }
}

fn session_timeout(req: &JoinRequest) -> u64 {
    u64::try_from(req.session_timeout_ms).unwrap_or(0)
}

fn rebalance_timeout(req: &JoinRequest) -> u64 {
    if req.rebalance_timeout_ms > 0 {
        u64::try_from(req.rebalance_timeout_ms).unwrap_or(0)
    } else {
        session_timeout(req)
    }
}

fn join_error(token: Token, member_id: String, error_code: ErrorCode) -> Action {
    Action::JoinResponse {
        token,
        resp: JoinResponse {
            error_code,
            generation_id: -1,
            protocol_type: None,
            protocol_name: None,
            leader: String::new(),
            member_id,
            skip_assignment: false,
            members: Vec::new(),
        },
    }
}

fn sync_error(token: Token, error_code: ErrorCode) -> Action {
    Action::SyncResponse {
        token,
        resp: SyncResponse {
            error_code,
            protocol_type: None,
            protocol_name: None,
            assignment: Bytes::new(),
        },
    }
}

/// Member ids are `{client_id}-{uuid-shaped}`. The low 64 bits are a bijection of
/// `seed + counter`, so ids never repeat within a process; the shell seeds from entropy so
/// they do not repeat across restarts either (a stale client must not match a new member).
#[derive(Debug)]
struct IdGen {
    seed: u64,
    counter: u64,
}

impl IdGen {
    fn next(&mut self, client_id: &str) -> String {
        fn mix(mut z: u64) -> u64 {
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        self.counter = self.counter.wrapping_add(1);
        let step = self.counter.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let hi = mix(self.seed.rotate_left(17) ^ step);
        let lo = mix(self.seed.wrapping_add(step));
        format!(
            "{client_id}-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xffff,
            hi & 0xffff,
            lo >> 48,
            lo & 0xffff_ffff_ffff
        )
    }
}

#[derive(Debug)]
struct Group {
    id: String,
    state: GroupState,
    state_timestamp_ms: u64,
    protocol_type: Option<String>,
    protocol_name: Option<String>,
    generation_id: i32,
    leader_id: Option<String>,
    members: BTreeMap<String, Member>,
    /// group.instance.id → current member id.
    static_members: BTreeMap<String, String>,
    /// Members told MEMBER_ID_REQUIRED, with the deadline for their re-join.
    pending_members: BTreeMap<String, u64>,
    /// Members of this generation that have not sent SyncGroup yet.
    pending_sync: BTreeSet<String>,
    sync_deadline_ms: Option<u64>,
    /// Set while PreparingRebalance.
    rebalance_deadline_ms: Option<u64>,
    /// Some while the initial-join delay runs: how much it may still be extended.
    initial_delay_remaining_ms: Option<u64>,
    new_member_added: bool,
}

impl Group {
    fn new(id: String, now_ms: u64) -> Self {
        Group {
            id,
            state: GroupState::Empty,
            state_timestamp_ms: now_ms,
            protocol_type: None,
            protocol_name: None,
            generation_id: 0,
            leader_id: None,
            members: BTreeMap::new(),
            static_members: BTreeMap::new(),
            pending_members: BTreeMap::new(),
            pending_sync: BTreeSet::new(),
            sync_deadline_ms: None,
            rebalance_deadline_ms: None,
            initial_delay_remaining_ms: None,
            new_member_added: false,
        }
    }

    fn is_unused(&self) -> bool {
        self.state == GroupState::Empty
            && self.members.is_empty()
            && self.pending_members.is_empty()
            && self.generation_id == 0
    }

    fn transition(&mut self, state: GroupState, now_ms: u64) {
        self.state = state;
        self.state_timestamp_ms = now_ms;
    }

    fn is_leader(&self, member_id: &str) -> bool {
        self.leader_id.as_deref() == Some(member_id)
    }

    fn max_rebalance_timeout_ms(&self) -> u64 {
        self.members
            .values()
            .map(|m| m.rebalance_timeout_ms)
            .max()
            .unwrap_or(0)
    }

    /// Kafka's `isStaticMemberFenced`: the instance id is registered to another member id.
    fn is_fenced(&self, member_id: &str, instance_id: Option<&str>) -> bool {
        instance_id
            .and_then(|i| self.static_members.get(i))
            .is_some_and(|current| current != member_id)
    }

    fn validate_member(&self, member_id: &str, instance_id: Option<&str>) -> Result<(), ErrorCode> {
        if self.is_fenced(member_id, instance_id) {
            Err(E::FencedInstanceId.code())
        } else if !self.members.contains_key(member_id) {
            Err(E::UnknownMemberId.code())
        } else {
            Ok(())
        }
    }

    /// Whether a member offering `protocols` could join: same protocol type and one protocol in
    /// common with every other member. `exclude` is the member being updated or replaced, whose
    /// old protocols must not veto its new ones.
    fn supports_protocols(&self, req: &JoinRequest, exclude: Option<&str>) -> bool {
        if req.protocol_type.is_empty() || req.protocols.is_empty() {
            return false;
        }
        let others = || {
            self.members
                .values()
                .filter(move |m| Some(m.id.as_str()) != exclude)
        };
        if others().next().is_none() {
            return true;
        }
        self.protocol_type.as_deref() == Some(req.protocol_type.as_str())
            && req
                .protocols
                .iter()
                .any(|(name, _)| others().all(|m| m.supports(name)))
    }

    /// Kafka's `selectProtocol`: among protocols all members support, each member votes for its
    /// most preferred; most votes wins (ties: earlier in the first member's preference).
    fn select_protocol(&self) -> Option<String> {
        let first = self.members.values().next()?;
        let candidates: Vec<&str> = first
            .protocols
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| self.members.values().all(|m| m.supports(n)))
            .collect();
        let mut votes = vec![0usize; candidates.len()];
        for m in self.members.values() {
            if let Some(i) = m
                .protocols
                .iter()
                .find_map(|(n, _)| candidates.iter().position(|c| c == n))
            {
                votes[i] += 1;
            }
        }
        let mut best: Option<usize> = None;
        for (i, v) in votes.iter().enumerate() {
            if best.is_none_or(|b| *v > votes[b]) {
                best = Some(i);
            }
        }
        best.map(|i| candidates[i].to_owned())
    }

    fn member_list(&self) -> Vec<JoinMember> {
        self.members
            .values()
            .map(|m| JoinMember {
                member_id: m.id.clone(),
                group_instance_id: m.instance_id.clone(),
                metadata: m.metadata(self.protocol_name.as_deref()),
            })
            .collect()
    }

    /// The answer to a join for the current generation; the leader's carries the member list.
    fn join_ok(&self, member_id: &str, leader: String, with_members: bool) -> JoinResponse {
        JoinResponse {
            error_code: NONE,
            generation_id: self.generation_id,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol_name.clone(),
            leader,
            member_id: member_id.to_owned(),
            skip_assignment: false,
            members: if with_members {
                self.member_list()
            } else {
                Vec::new()
            },
        }
    }

    fn join_new_member(
        &mut self,
        cfg: &GroupConfig,
        ids: &mut IdGen,
        now_ms: u64,
        token: Token,
        req: &JoinRequest,
        out: &mut Vec<Action>,
    ) -> Result<(), ErrorCode> {
        let old_static = req
            .group_instance_id
            .as_ref()
            .and_then(|i| self.static_members.get(i))
            .cloned();
        if old_static.is_none() && self.members.len() + self.pending_members.len() >= cfg.max_size {
            return Err(E::GroupMaxSizeReached.code());
        }
        if !self.supports_protocols(req, old_static.as_deref()) {
            return Err(E::InconsistentGroupProtocol.code());
        }
        let mut new_id = ids.next(&req.client_id);
        // Only a restored member from a process with the same seed could collide; bounded retry.
        for _ in 0..8 {
            if !self.members.contains_key(&new_id) && !self.pending_members.contains_key(&new_id) {
                break;
            }
            new_id = ids.next(&req.client_id);
        }
        if let Some(old_id) = old_static {
            self.join_static_member(cfg, now_ms, token, req, old_id, new_id, out);
        } else if req.group_instance_id.is_none() && req.require_known_member_id {
            // KIP-394: the id is handed out first so a client that times out and retries does
            // not leave orphan members behind.
            let deadline_ms = now_ms + session_timeout(req);
            self.pending_members.insert(new_id.clone(), deadline_ms);
            out.push(join_error(token, new_id, E::MemberIdRequired.code()));
        } else {
            self.add_member_and_rebalance(cfg, now_ms, token, req, new_id, out);
        }
        Ok(())
    }

    /// A known static member re-joins with an empty member id (a restart): its old id is fenced.
    #[allow(clippy::too_many_arguments)]
    fn join_static_member(
        &mut self,
        cfg: &GroupConfig,
        now_ms: u64,
        token: Token,
        req: &JoinRequest,
        old_id: String,
        new_id: String,
        out: &mut Vec<Action>,
    ) {
        let unchanged = self
            .members
            .get(&old_id)
            .is_some_and(|m| m.protocols == req.protocols);
        // Kafka answers with the leader id from before the replacement, so that a restarted
        // leader does not compute an assignment a Stable group would never hand out.
        let old_leader = self.leader_id.clone().unwrap_or_default();
        self.replace_member_id(&old_id, &new_id, out);
        let Some(member) = self.members.get_mut(&new_id) else {
            return;
        };
        member.update(now_ms, req);
        if self.state == GroupState::Stable
            && unchanged
            && self.select_protocol() == self.protocol_name
        {
            let resp = self.join_ok(&new_id, old_leader, false);
            out.push(Action::GroupChanged {
                group_id: self.id.clone(),
            });
            out.push(Action::JoinResponse { token, resp });
        } else {
            self.await_join_and_rebalance(cfg, now_ms, token, &new_id, out);
        }
    }

    /// Moves a static member to a new id; requests waiting under the old id are fenced.
    fn replace_member_id(&mut self, old_id: &str, new_id: &str, out: &mut Vec<Action>) {
        let Some(mut member) = self.members.remove(old_id) else {
            return;
        };
        if let Some(t) = member.awaiting_join.take() {
            out.push(join_error(t, old_id.to_owned(), E::FencedInstanceId.code()));
        }
        if let Some(t) = member.awaiting_sync.take() {
            out.push(sync_error(t, E::FencedInstanceId.code()));
        }
        member.id = new_id.to_owned();
        if let Some(instance) = &member.instance_id {
            self.static_members
                .insert(instance.clone(), new_id.to_owned());
        }
        if self.is_leader(old_id) {
            self.leader_id = Some(new_id.to_owned());
        }
        if self.pending_sync.remove(old_id) {
            self.pending_sync.insert(new_id.to_owned());
        }
        self.members.insert(new_id.to_owned(), member);
    }

    fn join_known_member(
        &mut self,
        cfg: &GroupConfig,
        now_ms: u64,
        token: Token,
        req: &JoinRequest,
        out: &mut Vec<Action>,
    ) -> Result<(), ErrorCode> {
        let id = req.member_id.as_str();
        if self.pending_members.contains_key(id) {
            if req.group_instance_id.is_some() {
                // Pending ids are only handed to dynamic members.
                return Err(E::UnknownMemberId.code());
            }
            if !self.supports_protocols(req, None) {
                return Err(E::InconsistentGroupProtocol.code());
            }
            self.pending_members.remove(id);
            self.add_member_and_rebalance(cfg, now_ms, token, req, id.to_owned(), out);
            return Ok(());
        }
        self.validate_member(id, req.group_instance_id.as_deref())?;
        if !self.supports_protocols(req, Some(id)) {
            return Err(E::InconsistentGroupProtocol.code());
        }
        let unchanged = self
            .members
            .get(id)
            .is_some_and(|m| m.protocols == req.protocols);
        let answer_now = match self.state {
            GroupState::Empty => return Err(E::UnknownMemberId.code()),
            GroupState::PreparingRebalance => false,
            // Same metadata: the member probably lost the join response; resend it.
            GroupState::CompletingRebalance => unchanged,
            // The leader re-joins to force a rebalance (e.g. its topic metadata changed).
            GroupState::Stable => unchanged && !self.is_leader(id),
        };
        if answer_now {
            if let Some(member) = self.members.get_mut(id) {
                member.session_deadline_ms = now_ms + member.session_timeout_ms;
            }
            let leader = self.leader_id.clone().unwrap_or_default();
            let with_members = self.state == GroupState::CompletingRebalance && self.is_leader(id);
            let resp = self.join_ok(id, leader, with_members);
            out.push(Action::JoinResponse { token, resp });
            return Ok(());
        }
        if let Some(member) = self.members.get_mut(id) {
            member.update(now_ms, req);
        }
        if self.members.len() == 1 {
            self.protocol_type = Some(req.protocol_type.clone());
        }
        self.await_join_and_rebalance(cfg, now_ms, token, id, out);
        Ok(())
    }

    fn add_member_and_rebalance(
        &mut self,
        cfg: &GroupConfig,
        now_ms: u64,
        token: Token,
        req: &JoinRequest,
        id: String,
        out: &mut Vec<Action>,
    ) {
        if self.state == GroupState::PreparingRebalance && self.generation_id == 0 {
            self.new_member_added = true;
        }
        if self.members.is_empty() {
            self.protocol_type = Some(req.protocol_type.clone());
        }
        if let Some(instance) = &req.group_instance_id {
            self.static_members.insert(instance.clone(), id.clone());
        }
        if self.leader_id.is_none() {
            self.leader_id = Some(id.clone());
        }
        let mut member = Member {
            id: id.clone(),
            instance_id: req.group_instance_id.clone(),
            client_id: String::new(),
            client_host: String::new(),
            session_timeout_ms: 0,
            rebalance_timeout_ms: 0,
            protocol_type: String::new(),
            protocols: Vec::new(),
            assignment: Bytes::new(),
            awaiting_join: None,
            awaiting_sync: None,
            session_deadline_ms: 0,
        };
        member.update(now_ms, req);
        self.members.insert(id.clone(), member);
        self.await_join_and_rebalance(cfg, now_ms, token, &id, out);
    }

    fn await_join_and_rebalance(
        &mut self,
        cfg: &GroupConfig,
        now_ms: u64,
        token: Token,
        id: &str,
        out: &mut Vec<Action>,
    ) {
        if let Some(member) = self.members.get_mut(id) {
            if let Some(old) = member.awaiting_join.replace(token) {
                // A duplicate join supersedes the earlier one; the earlier one must still be
                // answered so the shell does not leak it.
                out.push(join_error(
                    old,
                    id.to_owned(),
                    E::RebalanceInProgress.code(),
                ));
            }
        }
        self.maybe_prepare_rebalance(cfg, now_ms, out);
        self.maybe_complete_join(now_ms, out);
    }

    fn maybe_prepare_rebalance(&mut self, cfg: &GroupConfig, now_ms: u64, out: &mut Vec<Action>) {
        if self.state != GroupState::PreparingRebalance {
            self.prepare_rebalance(cfg, now_ms, out);
        }
    }

    fn prepare_rebalance(&mut self, cfg: &GroupConfig, now_ms: u64, out: &mut Vec<Action>) {
        if self.state == GroupState::CompletingRebalance {
            self.reset_and_propagate_sync_error(now_ms, E::RebalanceInProgress.code(), out);
        }
        self.pending_sync.clear();
        self.sync_deadline_ms = None;
        let rebalance_timeout_ms = self.max_rebalance_timeout_ms();
        if self.state == GroupState::Empty && cfg.initial_rebalance_delay_ms > 0 {
            let delay_ms = cfg.initial_rebalance_delay_ms;
            self.rebalance_deadline_ms = Some(now_ms + delay_ms);
            self.initial_delay_remaining_ms = Some(rebalance_timeout_ms.saturating_sub(delay_ms));
            self.new_member_added = false;
        } else {
            self.rebalance_deadline_ms = Some(now_ms + rebalance_timeout_ms);
            self.initial_delay_remaining_ms = None;
        }
        self.transition(GroupState::PreparingRebalance, now_ms);
    }

    fn reset_and_propagate_sync_error(
        &mut self,
        now_ms: u64,
        error: ErrorCode,
        out: &mut Vec<Action>,
    ) {
        for member in self.members.values_mut() {
            member.assignment = Bytes::new();
            if let Some(t) = member.awaiting_sync.take() {
                // The session was not checked while the member waited; it restarts now.
                member.session_deadline_ms = now_ms + member.session_timeout_ms;
                out.push(sync_error(t, error));
            }
        }
    }

    /// The join phase ends early only once every member re-joined and no MEMBER_ID_REQUIRED
    /// member is outstanding; the initial delay never ends early (Kafka's InitialDelayedJoin).
    /// With no member left there is nobody to answer, so MEMBER_ID_REQUIRED members are not
    /// waited for either: when they re-join they start a fresh rebalance.
    fn maybe_complete_join(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let all_joined = self.pending_members.is_empty()
            && self.members.values().all(|m| m.awaiting_join.is_some());
        if self.state == GroupState::PreparingRebalance
            && self.initial_delay_remaining_ms.is_none()
            && (all_joined || self.members.is_empty())
        {
            self.complete_join(now_ms, out);
        }
    }

    fn complete_join(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        // Dynamic members that did not re-join in time are gone; static ones stay (KIP-345)
        // until their session expires.
        let failed: Vec<String> = self
            .members
            .values()
            .filter(|m| m.awaiting_join.is_none() && m.instance_id.is_none())
            .map(|m| m.id.clone())
            .collect();
        for id in &failed {
            self.remove_member_quietly(id, out);
        }
        if !self.members.is_empty() {
            let leader_joined = self
                .leader_id
                .as_ref()
                .and_then(|l| self.members.get(l))
                .is_some_and(|m| m.awaiting_join.is_some());
            if !leader_joined {
                match self.members.values().find(|m| m.awaiting_join.is_some()) {
                    Some(m) => self.leader_id = Some(m.id.clone()),
                    None => {
                        // Only static members that did not re-join are left: wait another
                        // rebalance timeout for them to re-join or for their sessions to expire.
                        let wait_ms = self.max_rebalance_timeout_ms().max(1);
                        self.rebalance_deadline_ms = Some(now_ms + wait_ms);
                        self.initial_delay_remaining_ms = None;
                        return;
                    }
                }
            }
        }
        self.rebalance_deadline_ms = None;
        self.initial_delay_remaining_ms = None;
        self.new_member_added = false;
        self.generation_id = self.generation_id.wrapping_add(1).max(1);
        out.push(Action::GroupChanged {
            group_id: self.id.clone(),
        });
        if self.members.is_empty() {
            self.protocol_name = None;
            self.leader_id = None;
            self.transition(GroupState::Empty, now_ms);
            return;
        }
        self.protocol_name = self.select_protocol();
        self.transition(GroupState::CompletingRebalance, now_ms);
        self.pending_sync = self.members.keys().cloned().collect();
        self.sync_deadline_ms = Some(now_ms + self.max_rebalance_timeout_ms());
        let leader = self.leader_id.clone().unwrap_or_default();
        let mut answers = Vec::new();
        for member in self.members.values_mut() {
            member.assignment = Bytes::new();
            member.session_deadline_ms = now_ms + member.session_timeout_ms;
            if let Some(t) = member.awaiting_join.take() {
                answers.push((t, member.id.clone()));
            }
        }
        for (token, id) in answers {
            let is_leader = id == leader;
            let resp = self.join_ok(&id, leader.clone(), is_leader);
            out.push(Action::JoinResponse { token, resp });
        }
    }

    /// Removes a member and answers whatever it was waiting for; does not change the state.
    fn remove_member_quietly(&mut self, id: &str, out: &mut Vec<Action>) {
        let Some(member) = self.members.remove(id) else {
            return;
        };
        if let Some(t) = member.awaiting_join {
            out.push(join_error(t, String::new(), E::UnknownMemberId.code()));
        }
        if let Some(t) = member.awaiting_sync {
            out.push(sync_error(t, E::UnknownMemberId.code()));
        }
        if let Some(instance) = &member.instance_id {
            if self.static_members.get(instance).map(String::as_str) == Some(id) {
                self.static_members.remove(instance);
            }
        }
        self.pending_sync.remove(id);
        if self.is_leader(id) {
            self.leader_id = self
                .members
                .values()
                .find(|m| m.awaiting_join.is_some())
                .or_else(|| self.members.values().next())
                .map(|m| m.id.clone());
        }
    }

    /// Kafka's `removeMemberAndUpdateGroup`: after a leave or an expired session.
    fn remove_member(&mut self, cfg: &GroupConfig, now_ms: u64, id: &str, out: &mut Vec<Action>) {
        self.remove_member_quietly(id, out);
        match self.state {
            GroupState::Empty => {}
            GroupState::Stable | GroupState::CompletingRebalance => {
                self.prepare_rebalance(cfg, now_ms, out);
                self.maybe_complete_join(now_ms, out);
            }
            GroupState::PreparingRebalance => self.maybe_complete_join(now_ms, out),
        }
    }

    fn sync(&mut self, now_ms: u64, token: Token, req: &SyncRequest, out: &mut Vec<Action>) {
        let id = req.member_id.as_str();
        if let Err(code) = self.validate_member(id, req.group_instance_id.as_deref()) {
            return out.push(sync_error(token, code));
        }
        if req.generation_id != self.generation_id {
            return out.push(sync_error(token, E::IllegalGeneration.code()));
        }
        let type_differs = req.protocol_type.is_some() && req.protocol_type != self.protocol_type;
        let name_differs = req.protocol_name.is_some() && req.protocol_name != self.protocol_name;
        if type_differs || name_differs {
            return out.push(sync_error(token, E::InconsistentGroupProtocol.code()));
        }
        match self.state {
            GroupState::Empty => out.push(sync_error(token, E::UnknownMemberId.code())),
            GroupState::PreparingRebalance => {
                out.push(sync_error(token, E::RebalanceInProgress.code()))
            }
            GroupState::Stable => {
                self.pending_sync.remove(id);
                let Some(member) = self.members.get_mut(id) else {
                    return out.push(sync_error(token, E::UnknownMemberId.code()));
                };
                member.session_deadline_ms = now_ms + member.session_timeout_ms;
                let resp = SyncResponse {
                    error_code: NONE,
                    protocol_type: self.protocol_type.clone(),
                    protocol_name: self.protocol_name.clone(),
                    assignment: member.assignment.clone(),
                };
                out.push(Action::SyncResponse { token, resp });
            }
            GroupState::CompletingRebalance => {
                self.pending_sync.remove(id);
                let Some(member) = self.members.get_mut(id) else {
                    return out.push(sync_error(token, E::UnknownMemberId.code()));
                };
                member.session_deadline_ms = now_ms + member.session_timeout_ms;
                if let Some(old) = member.awaiting_sync.replace(token) {
                    out.push(sync_error(old, E::RebalanceInProgress.code()));
                }
                if self.is_leader(id) {
                    self.complete_sync(now_ms, &req.assignments, out);
                }
            }
        }
    }

    /// The leader's assignment arrived: store it (later duplicates of a member id win, as in
    /// Kafka's map building), answer every waiting member, and become Stable.
    fn complete_sync(
        &mut self,
        now_ms: u64,
        assignments: &[(String, Bytes)],
        out: &mut Vec<Action>,
    ) {
        let assigned: BTreeMap<&str, &Bytes> =
            assignments.iter().map(|(m, a)| (m.as_str(), a)).collect();
        for member in self.members.values_mut() {
            member.assignment = assigned
                .get(member.id.as_str())
                .map(|a| (*a).clone())
                .unwrap_or_default();
        }
        self.transition(GroupState::Stable, now_ms);
        out.push(Action::GroupChanged {
            group_id: self.id.clone(),
        });
        for member in self.members.values_mut() {
            if let Some(token) = member.awaiting_sync.take() {
                // The session was not checked while the member waited; it restarts now.
                member.session_deadline_ms = now_ms + member.session_timeout_ms;
                let resp = SyncResponse {
                    error_code: NONE,
                    protocol_type: self.protocol_type.clone(),
                    protocol_name: self.protocol_name.clone(),
                    assignment: member.assignment.clone(),
                };
                out.push(Action::SyncResponse { token, resp });
            }
        }
    }

    fn heartbeat(&mut self, now_ms: u64, req: &HeartbeatRequest) -> Result<(), ErrorCode> {
        self.validate_member(&req.member_id, req.group_instance_id.as_deref())?;
        if req.generation_id != self.generation_id {
            return Err(E::IllegalGeneration.code());
        }
        let Some(member) = self.members.get_mut(&req.member_id) else {
            return Err(E::UnknownMemberId.code());
        };
        match self.state {
            GroupState::Empty => Err(E::UnknownMemberId.code()),
            GroupState::PreparingRebalance => {
                member.session_deadline_ms = now_ms + member.session_timeout_ms;
                Err(E::RebalanceInProgress.code())
            }
            GroupState::CompletingRebalance | GroupState::Stable => {
                member.session_deadline_ms = now_ms + member.session_timeout_ms;
                Ok(())
            }
        }
    }

    fn leave_one(
        &mut self,
        cfg: &GroupConfig,
        now_ms: u64,
        leaving: &LeaveMember,
        out: &mut Vec<Action>,
    ) -> ErrorCode {
        let instance = leaving.group_instance_id.as_deref();
        let id = if leaving.member_id.is_empty() {
            match instance.and_then(|i| self.static_members.get(i)) {
                Some(id) => id.clone(),
                None => return E::UnknownMemberId.code(),
            }
        } else {
            if instance.is_none() && self.pending_members.remove(&leaving.member_id).is_some() {
                self.maybe_complete_join(now_ms, out);
                return NONE;
            }
            if let Err(code) = self.validate_member(&leaving.member_id, instance) {
                return code;
            }
            leaving.member_id.clone()
        };
        self.remove_member(cfg, now_ms, &id, out);
        NONE
    }

    fn tick(&mut self, cfg: &GroupConfig, now_ms: u64, out: &mut Vec<Action>) {
        // Each pass either fires a deadline (and sets only later ones) or stops; the bound is a
        // guard, not a expected limit.
        for _ in 0..16 {
            let mut fired = false;
            let expired_pending: Vec<String> = self
                .pending_members
                .iter()
                .filter(|(_, d)| **d <= now_ms)
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired_pending {
                self.pending_members.remove(&id);
                fired = true;
            }
            if fired {
                self.maybe_complete_join(now_ms, out);
            }
            let expired: Vec<String> = self
                .members
                .values()
                .filter(|m| m.expiry_ms().is_some_and(|d| d <= now_ms))
                .map(|m| m.id.clone())
                .collect();
            for id in expired {
                self.remove_member(cfg, now_ms, &id, out);
                fired = true;
            }
            if let Some(deadline) = self.active_sync_deadline() {
                if deadline <= now_ms {
                    self.sync_deadline_ms = None;
                    for id in std::mem::take(&mut self.pending_sync) {
                        self.remove_member(cfg, now_ms, &id, out);
                    }
                    fired = true;
                }
            }
            if self.state == GroupState::PreparingRebalance
                && self.rebalance_deadline_ms.is_some_and(|d| d <= now_ms)
            {
                fired = true;
                match self.initial_delay_remaining_ms {
                    Some(remaining_ms) if self.new_member_added && remaining_ms > 0 => {
                        let delay_ms = cfg.initial_rebalance_delay_ms.min(remaining_ms);
                        self.rebalance_deadline_ms = Some(now_ms + delay_ms);
                        self.initial_delay_remaining_ms = Some(remaining_ms - delay_ms);
                        self.new_member_added = false;
                    }
                    _ => self.complete_join(now_ms, out),
                }
            }
            if !fired {
                return;
            }
        }
    }

    fn active_sync_deadline(&self) -> Option<u64> {
        let syncing = matches!(
            self.state,
            GroupState::CompletingRebalance | GroupState::Stable
        );
        if syncing && !self.pending_sync.is_empty() {
            self.sync_deadline_ms
        } else {
            None
        }
    }

    fn next_deadline_ms(&self) -> Option<u64> {
        let rebalance = if self.state == GroupState::PreparingRebalance {
            self.rebalance_deadline_ms
        } else {
            None
        };
        let sessions = self.members.values().filter_map(Member::expiry_ms);
        let pending = self.pending_members.values().copied();
        sessions
            .chain(pending)
            .chain(rebalance)
            .chain(self.active_sync_deadline())
            .min()
    }

    fn describe(&self) -> GroupDescription {
        let stable = self.state == GroupState::Stable;
        GroupDescription {
            group_id: self.id.clone(),
            state: self.state.as_str(),
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            protocol: if stable {
                self.protocol_name.clone().unwrap_or_default()
            } else {
                String::new()
            },
            members: self
                .members
                .values()
                .map(|m| MemberDescription {
                    member_id: m.id.clone(),
                    group_instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    metadata: if stable {
                        m.metadata(self.protocol_name.as_deref())
                    } else {
                        Bytes::new()
                    },
                    assignment: if stable {
                        m.assignment.clone()
                    } else {
                        Bytes::new()
                    },
                })
                .collect(),
        }
    }
}

/// All classic groups coordinated by this shard.
#[derive(Debug)]
pub struct GroupCoordinator {
    config: GroupConfig,
    groups: BTreeMap<String, Group>,
    ids: IdGen,
}

impl Default for GroupCoordinator {
    fn default() -> Self {
        Self::new()
    }
}

impl GroupCoordinator {
    /// Default config and id seed 0; a broker should use [`GroupCoordinator::with_config`].
    pub fn new() -> Self {
        Self::with_config(GroupConfig::default(), 0)
    }

    /// `id_seed` should differ between process starts (e.g. random or the start time), so
    /// generated member ids never repeat across restarts.
    pub fn with_config(config: GroupConfig, id_seed: u64) -> Self {
        GroupCoordinator {
            config,
            groups: BTreeMap::new(),
            ids: IdGen {
                seed: id_seed,
                counter: 0,
            },
        }
    }

    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    pub fn join(&mut self, now_ms: u64, token: Token, req: JoinRequest) -> Vec<Action> {
        let mut out = Vec::new();
        if let Err(code) = self.join_inner(now_ms, token, &req, &mut out) {
            out.push(join_error(token, req.member_id, code));
        }
        out
    }

    fn join_inner(
        &mut self,
        now_ms: u64,
        token: Token,
        req: &JoinRequest,
        out: &mut Vec<Action>,
    ) -> Result<(), ErrorCode> {
        let Self {
            config,
            groups,
            ids,
        } = self;
        if req.group_id.is_empty() {
            return Err(E::InvalidGroupId.code());
        }
        if req.session_timeout_ms < config.min_session_timeout_ms
            || req.session_timeout_ms > config.max_session_timeout_ms
        {
            return Err(E::InvalidSessionTimeout.code());
        }
        let new_member = req.member_id.is_empty();
        let created = !groups.contains_key(&req.group_id);
        if created && !new_member {
            return Err(E::UnknownMemberId.code());
        }
        let group = groups
            .entry(req.group_id.clone())
            .or_insert_with(|| Group::new(req.group_id.clone(), now_ms));
        let result = if new_member {
            group.join_new_member(config, ids, now_ms, token, req, out)
        } else {
            group.join_known_member(config, now_ms, token, req, out)
        };
        // A rejected first join must not leave a phantom group behind for ListGroups.
        if created && group.is_unused() {
            groups.remove(&req.group_id);
        }
        result
    }

    pub fn sync(&mut self, now_ms: u64, token: Token, req: SyncRequest) -> Vec<Action> {
        let mut out = Vec::new();
        if req.group_id.is_empty() {
            out.push(sync_error(token, E::InvalidGroupId.code()));
        } else if let Some(group) = self.groups.get_mut(&req.group_id) {
            group.sync(now_ms, token, &req, &mut out);
        } else {
            out.push(sync_error(token, E::UnknownMemberId.code()));
        }
        out
    }

    pub fn heartbeat(&mut self, now_ms: u64, req: HeartbeatRequest) -> Result<(), ErrorCode> {
        if req.group_id.is_empty() {
            return Err(E::InvalidGroupId.code());
        }
        match self.groups.get_mut(&req.group_id) {
            Some(group) => group.heartbeat(now_ms, &req),
            None => Err(E::UnknownMemberId.code()),
        }
    }

    /// LeaveGroup (v3+ batches). Returns the top-level result, one code per leaving member (0 =
    /// NONE) and the actions the departures caused (a rebalance may complete at once).
    #[allow(clippy::type_complexity)]
    pub fn leave(
        &mut self,
        now_ms: u64,
        group_id: &str,
        members: &[LeaveMember],
    ) -> (
        Result<(), ErrorCode>,
        Vec<(LeaveMember, ErrorCode)>,
        Vec<Action>,
    ) {
        let mut out = Vec::new();
        if group_id.is_empty() {
            return (Err(E::InvalidGroupId.code()), Vec::new(), out);
        }
        let Some(group) = self.groups.get_mut(group_id) else {
            let codes = members
                .iter()
                .map(|m| (m.clone(), E::UnknownMemberId.code()))
                .collect();
            return (Ok(()), codes, out);
        };
        let codes = members
            .iter()
            .map(|m| {
                (
                    m.clone(),
                    group.leave_one(&self.config, now_ms, m, &mut out),
                )
            })
            .collect();
        (Ok(()), codes, out)
    }

    /// Expires sessions, pending MEMBER_ID_REQUIRED members and pending syncs, and completes
    /// rebalances whose deadline passed. Scans every group: O(members) per call.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let mut out = Vec::new();
        for group in self.groups.values_mut() {
            if group.next_deadline_ms().is_some_and(|d| d <= now_ms) {
                group.tick(&self.config, now_ms, &mut out);
            }
        }
        out
    }

    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.groups
            .values()
            .filter_map(Group::next_deadline_ms)
            .min()
    }

    /// Kafka's OffsetCommit checks. Does not refresh the member's session (unlike Kafka), as
    /// members heartbeat anyway. For an unknown group with a negative generation the shell
    /// should call [`GroupCoordinator::ensure_group`] before storing the offsets.
    pub fn validate_commit(
        &self,
        group_id: &str,
        generation_id: i32,
        member_id: &str,
        instance_id: Option<&str>,
    ) -> Result<(), ErrorCode> {
        if group_id.is_empty() {
            return Err(E::InvalidGroupId.code());
        }
        let Some(group) = self.groups.get(group_id) else {
            // A negative generation means the group does not use Kafka's group management.
            return if generation_id < 0 {
                Ok(())
            } else {
                Err(E::IllegalGeneration.code())
            };
        };
        if group.is_fenced(member_id, instance_id) {
            return Err(E::FencedInstanceId.code());
        }
        if generation_id < 0 && group.state == GroupState::Empty {
            return Ok(());
        }
        if !group.members.contains_key(member_id) {
            return Err(E::UnknownMemberId.code());
        }
        if generation_id != group.generation_id {
            return Err(E::IllegalGeneration.code());
        }
        if group.state == GroupState::CompletingRebalance {
            return Err(E::RebalanceInProgress.code());
        }
        Ok(())
    }

    pub fn describe(&self, group_id: &str) -> Option<GroupDescription> {
        self.groups.get(group_id).map(Group::describe)
    }

    pub fn state(&self, group_id: &str) -> Option<GroupState> {
        self.groups.get(group_id).map(|g| g.state)
    }

    /// (group id, protocol type, state name) for ListGroups.
    pub fn list(&self) -> Vec<(String, String, String)> {
        self.groups
            .values()
            .map(|g| {
                let protocol_type = g.protocol_type.clone().unwrap_or_default();
                (g.id.clone(), protocol_type, g.state.as_str().to_owned())
            })
            .collect()
    }

    /// DeleteGroups: the shell also writes tombstones for the group's offsets and metadata.
    pub fn delete(&mut self, group_id: &str) -> Result<(), ErrorCode> {
        match self.groups.get(group_id) {
            None => Err(E::GroupIdNotFound.code()),
            Some(g) if g.state != GroupState::Empty => Err(E::NonEmptyGroup.code()),
            Some(_) => {
                self.groups.remove(group_id);
                Ok(())
            }
        }
    }

    /// Forgets a group whose `__consumer_offsets` partition this coordinator no longer leads:
    /// its waiting JoinGroup and SyncGroup requests are answered NOT_COORDINATOR, so the
    /// members look the new coordinator up.
    pub fn unload(&mut self, group_id: &str) -> Vec<Action> {
        let Some(g) = self.groups.remove(group_id) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for m in g.members.into_values() {
            if let Some(t) = m.awaiting_join {
                out.push(join_error(t, m.id.clone(), E::NotCoordinator.code()));
            }
            if let Some(t) = m.awaiting_sync {
                out.push(sync_error(t, E::NotCoordinator.code()));
            }
        }
        out
    }

    /// Every group id this coordinator knows.
    pub fn group_ids(&self) -> Vec<String> {
        self.groups.keys().cloned().collect()
    }

    /// Creates an Empty group if absent (offsets loaded at startup, a simple commit).
    pub fn ensure_group(&mut self, group_id: &str) {
        if !self.groups.contains_key(group_id) {
            self.groups
                .insert(group_id.to_owned(), Group::new(group_id.to_owned(), 0));
        }
    }

    /// The group's persistent form (Kafka's GroupMetadata value v3).
    pub fn group_metadata(&self, group_id: &str) -> Option<GroupMetadataValue> {
        let g = self.groups.get(group_id)?;
        Some(GroupMetadataValue {
            protocol_type: g.protocol_type.clone().unwrap_or_default(),
            generation: g.generation_id,
            protocol: g.protocol_name.clone(),
            leader: g.leader_id.clone(),
            current_state_timestamp_ms: i64::try_from(g.state_timestamp_ms).unwrap_or(-1),
            members: g
                .members
                .values()
                .map(|m| MemberMetadataValue {
                    member_id: m.id.clone(),
                    group_instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    rebalance_timeout_ms: i32::try_from(m.rebalance_timeout_ms).unwrap_or(i32::MAX),
                    session_timeout_ms: i32::try_from(m.session_timeout_ms).unwrap_or(i32::MAX),
                    subscription: m.metadata(g.protocol_name.as_deref()),
                    assignment: m.assignment.clone(),
                })
                .collect(),
        })
    }

    /// Loads a group read back from `__consumer_offsets` (Kafka's `loadGroup`): with members it
    /// is Stable at its stored generation and every session starts now; without, Empty.
    pub fn restore(&mut self, now_ms: u64, group_id: &str, value: &GroupMetadataValue) {
        let mut g = Group::new(group_id.to_owned(), now_ms);
        g.generation_id = value.generation;
        g.protocol_type = Some(value.protocol_type.clone()).filter(|t| !t.is_empty());
        g.protocol_name = value.protocol.clone();
        for m in &value.members {
            let session_timeout_ms = u64::try_from(m.session_timeout_ms).unwrap_or(0);
            let protocol = value.protocol.clone().unwrap_or_default();
            if let Some(instance) = &m.group_instance_id {
                g.static_members
                    .insert(instance.clone(), m.member_id.clone());
            }
            g.members.insert(
                m.member_id.clone(),
                Member {
                    id: m.member_id.clone(),
                    instance_id: m.group_instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    session_timeout_ms,
                    rebalance_timeout_ms: u64::try_from(m.rebalance_timeout_ms).unwrap_or(0),
                    protocol_type: value.protocol_type.clone(),
                    protocols: vec![(protocol, m.subscription.clone())],
                    assignment: m.assignment.clone(),
                    awaiting_join: None,
                    awaiting_sync: None,
                    session_deadline_ms: now_ms + session_timeout_ms,
                },
            );
        }
        g.leader_id = value
            .leader
            .clone()
            .filter(|l| g.members.contains_key(l))
            .or_else(|| g.members.keys().next().cloned());
        if !g.members.is_empty() && g.protocol_name.is_some() {
            g.state = GroupState::Stable;
        } else {
            g.members.clear();
            g.static_members.clear();
            g.leader_id = None;
            // Empty since when it was stored, as Kafka's loadGroup keeps it: offsets expiry
            // counts from there, not from every load.
            if let Ok(at) = u64::try_from(value.current_state_timestamp_ms) {
                g.state_timestamp_ms = at.min(now_ms);
            }
        }
        self.groups.insert(group_id.to_owned(), g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: &str = "g";

    fn config(initial_rebalance_delay_ms: u64) -> GroupConfig {
        GroupConfig {
            initial_rebalance_delay_ms,
            ..GroupConfig::default()
        }
    }

    fn jreq(member_id: &str, instance: Option<&str>, meta: &'static [u8]) -> JoinRequest {
        JoinRequest {
            group_id: G.into(),
            member_id: member_id.into(),
            group_instance_id: instance.map(Into::into),
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 30_000,
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), Bytes::from_static(meta))],
            require_known_member_id: false,
        }
    }

    fn sreq(member_id: &str, generation_id: i32, assignments: &[(&str, &str)]) -> SyncRequest {
        SyncRequest {
            group_id: G.into(),
            generation_id,
            member_id: member_id.into(),
            group_instance_id: None,
            protocol_type: Some("consumer".into()),
            protocol_name: Some("range".into()),
            assignments: assignments
                .iter()
                .map(|(m, a)| (m.to_string(), Bytes::copy_from_slice(a.as_bytes())))
                .collect(),
        }
    }

    fn hb(member_id: &str, generation_id: i32) -> HeartbeatRequest {
        HeartbeatRequest {
            group_id: G.into(),
            generation_id,
            member_id: member_id.into(),
            group_instance_id: None,
        }
    }

    fn join_of(actions: &[Action], token: Token) -> JoinResponse {
        let found: Vec<&JoinResponse> = actions
            .iter()
            .filter_map(|a| match a {
                Action::JoinResponse { token: t, resp } if *t == token => Some(resp),
                _ => None,
            })
            .collect();
        assert_eq!(found.len(), 1, "join token {token} in {actions:?}");
        found[0].clone()
    }

    fn sync_of(actions: &[Action], token: Token) -> SyncResponse {
        let found: Vec<&SyncResponse> = actions
            .iter()
            .filter_map(|a| match a {
                Action::SyncResponse { token: t, resp } if *t == token => Some(resp),
                _ => None,
            })
            .collect();
        assert_eq!(found.len(), 1, "sync token {token} in {actions:?}");
        found[0].clone()
    }

    fn responses(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| !matches!(a, Action::GroupChanged { .. }))
            .count()
    }

    /// Members join at t=0 under the initial delay; the leader assigns "p{i}" to member i.
    /// Returns (coordinator, member ids in join order, leader id, generation, now).
    fn stable_group(
        instances: &[Option<&str>],
    ) -> (GroupCoordinator, Vec<String>, String, i32, u64) {
        let mut c = GroupCoordinator::with_config(config(3_000), 7);
        for (i, inst) in instances.iter().enumerate() {
            assert!(c.join(0, i as Token, jreq("", *inst, b"m")).is_empty());
        }
        let mut now = 0;
        let mut actions = Vec::new();
        while actions.is_empty() {
            now = c.next_deadline_ms().expect("rebalance deadline");
            actions = c.tick(now);
        }
        let joins: Vec<JoinResponse> = (0..instances.len())
            .map(|i| join_of(&actions, i as Token))
            .collect();
        let ids: Vec<String> = joins.iter().map(|j| j.member_id.clone()).collect();
        let leader = joins[0].leader.clone();
        let generation = joins[0].generation_id;
        let assignments: Vec<(String, String)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), format!("p{i}")))
            .collect();
        let refs: Vec<(&str, &str)> = assignments
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        for (token, id) in (100..).zip(ids.iter()) {
            let asg: &[(&str, &str)] = if *id == leader { &refs } else { &[] };
            c.sync(now, token, sreq(id, generation, asg));
        }
        assert_eq!(c.state(G), Some(GroupState::Stable));
        (c, ids, leader, generation, now)
    }

    #[test]
    fn happy_path_three_members() {
        let mut c = GroupCoordinator::with_config(config(3_000), 1);
        assert!(c.join(0, 1, jreq("", None, b"a")).is_empty());
        assert!(c.join(100, 2, jreq("", None, b"b")).is_empty());
        assert!(c.join(200, 3, jreq("", None, b"c")).is_empty());
        assert_eq!(c.state(G), Some(GroupState::PreparingRebalance));
        // New members arrived during the delay: it is extended once, then completes.
        assert_eq!(c.next_deadline_ms(), Some(3_000));
        assert!(c.tick(3_000).is_empty());
        assert_eq!(c.next_deadline_ms(), Some(6_000));
        let actions = c.tick(6_000);
        let r: Vec<JoinResponse> = (1..=3).map(|t| join_of(&actions, t)).collect();
        assert!(r
            .iter()
            .all(|j| j.error_code == NONE && j.generation_id == 1));
        assert!(r
            .iter()
            .all(|j| j.protocol_name.as_deref() == Some("range")));
        assert!(r.iter().all(|j| j.member_id.starts_with("c-")));
        let leader = r[0].leader.clone();
        assert!(r.iter().all(|j| j.leader == leader));
        for j in &r {
            if j.member_id == leader {
                assert_eq!(j.members.len(), 3);
            } else {
                assert!(j.members.is_empty());
            }
        }
        let ids: Vec<&str> = r.iter().map(|j| j.member_id.as_str()).collect();
        assert_eq!(c.state(G), Some(GroupState::CompletingRebalance));
        assert_eq!(c.heartbeat(6_100, hb(ids[1], 1)), Ok(()));
        // Followers wait for the leader.
        let followers: Vec<&str> = ids.iter().copied().filter(|m| *m != leader).collect();
        assert!(c.sync(6_100, 11, sreq(followers[0], 1, &[])).is_empty());
        assert!(c.sync(6_100, 12, sreq(followers[1], 1, &[])).is_empty());
        let asg = [(ids[0], "x"), (ids[1], "y"), (ids[2], "z")];
        let actions = c.sync(6_200, 13, sreq(&leader, 1, &asg));
        assert!(actions.contains(&Action::GroupChanged { group_id: G.into() }));
        assert_eq!(responses(&actions), 3);
        for (token, id) in [
            (11, followers[0]),
            (12, followers[1]),
            (13, leader.as_str()),
        ] {
            let want = asg.iter().find(|(m, _)| *m == id).map(|(_, a)| *a);
            let s = sync_of(&actions, token);
            assert_eq!(s.error_code, NONE);
            assert_eq!(Some(&s.assignment[..]), want.map(str::as_bytes));
        }
        assert_eq!(c.state(G), Some(GroupState::Stable));
        let d = c.describe(G).expect("group");
        assert_eq!((d.state, d.protocol.as_str()), ("Stable", "range"));
        assert_eq!(d.members.len(), 3);
        assert!(d.members.iter().all(|m| !m.assignment.is_empty()));
        assert_eq!(c.validate_commit(G, 1, ids[0], None), Ok(()));
        // A Stable follower re-joining with unchanged metadata does not rebalance.
        let k = ids.iter().position(|m| *m == followers[0]).unwrap_or(0);
        let meta: &'static [u8] = [b"a", b"b", b"c"][k];
        let a = c.join(6_300, 14, jreq(followers[0], None, meta));
        let j = join_of(&a, 14);
        assert_eq!((j.error_code, j.generation_id), (NONE, 1));
        assert_eq!(c.state(G), Some(GroupState::Stable));
    }

    #[test]
    fn member_id_required_flow() {
        let mut c = GroupCoordinator::with_config(config(0), 2);
        let mut req = jreq("", None, b"a");
        req.require_known_member_id = true;
        let j = join_of(&c.join(0, 1, req.clone()), 1);
        assert_eq!(j.error_code, E::MemberIdRequired.code());
        assert!(j.member_id.starts_with("c-"));
        assert_eq!(c.state(G), Some(GroupState::Empty));
        let mut again = req.clone();
        again.member_id = j.member_id.clone();
        let a = join_of(&c.join(10, 2, again), 2);
        assert_eq!((a.error_code, a.generation_id), (NONE, 1));
        assert_eq!(a.leader, j.member_id);
        assert_eq!(a.members.len(), 1);
        c.sync(10, 3, sreq(&a.member_id, 1, &[(&a.member_id, "all")]));
        assert_eq!(c.state(G), Some(GroupState::Stable));

        // A pending (MEMBER_ID_REQUIRED) member holds the next rebalance until it re-joins.
        let b = join_of(&c.join(20, 4, req.clone()), 4);
        assert_eq!(b.error_code, E::MemberIdRequired.code());
        assert_eq!(c.state(G), Some(GroupState::Stable));
        assert!(c.join(30, 5, jreq("", None, b"v3 client")).is_empty());
        assert_eq!(c.state(G), Some(GroupState::PreparingRebalance));
        assert!(c.join(40, 6, jreq(&a.member_id, None, b"a")).is_empty());
        let mut b_again = req.clone();
        b_again.member_id = b.member_id.clone();
        let actions = c.join(50, 7, b_again);
        assert_eq!(responses(&actions), 3);
        assert!([5, 6, 7]
            .iter()
            .all(|t| join_of(&actions, *t).generation_id == 2));

        // A pending member that never comes back expires and stops holding the group.
        let d = join_of(&c.join(60, 8, req), 8);
        assert_eq!(d.error_code, E::MemberIdRequired.code());
        assert!(c.next_deadline_ms().is_some_and(|t| t <= 60 + 10_000));
        let mut late = jreq(&d.member_id, None, b"a");
        c.tick(60 + 10_000);
        late.require_known_member_id = true;
        let e = join_of(&c.join(70_000, 9, late), 9);
        assert_eq!(e.error_code, E::UnknownMemberId.code());
    }

    #[test]
    fn session_expiry_rebalances_the_others() {
        let (mut c, ids, leader, generation, now) = stable_group(&[None, None, None]);
        // Member 0 (the leader: first to join) goes silent; the others keep heartbeating.
        assert_eq!(leader, ids[0]);
        for t in [now + 4_000, now + 8_000] {
            assert_eq!(c.heartbeat(t, hb(&ids[1], generation)), Ok(()));
            assert_eq!(c.heartbeat(t, hb(&ids[2], generation)), Ok(()));
            assert!(c.tick(t).is_empty());
        }
        let deadline = c.next_deadline_ms().expect("session deadline");
        assert_eq!(deadline, now + 10_000);
        assert!(c.tick(deadline).is_empty());
        assert_eq!(c.state(G), Some(GroupState::PreparingRebalance));
        assert_eq!(
            c.heartbeat(deadline, hb(&ids[0], generation)),
            Err(E::UnknownMemberId.code())
        );
        assert_eq!(
            c.heartbeat(deadline, hb(&ids[1], generation)),
            Err(E::RebalanceInProgress.code())
        );
        assert!(c.join(deadline, 20, jreq(&ids[1], None, b"m")).is_empty());
        let actions = c.join(deadline, 21, jreq(&ids[2], None, b"m"));
        let (a, b) = (join_of(&actions, 20), join_of(&actions, 21));
        assert_eq!(
            (a.generation_id, b.generation_id),
            (generation + 1, generation + 1)
        );
        assert_eq!(a.leader, b.leader);
        assert_ne!(a.leader, ids[0]);
        let leader_resp = if a.leader == ids[1] { &a } else { &b };
        assert_eq!(leader_resp.members.len(), 2);
    }

    #[test]
    fn rebalance_timeout_removes_members_that_do_not_rejoin() {
        let (mut c, ids, _, generation, now) = stable_group(&[None, None]);
        assert!(c
            .join(now, 30, jreq(&ids[0], None, b"new metadata"))
            .is_empty());
        assert_eq!(c.state(G), Some(GroupState::PreparingRebalance));
        // Member 1 heartbeats (so its session lives) but never re-joins.
        for t in (now..now + 30_000).step_by(5_000) {
            let _ = c.heartbeat(t, hb(&ids[1], generation));
            assert!(c.tick(t).is_empty());
        }
        let actions = c.tick(now + 30_000);
        let j = join_of(&actions, 30);
        assert_eq!((j.generation_id, j.members.len()), (generation + 1, 1));
        assert_eq!(
            c.heartbeat(now + 30_000, hb(&ids[1], generation)),
            Err(E::UnknownMemberId.code())
        );
    }

    #[test]
    fn leave_group() {
        let (mut c, ids, _, generation, now) = stable_group(&[None, None, Some("s")]);
        let leaving = [
            LeaveMember {
                member_id: ids[0].clone(),
                group_instance_id: None,
            },
            LeaveMember {
                member_id: "nobody".into(),
                group_instance_id: None,
            },
        ];
        let (top, codes, actions) = c.leave(now, G, &leaving);
        assert_eq!(top, Ok(()));
        assert_eq!(codes[0].1, NONE);
        assert_eq!(codes[1].1, E::UnknownMemberId.code());
        assert!(actions.is_empty());
        assert_eq!(c.state(G), Some(GroupState::PreparingRebalance));
        // Member 1 re-joins, then leaves while its join waits: the join is answered.
        assert!(c.join(now, 40, jreq(&ids[1], None, b"m")).is_empty());
        let one = [LeaveMember {
            member_id: ids[1].clone(),
            group_instance_id: None,
        }];
        let (_, _, actions) = c.leave(now, G, &one);
        assert_eq!(join_of(&actions, 40).error_code, E::UnknownMemberId.code());
        // The static member leaves by instance id only: the group becomes Empty.
        let by_instance = [LeaveMember {
            member_id: String::new(),
            group_instance_id: Some("s".into()),
        }];
        let (_, codes, actions) = c.leave(now, G, &by_instance);
        assert_eq!(codes[0].1, NONE);
        assert!(actions.contains(&Action::GroupChanged { group_id: G.into() }));
        assert_eq!(c.state(G), Some(GroupState::Empty));
        assert_eq!(c.describe(G).map(|d| d.members.len()), Some(0));
        assert_eq!(c.validate_commit(G, -1, "", None), Ok(()));
        assert_eq!(
            c.validate_commit(G, generation, &ids[0], None),
            Err(E::UnknownMemberId.code())
        );
        let (top, codes, _) = c.leave(now, "unknown", &one);
        assert_eq!((top, codes[0].1), (Ok(()), E::UnknownMemberId.code()));
        assert_eq!(c.leave(now, "", &one).0, Err(E::InvalidGroupId.code()));
    }

    #[test]
    fn static_member_restart_keeps_assignment_and_fences_old_id() {
        let (mut c, ids, leader, generation, now) = stable_group(&[Some("i0"), Some("i1")]);
        assert_eq!(leader, ids[0]);
        // Follower i1 restarts: new id, same generation, no rebalance.
        let actions = c.join(now + 1_000, 50, jreq("", Some("i1"), b"m"));
        assert_eq!(responses(&actions), 1);
        let j = join_of(&actions, 50);
        assert_eq!((j.error_code, j.generation_id), (NONE, generation));
        assert_ne!(j.member_id, ids[1]);
        assert_eq!(j.leader, ids[0]);
        assert!(j.members.is_empty());
        assert_eq!(c.state(G), Some(GroupState::Stable));
        let mut s = sreq(&j.member_id, generation, &[]);
        s.group_instance_id = Some("i1".into());
        let got = sync_of(&c.sync(now + 1_000, 51, s), 51);
        assert_eq!((got.error_code, &got.assignment[..]), (NONE, &b"p1"[..]));
        // The old id is fenced wherever it shows up with its instance id.
        let mut old_hb = hb(&ids[1], generation);
        old_hb.group_instance_id = Some("i1".into());
        assert_eq!(
            c.heartbeat(now + 1_000, old_hb),
            Err(E::FencedInstanceId.code())
        );
        let mut old_sync = sreq(&ids[1], generation, &[]);
        old_sync.group_instance_id = Some("i1".into());
        let f = sync_of(&c.sync(now + 1_000, 52, old_sync), 52);
        assert_eq!(f.error_code, E::FencedInstanceId.code());
        let f = join_of(
            &c.join(now + 1_000, 53, jreq(&ids[1], Some("i1"), b"m")),
            53,
        );
        assert_eq!(f.error_code, E::FencedInstanceId.code());
        assert_eq!(
            c.validate_commit(G, generation, &ids[1], Some("i1")),
            Err(E::FencedInstanceId.code())
        );
        assert_eq!(
            c.heartbeat(now + 1_000, hb(&ids[1], generation)),
            Err(E::UnknownMemberId.code())
        );
        // The leader restarts: the answer names the old leader id, so it does not assign.
        let l = join_of(&c.join(now + 2_000, 54, jreq("", Some("i0"), b"m")), 54);
        assert_eq!((l.error_code, l.generation_id), (NONE, generation));
        assert_eq!(l.leader, ids[0]);
        assert!(l.members.is_empty());
        assert_eq!(c.state(G), Some(GroupState::Stable));
        // A restart with changed metadata rebalances; the new leader is the new id.
        assert!(c
            .join(now + 3_000, 55, jreq("", Some("i1"), b"changed"))
            .is_empty());
        assert_eq!(c.state(G), Some(GroupState::PreparingRebalance));
        let actions = c.join(now + 3_000, 56, jreq(&l.member_id, Some("i0"), b"m"));
        let a = join_of(&actions, 56);
        assert_eq!(
            (a.generation_id, a.leader.as_str()),
            (generation + 1, l.member_id.as_str())
        );
        assert_eq!(a.members.len(), 2);
        assert!(a.members.iter().all(|m| m.group_instance_id.is_some()));
    }

    #[test]
    fn illegal_generation_and_unknown_member() {
        let (mut c, ids, leader, generation, now) = stable_group(&[None, None]);
        assert_eq!(
            c.heartbeat(now, hb(&ids[1], generation + 1)),
            Err(E::IllegalGeneration.code())
        );
        let s = sync_of(&c.sync(now, 60, sreq(&ids[1], generation - 1, &[])), 60);
        assert_eq!(s.error_code, E::IllegalGeneration.code());
        assert_eq!(
            c.validate_commit(G, generation + 1, &ids[1], None),
            Err(E::IllegalGeneration.code())
        );
        assert_eq!(
            c.heartbeat(now, hb("ghost", generation)),
            Err(E::UnknownMemberId.code())
        );
        let s = sync_of(&c.sync(now, 61, sreq("ghost", generation, &[])), 61);
        assert_eq!(s.error_code, E::UnknownMemberId.code());
        let j = join_of(&c.join(now, 62, jreq("ghost", None, b"m")), 62);
        assert_eq!(j.error_code, E::UnknownMemberId.code());
        // The leader re-joining forces a rebalance: sync now fails, heartbeats say so.
        assert!(c.join(now, 63, jreq(&leader, None, b"m")).is_empty());
        let s = sync_of(&c.sync(now, 64, sreq(&ids[1], generation, &[])), 64);
        assert_eq!(s.error_code, E::RebalanceInProgress.code());
        assert_eq!(
            c.heartbeat(now, hb(&ids[1], generation)),
            Err(E::RebalanceInProgress.code())
        );
        let actions = c.join(now, 65, jreq(&ids[1], None, b"m"));
        assert_eq!(join_of(&actions, 65).generation_id, generation + 1);
        // CompletingRebalance: heartbeats are fine, commits are told to wait.
        assert_eq!(c.heartbeat(now, hb(&ids[1], generation + 1)), Ok(()));
        assert_eq!(
            c.validate_commit(G, generation + 1, &ids[1], None),
            Err(E::RebalanceInProgress.code())
        );
        let s = sync_of(&c.sync(now, 66, sreq(&ids[1], generation, &[])), 66);
        assert_eq!(s.error_code, E::IllegalGeneration.code());
    }

    #[test]
    fn pending_sync_expiry_removes_silent_members() {
        let mut c = GroupCoordinator::with_config(config(0), 3);
        let a = join_of(&c.join(0, 1, jreq("", None, b"m")), 1);
        c.sync(0, 2, sreq(&a.member_id, 1, &[]));
        assert!(c.join(0, 3, jreq("", None, b"m")).is_empty());
        let actions = c.join(0, 4, jreq(&a.member_id, None, b"m"));
        let b = join_of(&actions, 3);
        // Only the leader syncs; the follower heartbeats but never syncs.
        c.sync(
            0,
            5,
            sreq(&a.member_id, 2, &[(&a.member_id, "x"), (&b.member_id, "y")]),
        );
        assert_eq!(c.state(G), Some(GroupState::Stable));
        for t in (0..30_000).step_by(3_000) {
            assert_eq!(c.heartbeat(t, hb(&b.member_id, 2)), Ok(()));
            assert_eq!(c.heartbeat(t, hb(&a.member_id, 2)), Ok(()));
            c.tick(t);
        }
        c.tick(30_000);
        assert_eq!(
            c.heartbeat(30_000, hb(&b.member_id, 2)),
            Err(E::UnknownMemberId.code())
        );
        assert_eq!(c.state(G), Some(GroupState::PreparingRebalance));
    }

    #[test]
    fn protocol_selection_and_validation() {
        let mut c = GroupCoordinator::with_config(config(0), 4);
        let with = |protocols: &[&'static str]| {
            let mut r = jreq("", None, b"m");
            r.protocols = protocols
                .iter()
                .map(|p| (p.to_string(), Bytes::from_static(p.as_bytes())))
                .collect();
            r
        };
        let a = join_of(&c.join(0, 1, with(&["range", "roundrobin"])), 1);
        assert_eq!(a.protocol_name.as_deref(), Some("range"));
        c.sync(0, 2, sreq(&a.member_id, 1, &[]));
        assert!(c.join(0, 3, with(&["roundrobin", "range"])).is_empty());
        assert!(c.join(0, 4, with(&["roundrobin"])).is_empty());
        let mut a_again = with(&["range", "roundrobin"]);
        a_again.member_id = a.member_id.clone();
        let actions = c.join(0, 5, a_again);
        let leader = join_of(&actions, 5);
        assert_eq!(leader.protocol_name.as_deref(), Some("roundrobin"));
        assert_eq!(leader.members.len(), 3);
        assert!(leader
            .members
            .iter()
            .all(|m| &m.metadata[..] == b"roundrobin"));

        let bad = join_of(&c.join(0, 6, with(&["sticky"])), 6);
        assert_eq!(bad.error_code, E::InconsistentGroupProtocol.code());
        let mut other_type = with(&["roundrobin"]);
        other_type.protocol_type = "connect".into();
        let bad = join_of(&c.join(0, 7, other_type), 7);
        assert_eq!(bad.error_code, E::InconsistentGroupProtocol.code());
        let mut short = with(&["roundrobin"]);
        short.session_timeout_ms = 1_000;
        let bad = join_of(&c.join(0, 8, short), 8);
        assert_eq!(bad.error_code, E::InvalidSessionTimeout.code());
        let mut no_group = with(&["range"]);
        no_group.group_id = String::new();
        assert_eq!(
            join_of(&c.join(0, 9, no_group), 9).error_code,
            E::InvalidGroupId.code()
        );
        let mut empty_protocols = with(&[]);
        empty_protocols.group_id = "other".into();
        let bad = join_of(&c.join(0, 10, empty_protocols), 10);
        assert_eq!(bad.error_code, E::InconsistentGroupProtocol.code());
        assert_eq!(c.list().len(), 1, "a rejected first join leaves no group");
    }

    #[test]
    fn group_max_size() {
        let mut c = GroupCoordinator::with_config(
            GroupConfig {
                max_size: 1,
                ..config(0)
            },
            5,
        );
        assert_eq!(
            join_of(&c.join(0, 1, jreq("", None, b"m")), 1).error_code,
            NONE
        );
        let full = join_of(&c.join(0, 2, jreq("", None, b"m")), 2);
        assert_eq!(full.error_code, E::GroupMaxSizeReached.code());
    }

    #[test]
    fn admin_list_delete_and_persisted_form() {
        let (mut c, ids, leader, generation, now) = stable_group(&[Some("i0"), None]);
        assert_eq!(
            c.list(),
            vec![(G.to_string(), "consumer".to_string(), "Stable".to_string())]
        );
        assert_eq!(c.delete(G), Err(E::NonEmptyGroup.code()));
        assert_eq!(c.delete("nope"), Err(E::GroupIdNotFound.code()));
        assert_eq!(c.validate_commit("simple", -1, "", None), Ok(()));
        assert_eq!(
            c.validate_commit("simple", 3, "m", None),
            Err(E::IllegalGeneration.code())
        );
        c.ensure_group("simple");
        assert_eq!(c.describe("simple").map(|d| d.state), Some("Empty"));
        assert_eq!(c.delete("simple"), Ok(()));
        assert!(c.describe("simple").is_none());

        // Persist, decode, restore on a fresh coordinator: same members and assignments.
        let value = c.group_metadata(G).expect("metadata");
        let bytes = value.encode();
        let decoded = GroupMetadataValue::decode(&bytes).expect("decodes");
        assert_eq!(decoded, value);
        let mut restored = GroupCoordinator::with_config(config(3_000), 99);
        restored.restore(now, G, &decoded);
        // An empty group keeps the time it became empty (offsets expiry counts from it).
        let empty = GroupMetadataValue {
            members: Vec::new(),
            protocol: None,
            current_state_timestamp_ms: 1_234,
            ..decoded.clone()
        };
        restored.restore(now, "was-empty", &empty);
        assert_eq!(
            restored
                .group_metadata("was-empty")
                .map(|m| m.current_state_timestamp_ms),
            Some(1_234)
        );
        assert_eq!(restored.describe(G), c.describe(G));
        assert_eq!(restored.heartbeat(now, hb(&ids[1], generation)), Ok(()));
        let s = sync_of(&restored.sync(now, 1, sreq(&leader, generation, &[])), 1);
        assert_eq!(&s.assignment[..], b"p0");
        let j = join_of(&restored.join(now, 2, jreq("", Some("i0"), b"m")), 2);
        assert_eq!((j.error_code, j.generation_id), (NONE, generation));
    }

    // ---- randomized simulation ----

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Phase {
        Out,
        Joining(Token),
        NeedSync,
        Syncing(Token),
        Member,
        Crashed { until_ms: u64 },
    }

    struct Client {
        instance: Option<String>,
        require_known: bool,
        member_id: String,
        generation: i32,
        leader: bool,
        join_members: Vec<JoinMember>,
        metadata: &'static [u8],
        phase: Phase,
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Kind {
        Join,
        Sync,
    }

    const PARTITIONS: usize = 12;

    struct Sim {
        seed: u64,
        step: usize,
        rng: Rng,
        c: GroupCoordinator,
        now: u64,
        next_token: Token,
        clients: Vec<Client>,
        /// token → (client, kind, generation and member id the request carried)
        outstanding: BTreeMap<Token, (usize, Kind, i32, String)>,
        /// generation → owner key → assignment the leader sent (first accepted one).
        stored: BTreeMap<i32, BTreeMap<String, Bytes>>,
        /// (generation, partition) → owner key that was told it owns it.
        owners: BTreeMap<(i32, usize), String>,
        successes: usize,
        /// error code → how many join/sync/heartbeat answers carried it (coverage check).
        codes: BTreeMap<ErrorCode, usize>,
        /// No crashes, leaves or metadata changes: used to check the group converges.
        healthy: bool,
        /// Committed offsets, fed as the shell feeds them: after the checks pass and the
        /// commit is stored.
        offsets: crate::group::offsets::CommittedOffsets,
        /// partition → the offset OffsetFetch must report.
        expected: BTreeMap<i32, i64>,
        /// (generation, partition) → owner key whose commit of it was accepted.
        committers: BTreeMap<(i32, usize), String>,
        commit_seq: i64,
        /// OffsetCommit answers by error code.
        commit_codes: BTreeMap<ErrorCode, usize>,
    }

    impl Sim {
        fn new(seed: u64) -> Self {
            let mut rng = Rng(seed.max(1));
            let delay = if rng.chance(50) { 0 } else { 3_000 };
            let clients = (0..6)
                .map(|i| Client {
                    instance: (i % 2 == 0).then(|| format!("inst-{i}")),
                    require_known: rng.chance(50),
                    member_id: String::new(),
                    generation: -1,
                    leader: false,
                    join_members: Vec::new(),
                    metadata: b"v1",
                    phase: Phase::Out,
                })
                .collect();
            Sim {
                seed,
                step: 0,
                rng,
                c: GroupCoordinator::with_config(config(delay), seed),
                now: 0,
                next_token: 1,
                clients,
                outstanding: BTreeMap::new(),
                stored: BTreeMap::new(),
                owners: BTreeMap::new(),
                successes: 0,
                codes: BTreeMap::new(),
                healthy: false,
                offsets: Default::default(),
                expected: BTreeMap::new(),
                committers: BTreeMap::new(),
                commit_seq: 0,
                commit_codes: BTreeMap::new(),
            }
        }

        fn ctx(&self) -> String {
            format!("seed {} step {} now {}", self.seed, self.step, self.now)
        }

        fn token(&mut self) -> Token {
            self.next_token += 1;
            self.next_token
        }

        fn generation(&self) -> i32 {
            self.c.group_metadata(G).map_or(-1, |g| g.generation)
        }

        fn is_member(&self, id: &str) -> bool {
            self.c
                .groups
                .get(G)
                .is_some_and(|g| g.members.contains_key(id))
        }

        fn act(&mut self, i: usize) {
            let phase = self.clients[i].phase.clone();
            match phase {
                Phase::Out => {
                    let cl = &self.clients[i];
                    let mut req = jreq(&cl.member_id, cl.instance.as_deref(), cl.metadata);
                    req.require_known_member_id = cl.require_known;
                    req.client_id = format!("client{i}");
                    req.session_timeout_ms = 6_000 + 1_000 * (i as i32);
                    req.rebalance_timeout_ms = 8_000 + 2_000 * (i as i32);
                    let (member_id, token) = (req.member_id.clone(), self.token());
                    self.outstanding
                        .insert(token, (i, Kind::Join, -1, member_id));
                    self.clients[i].phase = Phase::Joining(token);
                    let actions = self.c.join(self.now, token, req);
                    self.handle(actions, None);
                }
                Phase::NeedSync => {
                    let cl = &self.clients[i];
                    let mut assignments = Vec::new();
                    let mut by_owner = BTreeMap::new();
                    if cl.leader {
                        let n = cl.join_members.len();
                        for (k, m) in cl.join_members.iter().enumerate() {
                            let parts: Vec<String> = (0..PARTITIONS)
                                .filter(|p| p % n == k)
                                .map(|p| p.to_string())
                                .collect();
                            let bytes = Bytes::from(parts.join(","));
                            let owner = m.group_instance_id.clone().unwrap_or(m.member_id.clone());
                            by_owner.insert(owner, bytes.clone());
                            assignments.push((m.member_id.clone(), bytes));
                        }
                    }
                    let req = SyncRequest {
                        group_id: G.into(),
                        generation_id: cl.generation,
                        member_id: cl.member_id.clone(),
                        group_instance_id: cl.instance.clone(),
                        protocol_type: Some("consumer".into()),
                        protocol_name: Some("range".into()),
                        assignments,
                    };
                    let generation = cl.generation;
                    let leader = cl.leader.then_some(by_owner);
                    let token = self.token();
                    self.outstanding
                        .insert(token, (i, Kind::Sync, generation, req.member_id.clone()));
                    self.clients[i].phase = Phase::Syncing(token);
                    let actions = self.c.sync(self.now, token, req);
                    self.handle(actions, leader.map(|m| (token, generation, m)));
                }
                Phase::Member if self.healthy => self.heartbeat(i, true),
                Phase::Joining(_) | Phase::Syncing(_) if self.healthy => {}
                Phase::Member | Phase::Joining(_) | Phase::Syncing(_) => {
                    let roll = self.rng.below(100);
                    if roll < 4 {
                        // Crash: silence, then a restart with no memory but the instance id.
                        let until_ms = self.now + self.rng.below(40_000);
                        self.clients[i].phase = Phase::Crashed { until_ms };
                    } else if phase != Phase::Member {
                        if roll < 30 {
                            self.heartbeat(i, false);
                        } else if roll < 40 {
                            // Consumers commit what they read while they rejoin (librdkafka
                            // in its revoke callback), with the generation they had.
                            self.commit(i);
                        }
                    } else if roll < 8 {
                        let cl = &self.clients[i];
                        let leaving = [LeaveMember {
                            member_id: cl.member_id.clone(),
                            group_instance_id: cl.instance.clone(),
                        }];
                        let (_, _, actions) = self.c.leave(self.now, G, &leaving);
                        self.clients[i].member_id.clear();
                        self.clients[i].phase = Phase::Out;
                        self.handle(actions, None);
                    } else if roll < 12 {
                        let cl = &mut self.clients[i];
                        cl.metadata = if cl.metadata == b"v1" { b"v2" } else { b"v1" };
                        cl.phase = Phase::Out;
                        self.act(i);
                    } else if roll < 80 {
                        self.heartbeat(i, true);
                    } else if roll < 92 {
                        self.commit(i);
                    }
                }
                Phase::Crashed { until_ms } => {
                    if self.now >= until_ms || self.healthy {
                        let cl = &mut self.clients[i];
                        cl.member_id.clear();
                        cl.generation = -1;
                        cl.phase = Phase::Out;
                    }
                }
            }
        }

        /// OffsetCommit of the partitions the client was given in its generation, as a consumer
        /// commits what it read: accepted only from a current member of the current
        /// generation, so no two members commit one partition in a generation, and OffsetFetch
        /// then reports the last accepted commit of every partition.
        fn commit(&mut self, i: usize) {
            let cl = &self.clients[i];
            let key = cl.instance.clone().unwrap_or_else(|| cl.member_id.clone());
            let mine: Vec<usize> = self
                .owners
                .iter()
                .filter(|((g, _), o)| *g == cl.generation && **o == key)
                .map(|((_, p), _)| *p)
                .collect();
            let r = self
                .c
                .validate_commit(G, cl.generation, &cl.member_id, cl.instance.as_deref());
            *self
                .commit_codes
                .entry(r.err().unwrap_or(NONE))
                .or_default() += 1;
            if r.is_err() {
                return;
            }
            let ctx = self.ctx();
            assert_eq!(
                cl.generation,
                self.generation(),
                "{ctx}: a commit of an old generation was accepted"
            );
            assert!(
                self.is_member(&cl.member_id),
                "{ctx}: a non-member committed"
            );
            for p in &mine {
                let prev = self.committers.insert((cl.generation, *p), key.clone());
                assert!(
                    prev.is_none_or(|k| k == key),
                    "{ctx}: two members committed partition {p} in generation {}",
                    cl.generation
                );
            }
            self.commit_seq += 1;
            let commits = mine
                .iter()
                .map(|p| {
                    let v = crate::group::records::OffsetValue {
                        offset: self.commit_seq,
                        leader_epoch: -1,
                        metadata: String::new(),
                        commit_timestamp_ms: self.now as i64,
                    };
                    ("t".to_string(), *p as i32, v)
                })
                .collect();
            self.offsets.stored(G, commits);
            for p in mine {
                self.expected.insert(p as i32, self.commit_seq);
            }
            let all: Vec<i32> = (0..PARTITIONS as i32).collect();
            let fetched = self.offsets.fetch(G, Some(vec![("t".into(), all)]));
            for row in &fetched[0].1 {
                let want = self.expected.get(&row.partition).copied().unwrap_or(-1);
                assert_eq!(row.offset, want, "{ctx}: partition {}", row.partition);
            }
        }

        fn heartbeat(&mut self, i: usize, apply: bool) {
            let cl = &self.clients[i];
            let req = HeartbeatRequest {
                group_id: G.into(),
                generation_id: cl.generation,
                member_id: cl.member_id.clone(),
                group_instance_id: cl.instance.clone(),
            };
            let result = self.c.heartbeat(self.now, req);
            *self.codes.entry(result.err().unwrap_or(NONE)).or_default() += 1;
            if result.is_ok() {
                assert!(
                    self.is_member(&cl.member_id),
                    "{}: dead member heartbeat ok",
                    self.ctx()
                );
                self.successes += 1;
            }
            if !apply {
                return;
            }
            let cl = &mut self.clients[i];
            match result {
                Ok(()) => {}
                Err(code)
                    if code == E::UnknownMemberId.code() || code == E::FencedInstanceId.code() =>
                {
                    cl.member_id.clear();
                    cl.phase = Phase::Out;
                }
                Err(_) => cl.phase = Phase::Out,
            }
        }

        fn handle(
            &mut self,
            actions: Vec<Action>,
            leader_sync: Option<(Token, i32, BTreeMap<String, Bytes>)>,
        ) {
            let ctx = self.ctx();
            if let Some((token, generation, map)) = leader_sync {
                let accepted = actions.iter().any(|a| {
                    matches!(a, Action::SyncResponse { token: t, resp } if *t == token && resp.error_code == NONE)
                });
                if accepted {
                    self.stored.entry(generation).or_insert(map);
                }
            }
            let current = self.generation();
            for action in actions {
                match action {
                    Action::GroupChanged { .. } => {}
                    Action::JoinResponse { token, resp } => {
                        let (i, kind, _, _) =
                            self.outstanding.remove(&token).unwrap_or_else(|| {
                                panic!("{ctx}: join token {token} unknown or answered twice")
                            });
                        assert_eq!(kind, Kind::Join, "{ctx}");
                        *self.codes.entry(resp.error_code).or_default() += 1;
                        if resp.error_code == NONE {
                            self.successes += 1;
                            assert_eq!(resp.generation_id, current, "{ctx}: stale generation");
                            assert!(
                                self.is_member(&resp.member_id),
                                "{ctx}: join ok for non-member"
                            );
                            let mut seen = BTreeSet::new();
                            for m in &resp.members {
                                assert!(
                                    seen.insert(m.member_id.clone()),
                                    "{ctx}: duplicate member"
                                );
                                if let Some(inst) = &m.group_instance_id {
                                    assert!(seen.insert(inst.clone()), "{ctx}: duplicate instance");
                                }
                            }
                            if resp.leader == resp.member_id {
                                assert!(!resp.members.is_empty(), "{ctx}: leader without members");
                            }
                        }
                        if self.clients[i].phase != Phase::Joining(token) {
                            continue;
                        }
                        let cl = &mut self.clients[i];
                        match resp.error_code {
                            NONE => {
                                cl.member_id = resp.member_id.clone();
                                cl.generation = resp.generation_id;
                                cl.leader = resp.leader == resp.member_id;
                                cl.join_members = resp.members;
                                cl.phase = Phase::NeedSync;
                            }
                            code if code == E::MemberIdRequired.code() => {
                                cl.member_id = resp.member_id;
                                cl.phase = Phase::Out;
                            }
                            code if code == E::UnknownMemberId.code()
                                || code == E::FencedInstanceId.code() =>
                            {
                                cl.member_id.clear();
                                cl.phase = Phase::Out;
                            }
                            _ => cl.phase = Phase::Out,
                        }
                    }
                    Action::SyncResponse { token, resp } => {
                        let (i, kind, generation, member_id) =
                            self.outstanding.remove(&token).unwrap_or_else(|| {
                                panic!("{ctx}: sync token {token} unknown or answered twice")
                            });
                        assert_eq!(kind, Kind::Sync, "{ctx}");
                        *self.codes.entry(resp.error_code).or_default() += 1;
                        if resp.error_code == NONE {
                            self.successes += 1;
                            assert_eq!(generation, current, "{ctx}: sync ok for old generation");
                            assert!(self.is_member(&member_id), "{ctx}: sync ok for non-member");
                            let owner = match &self.clients[i].instance {
                                Some(inst) => inst.clone(),
                                None => member_id.clone(),
                            };
                            let stored = self.stored.get(&generation).unwrap_or_else(|| {
                                panic!("{ctx}: sync ok before leader's assignment")
                            });
                            let want = stored.get(&owner).cloned().unwrap_or_default();
                            assert_eq!(
                                resp.assignment, want,
                                "{ctx}: assignment differs from leader's"
                            );
                            let text = std::str::from_utf8(&resp.assignment).unwrap_or("");
                            for p in text.split(',').filter(|p| !p.is_empty()) {
                                let p: usize = p.parse().unwrap_or(usize::MAX);
                                let prev =
                                    self.owners.entry((generation, p)).or_insert(owner.clone());
                                assert_eq!(*prev, owner, "{ctx}: partition {p} owned twice");
                            }
                        }
                        if self.clients[i].phase != Phase::Syncing(token) {
                            continue;
                        }
                        let cl = &mut self.clients[i];
                        match resp.error_code {
                            NONE => cl.phase = Phase::Member,
                            code if code == E::UnknownMemberId.code()
                                || code == E::FencedInstanceId.code() =>
                            {
                                cl.member_id.clear();
                                cl.phase = Phase::Out;
                            }
                            _ => cl.phase = Phase::Out,
                        }
                    }
                }
            }
            self.check_group();
        }

        fn check_group(&self) {
            let ctx = self.ctx();
            let Some(g) = self.c.groups.get(G) else {
                return;
            };
            for (id, m) in &g.members {
                assert_eq!(*id, m.id, "{ctx}");
                assert!(
                    !g.pending_members.contains_key(id),
                    "{ctx}: member also pending"
                );
                if let Some(inst) = &m.instance_id {
                    assert_eq!(g.static_members.get(inst), Some(id), "{ctx}: static map");
                }
                if m.awaiting_join.is_some() {
                    assert_eq!(g.state, GroupState::PreparingRebalance, "{ctx}");
                }
                if m.awaiting_sync.is_some() {
                    assert_eq!(g.state, GroupState::CompletingRebalance, "{ctx}");
                }
            }
            for (inst, id) in &g.static_members {
                let m = g.members.get(id);
                assert!(
                    m.is_some_and(|m| m.instance_id.as_ref() == Some(inst)),
                    "{ctx}"
                );
            }
            match g.state {
                GroupState::Empty => assert!(g.members.is_empty(), "{ctx}"),
                GroupState::PreparingRebalance => {
                    assert!(g.rebalance_deadline_ms.is_some(), "{ctx}")
                }
                GroupState::CompletingRebalance | GroupState::Stable => {
                    assert!(!g.members.is_empty() && g.protocol_name.is_some(), "{ctx}")
                }
            }
            if !g.members.is_empty() {
                let leader = g.leader_id.as_ref().and_then(|l| g.members.get(l));
                assert!(leader.is_some(), "{ctx}: leader is not a member");
            }
            if let Some(d) = self.c.next_deadline_ms() {
                assert!(
                    d > self.now,
                    "{ctx}: tick left an expired deadline {d} {g:#?}"
                );
            }
        }

        fn run(&mut self, steps: usize) {
            for step in 0..steps {
                self.step = step;
                self.now += self.rng.below(1_500);
                let actions = self.c.tick(self.now);
                self.handle(actions, None);
                let i = self.rng.below(self.clients.len() as u64) as usize;
                self.act(i);
            }
            // Liveness: once every client behaves, the group settles with all of them.
            self.healthy = true;
            for _ in 0..2_000 {
                self.now += self.rng.below(300);
                let actions = self.c.tick(self.now);
                self.handle(actions, None);
                for i in 0..self.clients.len() {
                    self.act(i);
                }
            }
            let ctx = self.ctx();
            assert_eq!(
                self.c.state(G),
                Some(GroupState::Stable),
                "{ctx}: did not settle"
            );
            for cl in &self.clients {
                assert_eq!(cl.phase, Phase::Member, "{ctx}: client did not settle");
                assert!(self.is_member(&cl.member_id), "{ctx}");
            }
            assert_eq!(
                self.c.describe(G).map(|d| d.members.len()),
                Some(6),
                "{ctx}"
            );
            // Everyone falls silent: every pending request must still be answered, and the
            // group must drain to Empty.
            for _ in 0..1_000 {
                let Some(d) = self.c.next_deadline_ms() else {
                    break;
                };
                self.now = d;
                let actions = self.c.tick(d);
                self.handle(actions, None);
            }
            let ctx = self.ctx();
            assert!(
                self.outstanding.is_empty(),
                "{ctx}: unanswered {:?}",
                self.outstanding
            );
            assert_eq!(self.c.state(G), Some(GroupState::Empty), "{ctx}");
        }
    }

    #[test]
    fn randomized_simulation() {
        let base: u64 = std::env::var("GROUP_SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5EED_2024);
        let mut total_successes = 0;
        let mut generations = 0;
        let mut codes: BTreeMap<ErrorCode, usize> = BTreeMap::new();
        let mut commit_codes: BTreeMap<ErrorCode, usize> = BTreeMap::new();
        let runs: u64 = std::env::var("GROUP_SIM_RUNS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(40);
        for k in 0..runs {
            let seed = base.wrapping_add(k);
            println!("group simulation seed {seed} (GROUP_SIM_SEED={base} replays the run)");
            let mut sim = Sim::new(seed);
            sim.run(3_000);
            total_successes += sim.successes;
            generations += sim.stored.len();
            for (code, n) in sim.codes {
                *codes.entry(code).or_default() += n;
            }
            for (code, n) in sim.commit_codes {
                *commit_codes.entry(code).or_default() += n;
            }
        }
        println!("answers by error code: {codes:?}");
        println!("offset commits by error code: {commit_codes:?}");
        // Commits are accepted, and refused to members of old generations and non-members.
        for code in [NONE, E::IllegalGeneration.code(), E::UnknownMemberId.code()] {
            assert!(
                commit_codes.get(&code).is_some_and(|n| *n > 10),
                "commits answered {code}: {commit_codes:?}"
            );
        }
        let interesting = [
            E::MemberIdRequired.code(),
            E::FencedInstanceId.code(),
            E::RebalanceInProgress.code(),
            E::UnknownMemberId.code(),
            E::IllegalGeneration.code(),
        ];
        for code in interesting {
            assert!(
                codes.contains_key(&code),
                "the simulation never produced error {code}"
            );
        }
        // The schedule must actually exercise the protocol, not just fail everything.
        assert!(total_successes > 10_000, "{total_successes}");
        assert!(generations > 200, "{generations}");
    }
}
