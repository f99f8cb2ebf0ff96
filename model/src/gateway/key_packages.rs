//! The gateway's KeyPackage directory: a pool of one-time MLS KeyPackages per device.
//!
//! Devices upload KeyPackages in batches; whoever starts a conversation with a user fetches one
//! package for each of that user's devices. Rules:
//!
//! - A package is handed out at most once: the fetch removes it, in the same commit that answers.
//! - Each device may also keep one *last-resort* package (RFC 9420 §16.8). It is handed out only
//!   when the device's pool is empty, may be handed out again, and is marked as last resort in the
//!   answer so the fetcher knows the peer should rotate it.
//! - A device with neither is reported as exhausted; the fetch still answers for every other
//!   device (graceful degradation: the conversation starts without it, and it can be added once
//!   it uploads again).
//! - Fetches are rate-limited per requesting device (GCRA: a burst, then one per interval), so
//!   nobody drains a user's pool.
//! - The owner learns how many packages it has left after every upload and whenever a fetch takes
//!   its pool below the replenish threshold.
//!
//! Packages are opaque here; the caller passes a validator (the gateway checks with openmls that
//! a package is well formed, uses Sund's ciphersuite and belongs to the uploading device).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use super::{Fx, Refusal};
use crate::env::{StoreError, Table, WriteBatch};
use crate::ids::{ConnectionId, DeviceId, UserId};
use crate::time::Instant;
use crate::wire::payload::{
    ErrorCode, FetchedKeyPackage, KeyPackageCount, KeyPackageFetch, KeyPackageUpload, KeyPackages,
    Payload,
};
use crate::wire::Routing;

/// Table of KeyPackages: key `device(16) ++ slot(8, big-endian)`, value the package bytes; slot
/// [`LAST_RESORT_SLOT`] holds the device's last-resort package.
pub const KEY_PACKAGES_TABLE: Table = Table("key_packages");

/// The slot of a device's last-resort package.
pub const LAST_RESORT_SLOT: u64 = u64::MAX;

/// Limits of the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryConfig {
    /// Most ordinary packages one device may have in the pool.
    pub pool_max: usize,
    /// Most packages in one upload.
    pub upload_max: usize,
    /// Largest accepted package.
    pub package_bytes_max: usize,
    /// Below this many packages the owner is told to replenish.
    pub replenish_below: usize,
    /// Fetches one requester may make at once.
    pub fetch_burst: u32,
    /// After the burst, one fetch per this interval.
    pub fetch_interval: Duration,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        DirectoryConfig {
            pool_max: 100,
            upload_max: 100,
            package_bytes_max: 16 * 1024,
            replenish_below: 10,
            fetch_burst: 20,
            fetch_interval: Duration::from_secs(3),
        }
    }
}

/// What the validator says a package is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackageKind {
    /// An ordinary one-time package.
    OneTime,
    /// A package carrying the last-resort extension.
    LastResort,
}

/// Why an upload was refused (nothing of it was stored).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// More packages than one upload may carry.
    #[error("{count} KeyPackages in one upload; at most {max}: upload in smaller batches")]
    TooMany {
        /// Packages in the upload.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The pool would hold more than its limit.
    #[error("the pool would hold {would_hold} KeyPackages; at most {max}: upload fewer")]
    PoolFull {
        /// Pool size after the upload.
        would_hold: usize,
        /// The limit.
        max: usize,
    },
    /// A package is larger than the limit.
    #[error("a KeyPackage of {len} bytes; at most {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A package did not pass validation.
    #[error("invalid KeyPackage: {0}")]
    Invalid(String),
    /// An ordinary package has the last-resort extension, or the last-resort one lacks it.
    #[error("KeyPackage in the wrong place: {0}")]
    WrongKind(&'static str),
    /// A one-time package is already in the pool or twice in the upload: handing out both copies
    /// would give two peers the same init key.
    #[error("a KeyPackage is already in the pool or appears twice; upload each package once")]
    Duplicate,
}

/// A fetch refused by the rate limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many KeyPackage fetches; retry in {retry_after:?}")]
pub struct RateLimited {
    /// When the next fetch will be allowed.
    pub retry_after: Duration,
}

/// One device's answer in a fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// A package; `last_resort` if the pool was empty and the last-resort package was used.
    Package {
        /// Whose package.
        device: DeviceId,
        /// The package bytes.
        package: Bytes,
        /// True if this is the device's last-resort package.
        last_resort: bool,
    },
    /// The device has no package left at all.
    Exhausted(DeviceId),
}

