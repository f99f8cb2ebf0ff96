//! KeyPackages of other domains' users (issue 15, step 3): a device adding `bob@b.example` to
//! a conversation needs one KeyPackage of each of his devices, and only b.example's gateway
//! holds them.
//!
//! - **Asking** (the device's gateway): a `KeyPackageFetch` naming a peer domain is charged to
//!   the device as any fetch is, then goes to that peer as an
//!   [`Entry::KeyPackageRequest`](crate::federation::entry::Entry::KeyPackageRequest) under a
//!   random id; the peer's answer comes back by that id and is passed to the device in the
//!   fetch's usual `KeyPackages` answer (or as a refusal the device retries on). A domain this
//!   gateway does not federate with is refused (`unknown_domain`), and so is one whose link is
//!   down (`peer_unreachable`, with a hint): a request queued behind a partition would take
//!   the peer's one-time packages for a device that has long given up. Requests wait in memory
//!   for [`FOREIGN_FETCH_TIMEOUT`] at most (the node asks again after its own timeout), at
//!   most [`PENDING_PER_PEER_MAX`] per peer.
//! - **Answering** (the users' gateway): each peer is charged per request
//!   ([`PEER_FETCH_RATE`]): a peer that does not limit its devices must not drain this
//!   domain's pools. Users who blocked the requester are not handed out, as at home; one
//!   answer carries at most [`FETCH_DEVICES_MAX`] packages.
//!
//! Only ids cross: a user id is the hash of the whole address, so the users named are either
//! this domain's or nobody's here (a user unknown here has no device, and no package).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::federation::entry::{
    FetchAnswer, ForeignPackage, FETCHED_PACKAGE_BYTES_MAX, FETCH_DEVICES_MAX, FETCH_USERS_MAX,
};
use crate::gateway::limits::{Bucket, Limited, Rate};
use crate::ids::{ConnectionId, DeviceId, UserId};
use crate::planted::PlantedBug;
use crate::time::Instant;
use crate::wire::payload::{ErrorCode, FetchedKeyPackage, KeyPackages};
use crate::wire::Routing;

use super::{owner_of, Gateway, Refusal};
use crate::federation::entry::Entry;
use crate::wire::payload::{KeyPackageFetch, Payload};

/// How long an asked peer's answer is waited for; a later one is dropped (counted).
pub const FOREIGN_FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Most requests waiting for one peer's answers at once; past them, devices are told to wait.
pub const PENDING_PER_PEER_MAX: usize = 256;
/// What a device refused with `peer_unreachable` (or past the pending cap) is told to wait.
pub const PEER_UNREACHABLE_RETRY: Duration = Duration::from_secs(10);
/// Requests one peer gateway may make of this one, all its devices together: far above what
/// people starting conversations need, low enough that one peer cannot empty every pool here.
pub const PEER_FETCH_RATE: Rate = Rate {
    count: 20,
    period: Duration::from_secs(1),
    burst: 200,
};

/// Counters of KeyPackage fetches across domains, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ForeignFetchStats {
    /// Devices' fetches sent on to a peer gateway.
    pub asked: u64,
    /// Peer answers passed on to the asking device.
    pub answered: u64,
    /// Peer answers that came after their request was given up (or after a restart), or
    /// that named no request of that peer: dropped.
    pub answers_unmatched: u64,
    /// Peer answers whose device's session had ended when they came: dropped (the node asks
    /// again on its next session).
    pub answers_dropped: u64,
    /// Packages in peer answers for users the request did not name: dropped.
    pub packages_unasked: u64,
    /// Fetches refused: the domain is no peer of this gateway.
    pub unknown_domain: u64,
    /// Fetches refused: the peer's link was down, or too many requests waited for it.
    pub peer_unreachable: u64,
    /// Peer requests this gateway answered with packages (as the users' gateway).
    pub requests_taken: u64,
    /// Peer requests this gateway refused by its limit per peer.
    pub requests_limited: u64,
    /// Packages handed to peer gateways.
    pub packages_given: u64,
}

