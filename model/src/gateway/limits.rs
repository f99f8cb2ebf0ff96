//! Abuse controls: rate limits on what one device or one user may ask of the gateway.
//!
//! Each limit is a token bucket, kept as GCRA (the generic cell rate algorithm): per key, one
//! instant, the *theoretical arrival time* of the next request. A request at `now` is allowed
//! when `tat - tolerance <= now` (at most `burst` requests at once, then one per `interval`),
//! and moves `tat` on by one interval; otherwise it is refused with the time until it would be
//! allowed. A bucket holds one `Instant` per key that asked recently; keys whose bucket is full
//! again are forgotten on each tick, so memory follows the active senders, not every device.
//!
//! Limits live in memory only: a restarted gateway starts every bucket full. A device that was
//! refused keeps its message and sends it again after the retry hint (see `node::outbox`), so a
//! refusal loses nothing.
//!
//! What is limited here (the KeyPackage directory limits its own fetches):
//! - messages (application messages and commits) per device: `sends_limited`; a device that
//!   goes on sending past `send_refusals_max` refusals in a row (it ignores the hint, as a
//!   well-behaved node never does beyond what it had in flight) has its session ended with a
//!   `sends_limited` goodbye carrying the hint: a refused frame costs the gateway about as
//!   much as a sequenced one, so a flood must not be answered frame by frame for long;
//! - conversations (DMs and rooms) created per user: `conversations_limited`;
//! - invitations per user: each user a commit adds to a conversation (a DM's other user, a
//!   room's new members) who was not in it and is not the committer's own user costs one;
//!   `invitations_limited`; a commit that invites more than the burst at once could never be
//!   admitted, and is refused for good (`invitation_too_large`); and a quota, not a rate: the
//!   most conversations one user may be in (`conversation_quota`, checked by the router with
//!   the groups' count of memberships);
//! - registrations (a new device enrolling with a token or a pairing code, or renewing its
//!   certificate) per source address, when the driver says where a connection comes from
//!   (`GatewayInput::AcceptedFrom`): `registrations_limited`, as a goodbye with the hint;
//! - contact requests per user: `contacts_limited`;
//! - relayed messages per peer gateway, at the authority of conversations spanning domains
//!   (`peer_limited`): a peer's own gateway charges its devices' sends, but a peer that does
//!   not (a bug, or a hostile operator) must not take this gateway's sequencer, disk and links
//!   for itself; the excess is answered with the hint, which the peer passes to the device;
//! - watchlist changes (presence subscriptions) per device: `presence_limited`; and two caps
//!   checked by the `social` and `presence` sub-machines: the longest watchlist
//!   (`watchlist_too_long`) and the most relations one user may hold (`contact_list_full`).
//!
//! Retries of a message the gateway already sequenced are answered from the deduplication
//! record and never charged.

use core::net::IpAddr;
use std::collections::BTreeMap;
use std::time::Duration;

use crate::ids::{DeviceId, UserId};
use crate::time::Instant;

/// Where a connection comes from, as the limits per address see it: an IPv4 address, or an
/// IPv6 address's /64 prefix (one host commonly holds a whole /64, so counting single IPv6
/// addresses would limit nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceAddress([u8; 16]);

impl SourceAddress {
    /// The key of `ip`: IPv4 whole (as an IPv4-mapped IPv6 address), IPv6 cut to its /64.
    pub fn of(ip: IpAddr) -> SourceAddress {
        match ip {
            IpAddr::V4(v4) => SourceAddress(v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceAddress(v4.to_ipv6_mapped().octets()),
                None => {
                    let mut octets = v6.octets();
                    octets[8..].fill(0);
                    SourceAddress(octets)
                }
            },
        }
    }
}

/// The furthest ahead a relay refused by its peer's limit is told to come back.
pub const PEER_PROMISE_MAX: Duration = Duration::from_secs(60);

/// How often the operator hears of one peer refused by its relay limit, at most.
pub const PEER_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// A rate: `count` requests per `period`, with bursts of up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Requests per `period` in the long run.
    pub count: u32,
    /// The period `count` is over.
    pub period: Duration,
    /// Most requests allowed at once after a quiet spell (at least 1).
    pub burst: u32,
}