#[derive(Clone, Debug, Default)]
struct Pool {
    packages: BTreeMap<u64, Bytes>,
    next_slot: u64,
    last_resort: Option<Bytes>,
}

/// The KeyPackage pools of every device served by one gateway.
#[derive(Clone, Debug, Default)]
pub struct KeyPackageDirectory {
    config: DirectoryConfig,
    pools: BTreeMap<DeviceId, Pool>,
    /// GCRA theoretical arrival time per requester.
    tat: BTreeMap<DeviceId, Instant>,
}

fn package_key(device: DeviceId, slot: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(24);
    key.extend_from_slice(&device.to_bytes());
    key.extend_from_slice(&slot.to_be_bytes());
    key
}

impl KeyPackageDirectory {
    /// An empty directory.
    pub fn new(config: DirectoryConfig) -> KeyPackageDirectory {
        KeyPackageDirectory {
            config,
            pools: BTreeMap::new(),
            tat: BTreeMap::new(),
        }
    }

    /// The limits in force.
    pub fn config(&self) -> &DirectoryConfig {
        &self.config
    }

    /// Ordinary packages `device` has left.
    pub fn remaining(&self, device: DeviceId) -> usize {
        self.pools.get(&device).map_or(0, |p| p.packages.len())
    }

    /// True if `device` has a last-resort package.
    pub fn has_last_resort(&self, device: DeviceId) -> bool {
        self.pools
            .get(&device)
            .is_some_and(|p| p.last_resort.is_some())
    }

    /// Adds `packages` (and optionally a new last-resort package) to `device`'s pool, all or
    /// nothing. Returns the number of ordinary packages it now has.
    pub fn upload(
        &mut self,
        device: DeviceId,
        packages: Vec<Bytes>,
        last_resort: Option<Bytes>,
        validate: &dyn Fn(&[u8]) -> Result<PackageKind, String>,
        batch: &mut WriteBatch,
    ) -> Result<usize, UploadError> {
        let max = self.config.upload_max;
        if packages.len() > max {
            return Err(UploadError::TooMany {
                count: packages.len(),
                max,
            });
        }
        let would_hold = self.remaining(device) + packages.len();
        if would_hold > self.config.pool_max {
            return Err(UploadError::PoolFull {
                would_hold,
                max: self.config.pool_max,
            });
        }
        for package in packages.iter().chain(last_resort.iter()) {
            if package.len() > self.config.package_bytes_max {
                return Err(UploadError::TooLarge {
                    len: package.len(),
                    max: self.config.package_bytes_max,
                });
            }
        }
        let pool = self.pools.get(&device);
        for (i, package) in packages.iter().enumerate() {
            let in_pool = pool.is_some_and(|p| p.packages.values().any(|q| q == package));
            if in_pool || packages[..i].contains(package) {
                return Err(UploadError::Duplicate);
            }
        }
        for package in &packages {
            match validate(package).map_err(UploadError::Invalid)? {
                PackageKind::OneTime => {}
                PackageKind::LastResort => {
                    return Err(UploadError::WrongKind(
                        "a last-resort package was sent as a one-time package",
                    ))
                }
            }
        }
        if let Some(package) = &last_resort {
            if validate(package).map_err(UploadError::Invalid)? != PackageKind::LastResort {
                return Err(UploadError::WrongKind(
                    "the last-resort package lacks the last-resort extension",
                ));
            }
        }
        let pool = self.pools.entry(device).or_default();
        for package in packages {
            let slot = pool.next_slot;
            pool.next_slot += 1;
            debug_assert!(pool.next_slot < LAST_RESORT_SLOT);
            batch.put(
                KEY_PACKAGES_TABLE,
                package_key(device, slot),
                package.to_vec(),
            );
            pool.packages.insert(slot, package);
        }
        if let Some(package) = last_resort {
            batch.put(
                KEY_PACKAGES_TABLE,
                package_key(device, LAST_RESORT_SLOT),
                package.to_vec(),
            );
            pool.last_resort = Some(package);
        }
        Ok(pool.packages.len())
    }