/// The devices of other domains this gateway learned of from their gateways' KeyPackage
/// answers: key the device (16), value its user (16) and its domain. The domain's own
/// gateway is the authority on which user a device of its domain belongs to, so what it said
/// is what this gateway checks commits adding the device against (the adding device checks
/// the device's certificate itself).
pub const FOREIGN_DEVICES_TABLE: Table = Table("foreign_devices");

/// A device's fetch waiting for a peer's answer.
#[derive(Clone, Debug)]
struct Pending {
    peer: String,
    conn: ConnectionId,
    device: DeviceId,
    /// The device's id of its fetch (the header's seq), which its answer carries back.
    fetch: u64,
    users: Vec<UserId>,
    asked: Instant,
}

/// A peer's answer, ready for the device that asked.
#[derive(Debug)]
pub struct ForDevice {
    /// The connection the fetch came on.
    pub conn: ConnectionId,
    /// The device that asked (the answer goes only to its session on `conn`).
    pub device: DeviceId,
    /// The packages, or the refusal.
    pub answer: Result<(Routing, KeyPackages), Refusal>,
}

/// Fetches of other domains' KeyPackages, at both ends (see the module docs).
#[derive(Clone, Debug)]
pub struct ForeignFetches {
    pending: BTreeMap<u64, Pending>,
    peer_requests: Bucket<String>,
    /// Other domains' devices, by what their gateway said (see [`FOREIGN_DEVICES_TABLE`]).
    devices: BTreeMap<DeviceId, (UserId, String)>,
    stats: ForeignFetchStats,
}

impl Default for ForeignFetches {
    fn default() -> Self {
        ForeignFetches {
            pending: BTreeMap::new(),
            peer_requests: Bucket::new(PEER_FETCH_RATE),
            devices: BTreeMap::new(),
            stats: ForeignFetchStats::default(),
        }
    }
}

impl ForeignFetches {
    /// Reads the other domains' devices back from `store`.
    pub fn recover(store: &dyn StoreRead) -> Result<ForeignFetches, StoreError> {
        let mut fetches = ForeignFetches::default();
        scan_all(store, FOREIGN_DEVICES_TABLE, |key, value| {
            let damaged = || {
                StoreError::Damaged(
                    "a row of foreign_devices is not a device, a user and a domain".into(),
                )
            };
            let device = DeviceId::from_bytes(key.try_into().map_err(|_| damaged())?);
            let (user, domain) = value.split_at_checked(16).ok_or_else(damaged)?;
            let user = UserId::from_bytes(user.try_into().map_err(|_| damaged())?);
            let domain = core::str::from_utf8(domain)
                .ok()
                .filter(|d| crate::trust::valid_domain(d))
                .ok_or_else(damaged)?;
            fetches.devices.insert(device, (user, domain.to_string()));
            Ok(())
        })?;
        Ok(fetches)
    }

    /// Keeps what `domain`'s gateway said of one of its devices: it belongs to `user`.
    pub fn learn(&mut self, device: DeviceId, user: UserId, domain: &str, writes: &mut WriteBatch) {
        let known = self.devices.get(&device);
        if known.is_none_or(|(u, d)| *u != user || d != domain) {
            let mut value = user.to_bytes().to_vec();
            value.extend_from_slice(domain.as_bytes());
            writes.put(FOREIGN_DEVICES_TABLE, device.to_bytes().to_vec(), value);
            self.devices.insert(device, (user, domain.to_string()));
        }
    }

    /// The user and domain of another domain's device, as its gateway said.
    pub fn foreign_device(&self, device: DeviceId) -> Option<(UserId, &str)> {
        self.devices
            .get(&device)
            .map(|(user, domain)| (*user, domain.as_str()))
    }

    /// Counters.
    pub fn stats(&self) -> ForeignFetchStats {
        self.stats
    }