impl Rate {
    /// `count` per second, bursts of `burst`.
    pub fn per_second(count: u32, burst: u32) -> Rate {
        Rate {
            count,
            period: Duration::from_secs(1),
            burst,
        }
    }

    /// `count` per day, bursts of `burst`.
    pub fn per_day(count: u32, burst: u32) -> Rate {
        Rate {
            count,
            period: Duration::from_secs(24 * 3600),
            burst,
        }
    }

    /// `count` per hour, bursts of `burst`.
    pub fn per_hour(count: u32, burst: u32) -> Rate {
        Rate {
            count,
            period: Duration::from_secs(3600),
            burst,
        }
    }

    /// The time one request costs, in whole microseconds (the model's clock), so that a burst
    /// is exactly `burst` intervals.
    fn interval(self) -> Duration {
        let period_us = u64::try_from(self.period.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros((period_us / u64::from(self.count.max(1))).max(1))
    }

    /// How far ahead of `now` the bucket may be booked.
    fn tolerance(self) -> Duration {
        self.interval() * self.burst.max(1).saturating_sub(1)
    }
}

/// The gateway's rate limits (see the module docs). `None` turns a limit off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    /// Messages a device may send (application messages and group commits).
    pub sends: Option<Rate>,
    /// Conversations (DMs, rooms) a user may create.
    pub conversations: Option<Rate>,
    /// Users a user may invite into conversations (see the module docs).
    pub invitations: Option<Rate>,
    /// Registrations per source address.
    pub registrations: Option<Rate>,
    /// Contact requests a user may send (adding someone not yet asked).
    pub contact_requests: Option<Rate>,
    /// Watchlists a device may send (each replaces the last; a node sends one per session).
    pub presence_subscriptions: Option<Rate>,
    /// Messages one peer gateway may relay here, into conversations homed here, all its
    /// devices together.
    pub peer_relays: Option<Rate>,
    /// Most users one watchlist may name.
    pub watchlist_max: u32,
    /// Most relations (contacts, requests sent, blocks) one user may hold.
    pub contacts_max: u32,
    /// Most MLS conversations (DMs and rooms) one user may be in: a creation by a user at the
    /// cap, or a commit adding one, is refused (`conversation_quota`).
    pub conversations_max: u32,
    /// Messages a device may have refused by the send limit in a row (none admitted between)
    /// before the gateway ends its session: a device that keeps sending while told to wait
    /// costs the gateway as much per refused frame as per message, so it is cut off for the
    /// retry hint. Above what a real device has in flight when it is first refused.
    pub send_refusals_max: u32,
}

impl Default for RateLimits {
    /// Far above what a person types or a client syncs (a device resending a full outbox of
    /// 1,000 messages after a week offline waits about 20 s in all), low enough that one device
    /// cannot take a gateway's sequencer for itself.
    fn default() -> Self {
        RateLimits {
            sends: Some(Rate::per_second(50, 200)),
            conversations: Some(Rate::per_hour(60, 30)),
            // A room of 1,000 (Signal's largest group) can be made at once.
            invitations: Some(Rate::per_hour(1_000, 1_000)),
            registrations: Some(Rate::per_hour(60, 20)),
            contact_requests: Some(Rate::per_day(100, 20)),
            presence_subscriptions: Some(Rate::per_hour(120, 20)),
            // Forty devices sending at their own limit; a burst holds what a busy peer
            // queued during a minute's partition.
            peer_relays: Some(Rate::per_second(2_000, 20_000)),
            watchlist_max: 512,
            contacts_max: 2_000,
            conversations_max: 10_000,
            send_refusals_max: 1_000,
        }
    }
}

/// A refused request: which limit, and how long until one more is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    /// When the next request will be allowed, from now.
    pub retry_after: Duration,
    /// The limit that refused it.
    pub rate: Rate,
    /// The device went on sending past `send_refusals_max` refusals: end its session.
    pub cut_off: bool,
}