    /// Charges `requester` one fetch, or says when it may fetch again.
    pub fn admit_fetch(&mut self, now: Instant, requester: DeviceId) -> Result<(), RateLimited> {
        let interval = self.config.fetch_interval;
        let tolerance = interval * self.config.fetch_burst.saturating_sub(1);
        let tat = self.tat.get(&requester).copied().unwrap_or(now).max(now);
        let allowed_from = tat - tolerance;
        if now < allowed_from {
            return Err(RateLimited {
                retry_after: allowed_from.saturating_since(now),
            });
        }
        self.tat.insert(requester, tat + interval);
        Ok(())
    }

    /// Takes one package for each of `devices` (in the order given). The caller charges the
    /// requester with [`KeyPackageDirectory::admit_fetch`] first.
    pub fn take(&mut self, devices: &[DeviceId], batch: &mut WriteBatch) -> Vec<Fetched> {
        devices
            .iter()
            .map(|&device| {
                let Some(pool) = self.pools.get_mut(&device) else {
                    return Fetched::Exhausted(device);
                };
                if let Some((slot, package)) = pool.packages.pop_first() {
                    batch.delete(KEY_PACKAGES_TABLE, package_key(device, slot));
                    Fetched::Package {
                        device,
                        package,
                        last_resort: false,
                    }
                } else if let Some(package) = &pool.last_resort {
                    Fetched::Package {
                        device,
                        package: package.clone(),
                        last_resort: true,
                    }
                } else {
                    Fetched::Exhausted(device)
                }
            })
            .collect()
    }

    /// Devices whose pool is below the replenish threshold (they are told when they connect
    /// or their pool is drawn on; a pool that stays low means a device that does not refill).
    pub fn pools_low(&self) -> usize {
        self.pools
            .keys()
            .filter(|d| self.needs_replenishing(**d))
            .count()
    }

    /// True if `device` should be told to replenish (its pool is below the threshold).
    pub fn needs_replenishing(&self, device: DeviceId) -> bool {
        self.remaining(device) < self.config.replenish_below
    }

    /// Drops every package of `device` (a removed or revoked device).
    pub fn forget(&mut self, device: DeviceId, batch: &mut WriteBatch) {
        if let Some(pool) = self.pools.remove(&device) {
            for slot in pool.packages.keys() {
                batch.delete(KEY_PACKAGES_TABLE, package_key(device, *slot));
            }
            if pool.last_resort.is_some() {
                batch.delete(KEY_PACKAGES_TABLE, package_key(device, LAST_RESORT_SLOT));
            }
        }
        self.tat.remove(&device);
    }

    /// Restores one stored record during recovery.
    pub fn restore(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if key.len() != 24 || value.is_empty() {
            return Err(StoreError::Corrupt {
                table: KEY_PACKAGES_TABLE.0,
                reason: format!("key {} / value {} bytes", key.len(), value.len()),
            });
        }
        let device = DeviceId::from_bytes(key[..16].try_into().expect("16 bytes"));
        let slot = u64::from_be_bytes(key[16..].try_into().expect("8 bytes"));
        let pool = self.pools.entry(device).or_default();
        let package = Bytes::copy_from_slice(value);
        if slot == LAST_RESORT_SLOT {
            pool.last_resort = Some(package);
        } else {
            pool.packages.insert(slot, package);
            pool.next_slot = pool.next_slot.max(slot + 1);
        }
        Ok(())
    }
}