    /// Requests waiting for an answer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Asking end: whether `device`'s fetch `fetch` of `users` of `domain` may go to that
    /// domain's gateway now; `peer` is whether this gateway federates with it, `up` whether
    /// its link is up. On success the request's id (fresh, from `id`) is returned, to go in
    /// the request entry.
    #[allow(clippy::too_many_arguments)]
    pub fn ask(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        fetch: u64,
        domain: &str,
        users: Vec<UserId>,
        peer: bool,
        up: bool,
        id: u64,
    ) -> Result<(), Refusal> {
        let routing = Routing {
            seq: fetch,
            ..Routing::default()
        };
        if !peer {
            self.stats.unknown_domain += 1;
            return Err(Refusal::error(
                ErrorCode::UnknownDomain,
                format!(
                    "this gateway does not federate with {domain}: its operator lists the \
                     domains it does in [[federation.peer]]"
                ),
            )
            .in_conversation(routing));
        }
        debug_assert!(
            users.len() <= FETCH_USERS_MAX,
            "bounded by the frame's decoder"
        );
        let waiting = self.pending.values().filter(|p| p.peer == domain).count();
        if !up || waiting >= PENDING_PER_PEER_MAX {
            self.stats.peer_unreachable += 1;
            let why = if up {
                "has not answered the requests waiting for it"
            } else {
                "is not reachable now"
            };
            return Err(Refusal::error(
                ErrorCode::PeerUnreachable,
                format!("the gateway of {domain} {why}: try again later"),
            )
            .in_conversation(routing)
            .retry_after(PEER_UNREACHABLE_RETRY));
        }
        debug_assert!(!self.pending.contains_key(&id), "ids are random");
        self.pending.insert(
            id,
            Pending {
                peer: domain.to_string(),
                conn,
                device,
                fetch,
                users,
                asked: now,
            },
        );
        self.stats.asked += 1;
        Ok(())
    }

    /// Asking end: `peer` answered request `id`; what goes to the device, if its request
    /// still waits. Packages for users the request did not name are dropped; the devices of
    /// the others are remembered as `peer`'s (in `writes`), unless `local` says a device is
    /// this gateway's own.
    pub fn answered(
        &mut self,
        peer: &str,
        id: u64,
        answer: FetchAnswer,
        local: &dyn Fn(DeviceId) -> bool,
        writes: &mut WriteBatch,
    ) -> Option<ForDevice> {
        if self.pending.get(&id).is_none_or(|p| p.peer != peer) {
            self.stats.answers_unmatched += 1;
            return None;
        }
        let pending = self.pending.remove(&id).expect("checked above");
        self.stats.answered += 1;
        let routing = Routing {
            seq: pending.fetch,
            ..Routing::default()
        };
        let answer = match answer {
            FetchAnswer::Found {
                packages,
                exhausted,
            } => {
                let mut found = Vec::with_capacity(packages.len());
                for p in packages {
                    if !pending.users.contains(&p.user) || local(p.device) {
                        self.stats.packages_unasked += 1;
                        continue;
                    }
                    self.learn(p.device, p.user, peer, writes);
                    found.push(FetchedKeyPackage {
                        user: p.user.to_bytes().into(),
                        device: p.device.to_bytes().into(),
                        package: p.package.to_vec().into(),
                        last_resort: p.last_resort,
                    });
                }
                let exhausted = exhausted.iter().map(|d| d.to_bytes().into()).collect();
                Ok((routing, KeyPackages { found, exhausted }))
            }
            FetchAnswer::Limited { retry_after_ms } => Err(Refusal::error(
                ErrorCode::PeerLimited,
                format!("the gateway of {peer} takes no more KeyPackage requests from here now"),
            )
            .in_conversation(routing)
            .retry_after(Duration::from_millis(u64::from(retry_after_ms)))),
        };
        Some(ForDevice {
            conn: pending.conn,
            device: pending.device,
            answer,
        })
    }