/// One limit, per key (a GCRA bucket each).
#[derive(Clone, Debug)]
pub struct Bucket<K> {
    rate: Rate,
    tat: BTreeMap<K, Instant>,
}

impl<K: Ord> Bucket<K> {
    /// An empty bucket set for `rate`.
    pub fn new(rate: Rate) -> Bucket<K> {
        assert!(
            rate.count > 0,
            "a rate of zero would refuse everything forever"
        );
        Bucket {
            rate,
            tat: BTreeMap::new(),
        }
    }

    /// Charges `key` one request at `now`, or says when it may ask again.
    pub fn admit(&mut self, now: Instant, key: K) -> Result<(), Limited> {
        self.admit_n(now, key, 1)
    }

    /// Charges `key` `n` requests at once (1 ≤ `n` ≤ burst), or says when all `n` may go:
    /// all or nothing.
    pub fn admit_n(&mut self, now: Instant, key: K, n: u32) -> Result<(), Limited> {
        assert!(
            (1..=self.rate.burst.max(1)).contains(&n),
            "a charge of {n} against a burst of {} could never be admitted",
            self.rate.burst
        );
        let tat = self.tat.get(&key).copied().unwrap_or(now).max(now);
        // The last of the n must fit: it arrives n - 1 intervals after the first.
        let allowed_from = tat + self.rate.interval() * (n - 1) - self.rate.tolerance();
        if now < allowed_from {
            return Err(Limited {
                retry_after: allowed_from.saturating_since(now),
                rate: self.rate,
                cut_off: false,
            });
        }
        let next = tat + self.rate.interval() * n;
        debug_assert!(next > now, "an admitted request books the bucket ahead");
        self.tat.insert(key, next);
        Ok(())
    }

    /// Forgets the keys whose bucket is full again (they would be admitted as if new).
    pub fn forget_idle(&mut self, now: Instant) {
        self.tat.retain(|_, tat| *tat > now);
    }

    /// Keys with a bucket in use (memory held).
    pub fn len(&self) -> usize {
        self.tat.len()
    }

    /// True if no key has a bucket in use.
    pub fn is_empty(&self) -> bool {
        self.tat.is_empty()
    }
}

/// Counters of the limits, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LimitStats {
    /// Messages refused by the per-device send limit.
    pub sends_limited: u64,
    /// Conversation creations refused by the per-user limit.
    pub conversations_limited: u64,
    /// Commits refused by the per-user invitation limit.
    pub invitations_limited: u64,
    /// Registrations refused by the per-address limit.
    pub registrations_limited: u64,
    /// Contact requests refused by the per-user limit.
    pub contacts_limited: u64,
    /// Watchlists refused by the per-device limit.
    pub presence_limited: u64,
    /// Relayed messages refused by the per-peer limit.
    pub peer_relays_limited: u64,
    /// Sessions ended because their device kept sending while refused.
    pub cut_off: u64,
}

/// The gateway's rate limits and their buckets.
#[derive(Clone, Debug)]
pub struct Limits {
    sends: Option<Bucket<DeviceId>>,
    conversations: Option<Bucket<UserId>>,
    invitations: Option<Bucket<UserId>>,
    registrations: Option<Bucket<SourceAddress>>,
    contact_requests: Option<Bucket<UserId>>,
    presence_subscriptions: Option<Bucket<DeviceId>>,
    peer_relays: Option<Bucket<String>>,
    /// Per peer refused by `peer_relays`: when the operator was last told.
    peer_reported: BTreeMap<String, Instant>,
    /// Per peer refused by `peer_relays`: the first time not yet promised to a refused relay
    /// (see `admit_peer_relay`).
    peer_promised: BTreeMap<String, Instant>,
    /// Per device being refused: its refusals since its last admitted message.
    refused_in_row: BTreeMap<DeviceId, u32>,
    send_refusals_max: u32,
    stats: LimitStats,
}