/// Counters of the KeyPackage service.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KeyPackageStats {
    /// KeyPackages accepted into pools.
    pub uploaded: u64,
    /// KeyPackages handed out (one-time and last-resort).
    pub fetched: u64,
}

/// The directory's protocol: uploads checked with openmls, fetches by user, counts pushed to
/// owners running low.
pub struct KeyPackageService {
    directory: KeyPackageDirectory,
    /// Verifies uploaded KeyPackages; verification draws no randomness.
    crypto: openmls_rust_crypto::RustCrypto,
    stats: KeyPackageStats,
}

impl core::fmt::Debug for KeyPackageService {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KeyPackageService")
            .field("devices", &self.directory.pools.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl KeyPackageService {
    /// An empty directory.
    pub fn new(config: DirectoryConfig) -> KeyPackageService {
        KeyPackageService {
            directory: KeyPackageDirectory::new(config),
            crypto: openmls_rust_crypto::RustCrypto::default(),
            stats: KeyPackageStats::default(),
        }
    }

    /// Reads the pools back.
    pub fn recover(
        config: DirectoryConfig,
        store: &dyn crate::env::StoreRead,
    ) -> Result<KeyPackageService, StoreError> {
        let mut service = KeyPackageService::new(config);
        crate::env::scan_all(store, KEY_PACKAGES_TABLE, |key, value| {
            service.directory.restore(key, value)
        })?;
        Ok(service)
    }

    /// The pools.
    pub fn directory(&self) -> &KeyPackageDirectory {
        &self.directory
    }

    /// Tests: the pools, to fill without real KeyPackages.
    #[cfg(test)]
    pub(crate) fn directory_mut(&mut self) -> &mut KeyPackageDirectory {
        &mut self.directory
    }

    /// Counters.
    pub fn stats(&self) -> &KeyPackageStats {
        &self.stats
    }

    /// Forgets a revoked device's packages: nobody may add it to a group again.
    pub fn forget(&mut self, device: DeviceId, writes: &mut WriteBatch) {
        self.directory.forget(device, writes);
    }

    /// Tells a device how many KeyPackages it has left.
    pub fn send_count(&self, conn: ConnectionId, device: DeviceId, fx: &mut Fx) {
        let count = KeyPackageCount {
            remaining: u32::try_from(self.directory.remaining(device)).unwrap_or(u32::MAX),
            last_resort: self.directory.has_last_resort(device),
            replenish_below: u32::try_from(self.directory.config().replenish_below)
                .unwrap_or(u32::MAX),
        };
        fx.send(conn, Routing::default(), Payload::KeyPackageCount(count));
    }

    /// A device uploads packages: all are checked (well formed, Sund's ciphersuite, the
    /// uploading device's), then kept, or none is.
    pub fn upload(
        &mut self,
        conn: ConnectionId,
        device: DeviceId,
        upload: KeyPackageUpload,
        fx: &mut Fx,
    ) -> Result<(), Refusal> {
        let count = upload.packages.len();
        let packages = upload
            .packages
            .into_iter()
            .map(|p| Bytes::from(Vec::<u8>::from(p)))
            .collect();
        let last_resort = upload.last_resort.map(|p| Bytes::from(Vec::<u8>::from(p)));
        let crypto = &self.crypto;
        let validate = |bytes: &[u8]| crate::mls::key_packages::check(crypto, bytes, device);
        self.directory
            .upload(device, packages, last_resort, &validate, fx.writes())
            .map_err(|e| Refusal::error(ErrorCode::KeyPackageRejected, e.to_string()))?;
        self.stats.uploaded += count as u64;
        self.send_count(conn, device, fx);
        Ok(())
    }

    /// Charges `requester` one fetch (local or of another domain's users), or refuses it
    /// with the fetch's id (`request`, the header's seq) and when to ask again.
    pub fn admit(
        &mut self,
        now: Instant,
        requester: DeviceId,
        request: u64,
    ) -> Result<(), Refusal> {
        self.directory
            .admit_fetch(now, requester)
            .map_err(|limited| {
                let routing = Routing {
                    seq: request,
                    ..Routing::default()
                };
                Refusal::error(ErrorCode::RateLimited, limited.to_string())
                    .in_conversation(routing)
                    .retry_after(limited.retry_after)
            })
    }

    /// Takes one package for each of `targets` (user and device, no device twice): what a
    /// fetch answers, here or to a peer gateway, and the owners whose pool ran low (tell them
    /// with [`KeyPackageService::tell_drained`] after the answer).
    pub fn take(
        &mut self,
        targets: Vec<(UserId, DeviceId)>,
        fx: &mut Fx,
    ) -> (KeyPackages, Vec<DeviceId>) {
        let devices: Vec<DeviceId> = targets.iter().map(|(_, d)| *d).collect();
        let taken = self.directory.take(&devices, fx.writes());
        let mut answer = KeyPackages::default();
        let mut drained = Vec::new();
        for ((user, _), fetched) in targets.into_iter().zip(taken) {
            match fetched {
                Fetched::Package {
                    device,
                    package,
                    last_resort,
                } => {
                    self.stats.fetched += 1;
                    if self.directory.needs_replenishing(device) {
                        drained.push(device);
                    }
                    answer.found.push(FetchedKeyPackage {
                        user: user.to_bytes().into(),
                        device: device.to_bytes().into(),
                        package: package.to_vec().into(),
                        last_resort,
                    });
                }
                Fetched::Exhausted(device) => answer.exhausted.push(device.to_bytes().into()),
            }
        }
        (answer, drained)
    }

    /// Tells each of `owners` online its count: a fetch took its pool below the threshold.
    pub fn tell_drained(
        &self,
        owners: Vec<DeviceId>,
        online: &dyn Fn(DeviceId) -> Option<ConnectionId>,
        fx: &mut Fx,
    ) {
        for owner in owners {
            if let Some(owner_conn) = online(owner) {
                self.send_count(owner_conn, owner, fx);
            }
        }
    }

    /// One KeyPackage per device of each requested user, the requesting device excluded. The
    /// answer (or the refusal) carries the request's id (the header's seq) back; owners whose
    /// pool ran low hear their count.
    #[allow(clippy::too_many_arguments)]
    pub fn fetch(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        requester: DeviceId,
        fetch: KeyPackageFetch,
        request: u64,
        devices_of: &dyn Fn(UserId) -> Vec<DeviceId>,
        online: &dyn Fn(DeviceId) -> Option<ConnectionId>,
        fx: &mut Fx,
    ) -> Result<(), Refusal> {
        self.admit(now, requester, request)?;
        let mut targets: Vec<(UserId, DeviceId)> = Vec::new();
        for user in fetch.users.iter().map(|u| UserId::from_bytes(**u)) {
            for device in devices_of(user) {
                if device != requester && !targets.iter().any(|(_, d)| *d == device) {
                    targets.push((user, device));
                }
            }
        }
        let (answer, drained) = self.take(targets, fx);
        let routing = Routing {
            seq: request,
            ..Routing::default()
        };
        fx.send(conn, routing, Payload::KeyPackages(answer));
        self.tell_drained(drained, online, fx);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{scan_all, MemStore, Store};

    const ALICE: DeviceId = DeviceId(1);
    const BOB: DeviceId = DeviceId(2);
    const MALLORY: DeviceId = DeviceId(9);

    /// Packages are `b"kp..."` (one-time) or `b"lr..."` (last resort); anything else is invalid.
    fn validate(bytes: &[u8]) -> Result<PackageKind, String> {
        match bytes.get(..2) {
            Some(b"kp") => Ok(PackageKind::OneTime),
            Some(b"lr") => Ok(PackageKind::LastResort),
            _ => Err("not a KeyPackage".into()),
        }
    }

    fn kps(prefix: &str, n: usize) -> Vec<Bytes> {
        (0..n)
            .map(|i| Bytes::from(format!("kp-{prefix}-{i}")))
            .collect()
    }

    fn directory() -> KeyPackageDirectory {
        KeyPackageDirectory::new(DirectoryConfig {
            pool_max: 5,
            upload_max: 4,
            package_bytes_max: 64,
            replenish_below: 2,
            fetch_burst: 3,
            fetch_interval: Duration::from_secs(10),
        })
    }

    fn upload(d: &mut KeyPackageDirectory, device: DeviceId, n: usize, lr: bool) -> usize {
        let last = lr.then(|| Bytes::from_static(b"lr-last"));
        d.upload(
            device,
            kps(&device.0.to_string(), n),
            last,
            &validate,
            &mut WriteBatch::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_package_is_handed_out_once_then_the_last_resort_marked_then_exhausted() {
        let mut d = directory();
        assert_eq!(upload(&mut d, BOB, 2, true), 2);
        let mut batch = WriteBatch::default();
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.extend(d.take(&[BOB], &mut batch));
        }
        let packages: Vec<_> = seen
            .iter()
            .map(|f| match f {
                Fetched::Package {
                    package,
                    last_resort,
                    ..
                } => (package.clone(), *last_resort),
                Fetched::Exhausted(_) => panic!("bob has a last resort"),
            })
            .collect();
        assert_eq!(packages[0].0, packages[0].0);
        assert_ne!(
            packages[0].0, packages[1].0,
            "never the same one-time package twice"
        );
        assert!(!packages[0].1 && !packages[1].1);
        assert!(
            packages[2].1 && packages[3].1,
            "then the marked last resort, again"
        );
        assert_eq!(
            d.take(&[ALICE], &mut batch),
            vec![Fetched::Exhausted(ALICE)]
        );
    }

    #[test]
    fn a_fetch_answers_for_every_device_even_when_some_are_exhausted() {
        let mut d = directory();
        upload(&mut d, BOB, 1, false);
        let got = d.take(&[ALICE, BOB], &mut WriteBatch::default());
        assert_eq!(got[0], Fetched::Exhausted(ALICE));
        assert!(
            matches!(&got[1], Fetched::Package { device, last_resort: false, .. } if *device == BOB)
        );
    }

    #[test]
    fn uploads_are_bounded_checked_and_all_or_nothing() {
        let mut d = directory();
        let mut batch = WriteBatch::default();
        let too_many = d.upload(BOB, kps("b", 5), None, &validate, &mut batch);
        assert_eq!(too_many, Err(UploadError::TooMany { count: 5, max: 4 }));
        upload(&mut d, BOB, 4, false);
        let full = d.upload(BOB, kps("c", 2), None, &validate, &mut batch);
        assert_eq!(
            full,
            Err(UploadError::PoolFull {
                would_hold: 6,
                max: 5
            })
        );
        let big = vec![Bytes::from(vec![b'k'; 65])];
        assert!(matches!(
            d.upload(ALICE, big, None, &validate, &mut batch),
            Err(UploadError::TooLarge { len: 65, max: 64 })
        ));
        let mixed = vec![Bytes::from_static(b"kp-ok"), Bytes::from_static(b"garbage")];
        assert!(matches!(
            d.upload(ALICE, mixed, None, &validate, &mut batch),
            Err(UploadError::Invalid(_))
        ));
        let disguised = vec![Bytes::from_static(b"lr-as-one-time")];
        assert!(matches!(
            d.upload(ALICE, disguised, None, &validate, &mut batch),
            Err(UploadError::WrongKind(_))
        ));
        let not_last = Some(Bytes::from_static(b"kp-not-last"));
        assert!(matches!(
            d.upload(ALICE, Vec::new(), not_last, &validate, &mut batch),
            Err(UploadError::WrongKind(_))
        ));
        assert!(batch.is_empty(), "refused uploads write nothing");
        assert_eq!(d.remaining(ALICE), 0);
    }

    #[test]
    fn a_package_already_in_the_pool_or_twice_in_an_upload_is_refused() {
        let mut d = directory();
        let mut batch = WriteBatch::default();
        let same = vec![Bytes::from_static(b"kp-a"), Bytes::from_static(b"kp-a")];
        assert_eq!(
            d.upload(BOB, same, None, &validate, &mut batch),
            Err(UploadError::Duplicate)
        );
        d.upload(
            BOB,
            vec![Bytes::from_static(b"kp-a")],
            None,
            &validate,
            &mut batch,
        )
        .unwrap();
        let again = vec![Bytes::from_static(b"kp-b"), Bytes::from_static(b"kp-a")];
        assert_eq!(
            d.upload(BOB, again, None, &validate, &mut batch),
            Err(UploadError::Duplicate)
        );
        assert_eq!(d.remaining(BOB), 1);
    }

    #[test]
    fn fetches_are_rate_limited_per_requester_with_a_burst() {
        let mut d = directory();
        let t0 = Instant(1_000_000_000);
        for _ in 0..3 {
            d.admit_fetch(t0, MALLORY).unwrap();
        }
        let refused = d.admit_fetch(t0, MALLORY).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(10));
        d.admit_fetch(t0, ALICE)
            .expect("another requester has its own budget");
        d.admit_fetch(t0 + Duration::from_secs(10), MALLORY)
            .expect("one more after the interval");
        assert!(d
            .admit_fetch(t0 + Duration::from_secs(10), MALLORY)
            .is_err());
        d.admit_fetch(t0 + Duration::from_secs(60), MALLORY)
            .unwrap();
    }

    #[test]
    fn the_owner_is_asked_to_replenish_below_the_threshold() {
        let mut d = directory();
        upload(&mut d, BOB, 3, false);
        assert!(!d.needs_replenishing(BOB));
        d.take(&[BOB, BOB], &mut WriteBatch::default());
        assert!(d.needs_replenishing(BOB));
    }

    #[test]
    fn pools_survive_recovery_and_taken_packages_stay_taken() {
        let mut d = directory();
        let mut store = MemStore::default();
        let mut batch = WriteBatch::default();
        d.upload(
            BOB,
            kps("b", 3),
            Some(Bytes::from_static(b"lr-b")),
            &validate,
            &mut batch,
        )
        .unwrap();
        let taken = d.take(&[BOB], &mut batch);
        store.commit(batch).unwrap();
        let mut back = directory();
        scan_all(&store, KEY_PACKAGES_TABLE, |k, v| back.restore(k, v)).unwrap();
        assert_eq!(back.remaining(BOB), 2);
        assert!(back.has_last_resort(BOB));
        let next = back.take(&[BOB], &mut WriteBatch::default());
        assert_ne!(next, taken, "the taken package is not handed out again");
        // New uploads after recovery do not overwrite surviving slots.
        let mut batch = WriteBatch::default();
        back.upload(BOB, kps("c", 1), None, &validate, &mut batch)
            .unwrap();
        assert_eq!(back.remaining(BOB), 2);
    }

    #[test]
    fn forgetting_a_device_deletes_its_packages() {
        let mut d = directory();
        let mut store = MemStore::default();
        let mut batch = WriteBatch::default();
        d.upload(
            BOB,
            kps("b", 2),
            Some(Bytes::from_static(b"lr-b")),
            &validate,
            &mut batch,
        )
        .unwrap();
        d.forget(BOB, &mut batch);
        store.commit(batch).unwrap();
        assert_eq!(store.table_len(KEY_PACKAGES_TABLE), 0);
        assert_eq!(
            d.take(&[BOB], &mut WriteBatch::default()),
            vec![Fetched::Exhausted(BOB)]
        );
    }

    #[test]
    fn a_corrupt_record_is_an_error() {
        let mut d = directory();
        assert!(d.restore(&[0; 23], b"kp").is_err());
        assert!(d.restore(&[0; 24], b"").is_err());
    }
}