    /// Asking end: forgets requests waiting longer than [`FOREIGN_FETCH_TIMEOUT`], and those
    /// whose device's session on their connection ended (`open` says whether it is still
    /// there).
    pub fn forget_stale(&mut self, now: Instant, open: &dyn Fn(ConnectionId, DeviceId) -> bool) {
        self.pending.retain(|_, p| {
            now.saturating_since(p.asked) < FOREIGN_FETCH_TIMEOUT && open(p.conn, p.device)
        });
    }

    /// When the oldest waiting request is given up, if any waits.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .map(|p| p.asked + FOREIGN_FETCH_TIMEOUT)
            .min()
    }

    /// Answering end: charges `peer` one request, or says when it may ask again.
    pub fn admit_request(&mut self, now: Instant, peer: &str) -> Result<(), Limited> {
        self.peer_requests
            .admit(now, peer.to_string())
            .inspect_err(|_| {
                self.stats.requests_limited += 1;
            })
    }

    /// Answering end: the answer to a peer from what the directory gave, at most
    /// [`FETCH_DEVICES_MAX`] packages of at most [`FETCHED_PACKAGE_BYTES_MAX`] bytes (a
    /// larger one, which an operator's directory limit may allow, is left out as if the
    /// device had none).
    pub fn answer(&mut self, given: KeyPackages) -> FetchAnswer {
        self.stats.requests_taken += 1;
        let mut packages = Vec::new();
        let mut exhausted: Vec<DeviceId> = given
            .exhausted
            .iter()
            .map(|d| DeviceId::from_bytes(**d))
            .collect();
        for p in given.found {
            let device = DeviceId::from_bytes(*p.device);
            if p.package.len() > FETCHED_PACKAGE_BYTES_MAX || packages.len() == FETCH_DEVICES_MAX {
                exhausted.push(device);
                continue;
            }
            packages.push(ForeignPackage {
                user: UserId::from_bytes(*p.user),
                device,
                package: bytes::Bytes::from(Vec::<u8>::from(p.package)),
                last_resort: p.last_resort,
            });
        }
        exhausted.truncate(FETCH_DEVICES_MAX);
        self.stats.packages_given += packages.len() as u64;
        FetchAnswer::Found {
            packages,
            exhausted,
        }
    }

    /// Answering end: forgets the buckets of peers that are within their rate again.
    pub fn forget_idle(&mut self, now: Instant) {
        self.peer_requests.forget_idle(now);
    }
}

impl Gateway {
    /// A device's fetch of another domain's users: charged as any fetch, then asked of that
    /// domain's gateway (or refused: see the module docs).
    pub(super) fn ask_peer_for_key_packages(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        fetch_id: u64,
        fetch: KeyPackageFetch,
    ) -> Result<(), Refusal> {
        let domain = fetch.domain.unwrap_or_default();
        self.key_packages.admit(now, device, fetch_id)?;
        let requester = owner_of(&self.registry, device)?;
        let mut users: Vec<UserId> = Vec::with_capacity(fetch.users.len());
        for user in fetch.users.iter().map(|u| UserId::from_bytes(**u)) {
            if !users.contains(&user) {
                users.push(user);
            }
        }
        let (peer, up) = self
            .federation
            .as_ref()
            .map_or((false, false), |f| (f.is_peer(&domain), f.is_up(&domain)));
        let id = self.entropy.next_u64();
        self.foreign_fetches.ask(
            now,
            conn,
            device,
            fetch_id,
            &domain,
            users.clone(),
            peer,
            up,
            id,
        )?;
        let request = Entry::KeyPackageRequest {
            request: id,
            requester,
            users,
        };
        // The peer is configured and the entry is small (checked by the codec's bounds).
        self.send_entry(&domain, &request)
            .expect("a request to a configured peer fits its link");
        Ok(())
    }