impl Limits {
    /// Every bucket full.
    pub fn new(config: RateLimits) -> Limits {
        Limits {
            sends: config.sends.map(Bucket::new),
            conversations: config.conversations.map(Bucket::new),
            invitations: config.invitations.map(Bucket::new),
            registrations: config.registrations.map(Bucket::new),
            contact_requests: config.contact_requests.map(Bucket::new),
            presence_subscriptions: config.presence_subscriptions.map(Bucket::new),
            peer_relays: config.peer_relays.map(Bucket::new),
            peer_reported: BTreeMap::new(),
            peer_promised: BTreeMap::new(),
            refused_in_row: BTreeMap::new(),
            send_refusals_max: config.send_refusals_max.max(1),
            stats: LimitStats::default(),
        }
    }

    /// Charges the peer gateway of `domain` one relayed message. A refusal promises the
    /// relay a time of its own: each refused relay is told to come back one interval of the
    /// limit after the one refused before it (up to [`PEER_PROMISE_MAX`] ahead), so that a
    /// backlog comes back spread over the time the limit needs for it, each when there is
    /// room for it, rather than all at the next free slot to be refused again.
    pub fn admit_peer_relay(&mut self, now: Instant, domain: &str) -> Result<(), Limited> {
        let Some(bucket) = &mut self.peer_relays else {
            return Ok(());
        };
        let mut limited = match bucket.admit(now, domain.to_string()) {
            Ok(()) => return Ok(()),
            Err(limited) => limited,
        };
        self.stats.peer_relays_limited += 1;
        let next_free = now + limited.retry_after;
        let slot = match self.peer_promised.get(domain) {
            Some(&promised) if promised > next_free => promised,
            _ => next_free,
        };
        let slot = slot.min(now + PEER_PROMISE_MAX);
        self.peer_promised
            .insert(domain.to_string(), slot + limited.rate.interval());
        limited.retry_after = slot.saturating_since(now);
        Err(limited)
    }

    /// True if the operator should hear now that `domain`'s relays are refused: at most once
    /// per [`PEER_REPORT_INTERVAL`] per peer, however long the flood.
    pub fn report_peer_limited(&mut self, now: Instant, domain: &str) -> bool {
        if self
            .peer_reported
            .get(domain)
            .is_some_and(|last| now < *last + PEER_REPORT_INTERVAL)
        {
            return false;
        }
        self.peer_reported.insert(domain.to_string(), now);
        true
    }

    /// Charges `device` one message. A refusal past `send_refusals_max` in a row says to cut
    /// the device off (and starts its count again).
    pub fn admit_send(&mut self, now: Instant, device: DeviceId) -> Result<(), Limited> {
        let Some(bucket) = &mut self.sends else {
            return Ok(());
        };
        match bucket.admit(now, device) {
            Ok(()) => {
                self.refused_in_row.remove(&device);
                Ok(())
            }
            Err(mut limited) => {
                self.stats.sends_limited += 1;
                let in_row = self.refused_in_row.entry(device).or_default();
                *in_row += 1;
                if *in_row > self.send_refusals_max {
                    self.refused_in_row.remove(&device);
                    self.stats.cut_off += 1;
                    limited.cut_off = true;
                }
                Err(limited)
            }
        }
    }

    /// Charges `user` one new conversation.
    pub fn admit_conversation(&mut self, now: Instant, user: UserId) -> Result<(), Limited> {
        let Some(bucket) = &mut self.conversations else {
            return Ok(());
        };
        bucket.admit(now, user).inspect_err(|_| {
            self.stats.conversations_limited += 1;
        })
    }

    /// Charges `user` for inviting `count` users at once. `Ok` if the limit is off; a count
    /// above the burst is refused with `cut_off` set (it could never be admitted: the caller
    /// refuses the commit for good, not for a while).
    pub fn admit_invitations(
        &mut self,
        now: Instant,
        user: UserId,
        count: u32,
    ) -> Result<(), Limited> {
        let Some(bucket) = &mut self.invitations else {
            return Ok(());
        };
        if count == 0 {
            return Ok(());
        }
        let rate = bucket.rate;
        let result = if count > rate.burst.max(1) {
            Err(Limited {
                retry_after: Duration::ZERO,
                rate,
                cut_off: true,
            })
        } else {
            bucket.admit_n(now, user, count)
        };
        result.inspect_err(|_| {
            self.stats.invitations_limited += 1;
        })
    }