    /// A peer's request for KeyPackages of this domain's users: what the directory gives
    /// (within the peer's rate), back by the request's id.
    pub(super) fn on_key_package_request(
        &mut self,
        now: Instant,
        peer: &str,
        request: u64,
        requester: UserId,
        users: Vec<UserId>,
    ) {
        let answer = match self.foreign_fetches.admit_request(now, peer) {
            Err(limited) => FetchAnswer::Limited {
                retry_after_ms: u32::try_from(limited.retry_after.as_millis())
                    .unwrap_or(u32::MAX)
                    .max(1),
            },
            Ok(()) => {
                let mut targets: Vec<(UserId, DeviceId)> = Vec::new();
                for user in users {
                    // As at home: nobody adds to a conversation someone who blocked them.
                    if self.social.blocked(user, requester)
                        && self.config.planted != Some(PlantedBug::BlocksIgnored)
                    {
                        continue;
                    }
                    for device in self.registry.devices_of(user) {
                        if !targets.iter().any(|(_, d)| *d == device) {
                            targets.push((user, device));
                        }
                    }
                }
                // Devices past the bound are not taken (their packages stay for later).
                targets.truncate(FETCH_DEVICES_MAX);
                let (given, drained) = self.key_packages.take(targets, &mut self.fx);
                let sessions = &self.sessions;
                self.key_packages
                    .tell_drained(drained, &|d| sessions.online(d), &mut self.fx);
                self.foreign_fetches.answer(given)
            }
        };
        let answer = Entry::KeyPackages { request, answer };
        // The peer is configured (it sent the request), and answers are bounded to fit.
        self.send_entry(peer, &answer)
            .expect("an answer to a configured peer fits its link");
    }