    /// Charges `source` one registration.
    pub fn admit_registration(
        &mut self,
        now: Instant,
        source: SourceAddress,
    ) -> Result<(), Limited> {
        let Some(bucket) = &mut self.registrations else {
            return Ok(());
        };
        bucket.admit(now, source).inspect_err(|_| {
            self.stats.registrations_limited += 1;
        })
    }

    /// Charges `user` one contact request.
    pub fn admit_contact_request(&mut self, now: Instant, user: UserId) -> Result<(), Limited> {
        let Some(bucket) = &mut self.contact_requests else {
            return Ok(());
        };
        bucket.admit(now, user).inspect_err(|_| {
            self.stats.contacts_limited += 1;
        })
    }

    /// Charges `device` one watchlist.
    pub fn admit_subscription(&mut self, now: Instant, device: DeviceId) -> Result<(), Limited> {
        let Some(bucket) = &mut self.presence_subscriptions else {
            return Ok(());
        };
        bucket.admit(now, device).inspect_err(|_| {
            self.stats.presence_limited += 1;
        })
    }

    /// Forgets buckets that are full again (each tick).
    pub fn forget_idle(&mut self, now: Instant) {
        if let Some(b) = &mut self.sends {
            b.forget_idle(now);
            // A device whose bucket is full again starts its count of refusals afresh.
            self.refused_in_row
                .retain(|device, _| b.tat.contains_key(device));
        }
        if let Some(b) = &mut self.conversations {
            b.forget_idle(now);
        }
        if let Some(b) = &mut self.invitations {
            b.forget_idle(now);
        }
        if let Some(b) = &mut self.registrations {
            b.forget_idle(now);
        }
        if let Some(b) = &mut self.contact_requests {
            b.forget_idle(now);
        }
        if let Some(b) = &mut self.presence_subscriptions {
            b.forget_idle(now);
        }
        if let Some(b) = &mut self.peer_relays {
            b.forget_idle(now);
        }
        self.peer_promised.retain(|_, at| *at > now);
        self.peer_reported
            .retain(|_, at| now < *at + PEER_REPORT_INTERVAL);
    }

    /// Buckets in use, all limits together.
    pub fn buckets(&self) -> usize {
        self.sends.as_ref().map_or(0, Bucket::len)
            + self.conversations.as_ref().map_or(0, Bucket::len)
            + self.invitations.as_ref().map_or(0, Bucket::len)
            + self.registrations.as_ref().map_or(0, Bucket::len)
            + self.contact_requests.as_ref().map_or(0, Bucket::len)
            + self.presence_subscriptions.as_ref().map_or(0, Bucket::len)
            + self.peer_relays.as_ref().map_or(0, Bucket::len)
    }

    /// The counters.
    pub fn stats(&self) -> &LimitStats {
        &self.stats
    }
}

/// A rate in words for people: "50 per second (bursts of 200)".
pub fn describe(rate: Rate) -> String {
    let per = match rate.period.as_secs() {
        1 => "second".to_string(),
        60 => "minute".to_string(),
        3600 => "hour".to_string(),
        86_400 => "day".to_string(),
        s => format!("{s} s"),
    };
    format!("{} per {per} (bursts of {})", rate.count, rate.burst)
}

/// A wait in words for people: "0.2 s", "30 min", "5 h" (a retry hint, read by someone who
/// will try again by hand).
pub fn describe_wait(wait: Duration) -> String {
    let s = wait.as_secs();
    match s {
        0..=119 => format!("{:.1} s", wait.as_secs_f64()),
        120..=7199 => format!("{} min", s.div_ceil(60)),
        _ => format!("{} h", s.div_ceil(3600)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at_ms(ms: u64) -> Instant {
        Instant(ms * 1000)
    }

    #[test]
    fn a_burst_passes_then_one_request_per_interval() {
        let mut bucket = Bucket::new(Rate::per_second(10, 3));
        for _ in 0..3 {
            bucket.admit(at_ms(0), 1u8).expect("within the burst");
        }
        let refused = bucket.admit(at_ms(0), 1u8).expect_err("past the burst");
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        bucket
            .admit(at_ms(50), 2u8)
            .expect("other keys have their own bucket");
        assert!(bucket.admit(at_ms(99), 1u8).is_err());
        bucket.admit(at_ms(100), 1u8).expect("one interval later");
        assert!(bucket.admit(at_ms(100), 1u8).is_err());
    }

    #[test]
    fn idle_keys_are_forgotten_and_start_full() {
        let mut bucket = Bucket::new(Rate::per_second(10, 2));
        bucket.admit(at_ms(0), 7u8).unwrap();
        bucket.admit(at_ms(0), 7u8).unwrap();
        bucket.forget_idle(at_ms(150));
        assert_eq!(bucket.len(), 1, "still booked until 200 ms");
        bucket.forget_idle(at_ms(200));
        assert!(bucket.is_empty());
        bucket.admit(at_ms(200), 7u8).unwrap();
        bucket.admit(at_ms(200), 7u8).unwrap();
        assert!(bucket.admit(at_ms(200), 7u8).is_err());
    }

    #[test]
    fn counters_count_each_refusal_by_limit() {
        let mut limits = Limits::new(RateLimits {
            sends: Some(Rate::per_second(1, 1)),
            conversations: Some(Rate::per_hour(1, 1)),
            send_refusals_max: 3,
            ..RateLimits::default()
        });
        let device = DeviceId::from_bytes([1; 16]);
        let user = UserId::from_bytes([2; 16]);
        limits.admit_send(at_ms(0), device).unwrap();
        assert!(limits.admit_send(at_ms(0), device).is_err());
        limits.admit_conversation(at_ms(0), user).unwrap();
        let refused = limits.admit_conversation(at_ms(1), user).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_millis(3_600_000 - 1));
        assert_eq!(limits.stats().sends_limited, 1);
        assert_eq!(limits.stats().conversations_limited, 1);
        let off = Limits::new(RateLimits {
            sends: None,
            conversations: None,
            contact_requests: None,
            presence_subscriptions: None,
            ..RateLimits::default()
        });
        assert_eq!(off.buckets(), 0);
    }

    #[test]
    fn a_device_that_keeps_sending_while_refused_is_cut_off_and_one_admitted_message_resets_it() {
        let mut limits = Limits::new(RateLimits {
            sends: Some(Rate::per_second(10, 1)),
            conversations: None,
            send_refusals_max: 2,
            ..RateLimits::default()
        });
        let device = DeviceId::from_bytes([1; 16]);
        limits.admit_send(at_ms(0), device).unwrap();
        assert!(!limits.admit_send(at_ms(1), device).unwrap_err().cut_off);
        assert!(!limits.admit_send(at_ms(2), device).unwrap_err().cut_off);
        limits.admit_send(at_ms(100), device).unwrap();
        assert!(!limits.admit_send(at_ms(101), device).unwrap_err().cut_off);
        assert!(!limits.admit_send(at_ms(102), device).unwrap_err().cut_off);
        assert!(limits.admit_send(at_ms(103), device).unwrap_err().cut_off);
        assert_eq!(limits.stats().cut_off, 1);
        limits.forget_idle(at_ms(1_000));
        assert!(limits.refused_in_row.is_empty() && limits.buckets() == 0);
    }

    #[test]
    fn an_invitation_of_several_users_is_charged_all_or_nothing() {
        let mut limits = Limits::new(RateLimits {
            invitations: Some(Rate::per_second(10, 5)),
            ..RateLimits::default()
        });
        let user = UserId::from_bytes([3; 16]);
        limits.admit_invitations(at_ms(0), user, 3).unwrap();
        let refused = limits.admit_invitations(at_ms(0), user, 3).unwrap_err();
        assert!(!refused.cut_off);
        assert_eq!(
            refused.retry_after,
            Duration::from_millis(100),
            "one more token is due in one interval"
        );
        limits
            .admit_invitations(at_ms(0), user, 2)
            .expect("the two left in the burst");
        limits.admit_invitations(at_ms(0), user, 0).unwrap();
        let too_many = limits
            .admit_invitations(at_ms(10_000), user, 6)
            .unwrap_err();
        assert!(too_many.cut_off, "more than a burst can never be admitted");
        assert_eq!(limits.stats().invitations_limited, 2);
    }

    #[test]
    fn an_ipv6_host_is_one_address_and_ipv4_is_counted_whole() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            SourceAddress::of(ip("2001:db8:1:2::1")),
            SourceAddress::of(ip("2001:db8:1:2:ffff::9")),
            "one /64"
        );
        assert_ne!(
            SourceAddress::of(ip("2001:db8:1:2::1")),
            SourceAddress::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            SourceAddress::of(ip("192.0.2.7")),
            SourceAddress::of(ip("::ffff:192.0.2.7")),
            "an IPv4 peer on a dual-stack socket is the same peer"
        );
        assert_ne!(
            SourceAddress::of(ip("192.0.2.7")),
            SourceAddress::of(ip("192.0.2.8"))
        );
    }

    #[test]
    fn rates_read_as_words() {
        assert_eq!(
            describe(Rate::per_second(50, 200)),
            "50 per second (bursts of 200)"
        );
        assert_eq!(
            describe(Rate::per_hour(60, 30)),
            "60 per hour (bursts of 30)"
        );
        let wait = |ms| describe_wait(Duration::from_millis(ms));
        assert_eq!(wait(200), "0.2 s");
        assert_eq!(wait(1_800_000), "30 min");
        assert_eq!(
            wait(1_799_001),
            "30 min",
            "rounded up: never earlier than the hint"
        );
        assert_eq!(wait(86_400_000), "24 h");
    }

    proptest! {
        /// Charging n at once is charging one n times at the same instant: both admit or
        /// both refuse, and leave the bucket in the same state.
        #[test]
        fn a_charge_of_n_is_n_charges_of_one(
            burst in 1u32..20,
            first in 0u32..20,
            n in 1u32..20,
            gap_us in 0u64..1_000_000,
        ) {
            let n = n.min(burst);
            let rate = Rate::per_second(5, burst);
            let mut one_by_one = Bucket::new(rate);
            for _ in 0..first {
                let _ = one_by_one.admit(Instant(0), 0u8);
            }
            let mut at_once = one_by_one.clone();
            let now = Instant(gap_us);
            let mut probe = one_by_one.clone();
            let singles = (0..n).all(|_| probe.admit(now, 0u8).is_ok());
            let all = at_once.admit_n(now, 0u8, n).is_ok();
            prop_assert_eq!(singles, all);
            if all {
                one_by_one = probe;
                prop_assert_eq!(&one_by_one.tat, &at_once.tat);
            }
        }

        /// Whatever the arrival times, what a bucket admits within any window of length `w`
        /// is at most `burst + w / interval` (rounded down), and a refused request is admitted
        /// when its retry hint has passed.
        #[test]
        fn admitted_requests_never_exceed_the_rate(
            count in 1u32..200,
            burst in 1u32..50,
            gaps in proptest::collection::vec(0u64..50_000, 1..300),
        ) {
            let rate = Rate::per_second(count, burst);
            let mut bucket = Bucket::new(rate);
            let mut now = Instant(0);
            let mut admitted = Vec::new();
            for gap in gaps {
                now = now + Duration::from_micros(gap);
                match bucket.admit(now, 0u8) {
                    Ok(()) => admitted.push(now),
                    Err(limited) => {
                        prop_assert!(limited.retry_after > Duration::ZERO);
                        let mut probe = bucket.clone();
                        prop_assert!(probe.admit(now + limited.retry_after, 0u8).is_ok());
                    }
                }
            }
            let interval = rate.interval().as_micros() as u64;
            for (i, start) in admitted.iter().enumerate() {
                for (j, end) in admitted.iter().enumerate().skip(i) {
                    let within = (end.0 - start.0) / interval;
                    prop_assert!((j - i + 1) as u64 <= u64::from(burst) + within,
                        "{} admitted in {} µs", j - i + 1, end.0 - start.0);
                }
            }
        }
    }
}