    /// A peer's answer to a request of this gateway: on to the device that asked, if its
    /// session is still there (else the node asks again after its own timeout).
    pub(super) fn on_foreign_key_packages(
        &mut self,
        peer: &str,
        request: u64,
        answer: FetchAnswer,
    ) {
        let registry = &self.registry;
        let local = |device| registry.user_of(device).is_some();
        let Some(to) =
            self.foreign_fetches
                .answered(peer, request, answer, &local, self.fx.writes())
        else {
            return;
        };
        if self.sessions.online(to.device) != Some(to.conn) {
            self.foreign_fetches.stats.answers_dropped += 1;
            return;
        }
        match to.answer {
            Ok((routing, packages)) => {
                self.fx
                    .send(to.conn, routing, Payload::KeyPackages(packages));
            }
            Err(refusal) => self.refuse(to.conn, refusal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> Instant {
        Instant(s * 1_000_000)
    }

    fn package(user: u128, device: u128, len: usize) -> FetchedKeyPackage {
        FetchedKeyPackage {
            user: UserId(user).to_bytes().into(),
            device: DeviceId(device).to_bytes().into(),
            package: vec![7; len].into(),
            last_resort: false,
        }
    }

    #[test]
    fn a_domain_that_is_no_peer_or_is_down_is_refused_and_nothing_waits() {
        let mut f = ForeignFetches::default();
        let users = vec![UserId(5)];
        let refused = f
            .ask(
                t(0),
                ConnectionId(1),
                DeviceId(1),
                9,
                "c.example",
                users.clone(),
                false,
                true,
                1,
            )
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::UnknownDomain);
        assert_eq!(refused.routing.seq, 9, "the fetch's id goes back with it");
        assert!(refused.message.contains("c.example"), "{}", refused.message);
        let refused = f
            .ask(
                t(0),
                ConnectionId(1),
                DeviceId(1),
                9,
                "b.example",
                users,
                true,
                false,
                1,
            )
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::PeerUnreachable);
        assert_eq!(f.pending(), 0);
        assert_eq!(
            (f.stats().unknown_domain, f.stats().peer_unreachable),
            (1, 1)
        );
    }

    #[test]
    fn an_answer_reaches_its_device_once_and_only_from_the_peer_asked() {
        let mut f = ForeignFetches::default();
        let (conn, device) = (ConnectionId(3), DeviceId(4));
        f.ask(
            t(0),
            conn,
            device,
            17,
            "b.example",
            vec![UserId(5)],
            true,
            true,
            99,
        )
        .unwrap();
        let found = FetchAnswer::Found {
            packages: vec![
                ForeignPackage {
                    user: UserId(5),
                    device: DeviceId(50),
                    package: bytes::Bytes::from_static(b"kp"),
                    last_resort: true,
                },
                ForeignPackage {
                    user: UserId(6),
                    device: DeviceId(60),
                    package: bytes::Bytes::from_static(b"kp"),
                    last_resort: false,
                },
            ],
            exhausted: vec![DeviceId(51)],
        };
        // Another peer cannot answer for b.example.
        assert!(f
            .answered(
                "c.example",
                99,
                found.clone(),
                &|_| false,
                &mut WriteBatch::default()
            )
            .is_none());
        let to = f
            .answered(
                "b.example",
                99,
                found.clone(),
                &|_| false,
                &mut WriteBatch::default(),
            )
            .expect("waiting");
        assert_eq!((to.conn, to.device), (conn, device));
        let (routing, answer) = to.answer.unwrap();
        assert_eq!(routing.seq, 17);
        assert_eq!(
            answer.found.len(),
            1,
            "the unasked user's package is dropped"
        );
        assert_eq!(*answer.found[0].device, DeviceId(50).to_bytes());
        assert!(answer.found[0].last_resort);
        assert_eq!(answer.exhausted.len(), 1);
        // The device of the user asked is remembered as b.example's; the other one is not.
        assert_eq!(
            f.foreign_device(DeviceId(50)),
            Some((UserId(5), "b.example"))
        );
        assert_eq!(f.foreign_device(DeviceId(60)), None);
        // A repeat finds nothing waiting.
        assert!(f
            .answered(
                "b.example",
                99,
                found,
                &|_| false,
                &mut WriteBatch::default()
            )
            .is_none());
        let stats = f.stats();
        assert_eq!(
            (
                stats.asked,
                stats.answered,
                stats.answers_unmatched,
                stats.packages_unasked
            ),
            (1, 1, 2, 1)
        );
    }

    #[test]
    fn a_limited_answer_tells_the_device_when_to_ask_again() {
        let mut f = ForeignFetches::default();
        f.ask(
            t(0),
            ConnectionId(3),
            DeviceId(4),
            17,
            "b.example",
            vec![UserId(5)],
            true,
            true,
            1,
        )
        .unwrap();
        let to = f
            .answered(
                "b.example",
                1,
                FetchAnswer::Limited {
                    retry_after_ms: 2_500,
                },
                &|_| false,
                &mut WriteBatch::default(),
            )
            .unwrap();
        let refusal = to.answer.unwrap_err();
        assert_eq!(refusal.code, ErrorCode::PeerLimited);
        assert_eq!(refusal.routing.seq, 17);
    }

    #[test]
    fn requests_are_given_up_after_the_timeout_or_their_connection_and_capped_per_peer() {
        let mut f = ForeignFetches::default();
        for id in 0..PENDING_PER_PEER_MAX as u64 {
            f.ask(
                t(0),
                ConnectionId(id % 2),
                DeviceId(1),
                id,
                "b.example",
                vec![],
                true,
                true,
                id,
            )
            .unwrap();
        }
        let full = f
            .ask(
                t(0),
                ConnectionId(1),
                DeviceId(1),
                0,
                "b.example",
                vec![],
                true,
                true,
                10_000,
            )
            .unwrap_err();
        assert_eq!(full.code, ErrorCode::PeerUnreachable);
        // Another peer has its own share.
        f.ask(
            t(1),
            ConnectionId(1),
            DeviceId(1),
            0,
            "c.example",
            vec![],
            true,
            true,
            10_001,
        )
        .unwrap();
        assert_eq!(f.next_deadline(), Some(t(0) + FOREIGN_FETCH_TIMEOUT));
        f.forget_stale(t(2), &|conn, _| conn != ConnectionId(0));
        assert_eq!(f.pending(), PENDING_PER_PEER_MAX / 2 + 1);
        f.forget_stale(t(60), &|_, _| true);
        assert_eq!(f.pending(), 1, "only c.example's, asked a second later");
        f.forget_stale(t(61), &|_, _| true);
        assert_eq!(f.pending(), 0);
        assert_eq!(f.next_deadline(), None);
    }

    #[test]
    fn a_peer_past_its_rate_is_limited_and_answers_are_bounded() {
        let mut f = ForeignFetches::default();
        for _ in 0..PEER_FETCH_RATE.burst {
            f.admit_request(t(0), "b.example").unwrap();
        }
        assert!(f.admit_request(t(0), "b.example").is_err());
        assert!(
            f.admit_request(t(0), "c.example").is_ok(),
            "each peer its own"
        );
        assert_eq!(f.stats().requests_limited, 1);

        let mut given = KeyPackages::default();
        for device in 0..FETCH_DEVICES_MAX as u128 + 2 {
            given.found.push(package(1, device, 10));
        }
        given
            .found
            .push(package(1, 1000, FETCHED_PACKAGE_BYTES_MAX + 1));
        let FetchAnswer::Found {
            packages,
            exhausted,
        } = f.answer(given)
        else {
            panic!("found");
        };
        assert_eq!(packages.len(), FETCH_DEVICES_MAX);
        assert_eq!(exhausted.len(), 3, "two past the count, one too large");
        assert_eq!(f.stats().packages_given, FETCH_DEVICES_MAX as u64);
    }

    /// Both ends on two real gateways: a device of a.example fetches KeyPackages of users of
    /// b.example.
    mod federated {
        use super::*;
        use crate::env::{Store, WriteBatch};
        use crate::gateway::key_packages::PackageKind;
        use crate::gateway::test_pair::{frames, Pair, DOMAINS, NOW};
        use crate::gateway::GatewayInput;
        use crate::testing::{drain_gateway, queued_entries};
        use crate::wire::payload::ErrorReport;
        use crate::wire::presence::ContactAction;
        use crate::wire::Frame;

        fn alice() -> UserId {
            UserId::of("alice", DOMAINS[0])
        }

        fn bob() -> UserId {
            UserId::of("bob", DOMAINS[1])
        }

        /// `n` one-time packages and a last-resort one for `device` at b.example.
        fn give_packages(w: &mut Pair, device: DeviceId, n: usize) {
            let (g, store) = &mut w.gateways[1];
            let mut writes = WriteBatch::default();
            let packages = (0..n)
                .map(|i| bytes::Bytes::from(format!("kp-{i}")))
                .collect();
            let validate = |b: &[u8]| {
                Ok(if b.starts_with(b"kp") {
                    PackageKind::OneTime
                } else {
                    PackageKind::LastResort
                })
            };
            g.key_packages
                .directory_mut()
                .upload(
                    device,
                    packages,
                    Some(bytes::Bytes::from_static(b"lr")),
                    &validate,
                    &mut writes,
                )
                .unwrap();
            store.commit(writes).unwrap();
        }

        /// a.example's device on `conn` fetches `users` of `domain` as request `seq`: what it
        /// hears at once.
        fn fetch(
            w: &mut Pair,
            conn: ConnectionId,
            seq: u64,
            users: &[UserId],
            domain: &str,
        ) -> Vec<Payload> {
            let (g, store) = &mut w.gateways[0];
            let fetch = KeyPackageFetch {
                users: users.iter().map(|u| u.to_bytes().into()).collect(),
                domain: Some(domain.into()),
            };
            let routing = Routing {
                seq,
                ..Routing::default()
            };
            let frame = Frame::new(routing, Payload::KeyPackageFetch(fetch)).encode();
            g.handle(NOW, GatewayInput::Frame(conn, frame));
            frames(&drain_gateway(g, store), conn)
        }

        fn error_of(payloads: &[Payload]) -> Option<(ErrorCode, String)> {
            payloads.iter().find_map(|p| match p {
                Payload::Error(ErrorReport { code, message, .. }) => {
                    Some((ErrorCode::from_u16(*code), message.clone()))
                }
                _ => None,
            })
        }

        #[test]
        fn a_device_gets_one_package_per_device_of_another_domains_user_through_its_gateway() {
            let mut w = Pair::new();
            let (conn, _) = w.open_session(0, 1, alice());
            let (_, phone) = w.open_session(1, 2, bob());
            let (_, laptop) = w.open_session(1, 3, bob());
            give_packages(&mut w, phone, 3);
            assert!(
                fetch(&mut w, conn, 41, &[bob(), bob()], DOMAINS[1]).is_empty(),
                "it waits"
            );
            let asked = queued_entries(&w.gateways[0].1);
            assert!(
                matches!(&asked[..], [Entry::KeyPackageRequest { requester, users, .. }]
                    if *requester == alice() && *users == [bob()]),
                "{asked:?}"
            );
            w.settle();
            let heard = frames(&w.released[0], conn);
            let Some(Payload::KeyPackages(answer)) = heard.first() else {
                panic!("the answer: {heard:?}");
            };
            assert_eq!(answer.found.len(), 1);
            assert_eq!(*answer.found[0].device, phone.to_bytes());
            assert_eq!(*answer.found[0].user, bob().to_bytes());
            assert!(!answer.found[0].last_resort);
            assert_eq!(answer.exhausted.len(), 1);
            assert_eq!(*answer.exhausted[0], laptop.to_bytes());
            // The phone's pool lost one one-time package at b.example.
            assert_eq!(w.gateways[1].0.key_packages.directory().remaining(phone), 2);
            let (a, b) = (w.gateways[0].0.stats(), w.gateways[1].0.stats());
            let (a, b) = (a.foreign_key_packages, b.foreign_key_packages);
            assert_eq!((a.asked, a.answered), (1, 1));
            assert_eq!(w.gateways[0].0.foreign_fetches.pending(), 0);
            assert_eq!((b.requests_taken, b.packages_given), (1, 1));
        }

        #[test]
        fn unknown_domains_and_blocks_are_refused_and_a_late_answer_is_dropped() {
            let mut w = Pair::new();
            let (conn, _) = w.open_session(0, 1, alice());
            let (_, phone) = w.open_session(1, 2, bob());
            give_packages(&mut w, phone, 3);
            // A domain a.example does not federate with: refused at once, nothing queued.
            let heard = fetch(
                &mut w,
                conn,
                5,
                &[UserId::of("carol", "c.example")],
                "c.example",
            );
            let (code, message) = error_of(&heard).expect("refused");
            assert_eq!(code, ErrorCode::UnknownDomain);
            assert!(message.contains("c.example"), "{message}");
            assert!(queued_entries(&w.gateways[0].1).is_empty());
            // Bob blocked alice: b.example hands none of his packages to her.
            let mut writes = WriteBatch::default();
            let social = &mut w.gateways[1].0.social;
            social
                .change(bob(), alice(), ContactAction::Block, 100, &mut writes)
                .unwrap();
            fetch(&mut w, conn, 6, &[bob()], DOMAINS[1]);
            w.settle();
            let heard = frames(&w.released[0], conn);
            let Some(Payload::KeyPackages(answer)) = heard.first() else {
                panic!("the answer: {heard:?}");
            };
            assert!(answer.found.is_empty() && answer.exhausted.is_empty());
            assert_eq!(w.gateways[1].0.key_packages.directory().remaining(phone), 3);
            // Alice's session ends before the answer comes: it is dropped, counted.
            social_unblock(&mut w);
            fetch(&mut w, conn, 7, &[bob()], DOMAINS[1]);
            let (g, store) = &mut w.gateways[0];
            g.handle(NOW, GatewayInput::Closed(conn));
            drain_gateway(g, store);
            w.settle();
            assert_eq!(
                w.gateways[0].0.stats().foreign_key_packages.answers_dropped,
                1
            );
        }

        fn social_unblock(w: &mut Pair) {
            let mut writes = WriteBatch::default();
            w.gateways[1]
                .0
                .social
                .change(bob(), alice(), ContactAction::Unblock, 100, &mut writes)
                .unwrap();
        }
    }
}
