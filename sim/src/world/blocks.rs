//! The `blocks-hold` invariant: no gateway lets a commit add a device of a user who blocked
//! the committer's user, once it knows of the block.
//!
//! Judged from outside, on what each gateway makes durable, against what it had made durable
//! before (its disk): a gateway's memory holds at least that, so a block on its disk is one it
//! knew when it handled the input. Two places, where the model's rules put the checks:
//!
//! - **Sequencing.** A log entry a gateway writes for a message it sequences now (not a
//!   replica of another domain's authority, nor a copy a handover brought: its acceptance time
//!   is the gateway's clock at this step) that is an MLS commit adding a device of user X,
//!   sent by a device of user Y, while the gateway's social records say X blocked Y.
//! - **Relaying.** A relay a gateway writes to a link outbox of such a commit, under the same
//!   condition: the blocked user's own gateway is told of blocks by other domains' users, and
//!   the home of a room of a third domain never is.
//!
//! A block the gateway had not yet made durable, or not yet heard of over a link, is not held
//! against it: the link's delay, as for presence. The KeyPackage directories withholding a
//! blocker's packages are checked through the same rule, end to end: a commit built from
//! packages handed out after the block adds the blocker, and is caught here.
//!
//! Every commit adding a device that a gateway sequences or relays is counted in the report's
//! fault counts (`block-judged`), so a swarm shows how many it judged.

use std::collections::BTreeMap;

use sund_model::env::{StoreRead, WriteBatch, WriteOp};
use sund_model::federation::entry::Entry;
use sund_model::federation::link::FEDERATION_OUTBOX_TABLE;
use sund_model::gateway::sequencer::{decode_entry, LOG_TABLE};
use sund_model::gateway::social::{blocked_in_record, SOCIAL_TABLE};
use sund_model::ids::{DeviceId, UserId};
use sund_model::mls::commit_authority::{read_message, Kind};
use sund_model::mls::group_ops::GroupOps;

use super::{Machine, World};
use crate::network::ActorIndex;
use crate::scenario::Invariant;

/// A commit a gateway wrote: sequenced, or relayed to another domain.
enum Written {
    Sequenced,
    Relayed,
}

/// The device ids a commit adds, if `body` is an MLS commit.
fn added_by(body: &[u8]) -> Vec<DeviceId> {
    let Ok((framing, aad)) = read_message(body) else {
        return Vec::new();
    };
    if framing.kind != Kind::Commit {
        return Vec::new();
    }
    GroupOps::decode(&aad).map_or_else(
        |_| Vec::new(),
        |ops| ops.added_devices().map(|(device, _)| device).collect(),
    )
}

impl World {
    /// `gateway` handed over `writes` at `now` (its clock, µs): every commit in them that it
    /// sequences or relays is checked against the blocks on its disk (with `blocks-hold`).
    pub(super) fn check_blocks_hold(&mut self, gateway: ActorIndex, writes: &WriteBatch) {
        if !self.scenario.invariants.contains(&Invariant::BlocksHold) {
            return;
        }
        let now = self.local_now(gateway);
        let Machine::Gateway(Some(g), _) = &self.actors[gateway as usize].machine else {
            return;
        };
        let mut commits: Vec<(Written, DeviceId, Vec<DeviceId>)> = Vec::new();
        for op in writes.ops() {
            let WriteOp::Put { table, key, value } = op else {
                continue;
            };
            if *table == LOG_TABLE {
                let Ok((conv, entry)) = decode_entry(key, value) else {
                    continue;
                };
                if entry.accepted_at != now || g.replica_of(conv).is_some() {
                    continue; // a replica, or a copy a handover brought
                }
                let added = added_by(&entry.body);
                if !added.is_empty() {
                    commits.push((Written::Sequenced, entry.sender, added));
                }
            } else if *table == FEDERATION_OUTBOX_TABLE {
                let Ok(entry) = Entry::decode(value) else {
                    continue;
                };
                for entry in entry.into_entries() {
                    if let Entry::Relay { sender, body, .. } = entry {
                        let added = added_by(&body);
                        if !added.is_empty() {
                            commits.push((Written::Relayed, sender, added));
                        }
                    }
                }
            }
        }
        if commits.is_empty() {
            return;
        }
        let users: BTreeMap<DeviceId, (UserId, String)> = self
            .devices
            .iter()
            .filter_map(|&d| {
                let user = self.user_id_of(d)?;
                Some((
                    self.actors[d as usize].device,
                    (user, self.name_of_user(user)),
                ))
            })
            .collect();
        let disk = &self.actors[gateway as usize].disk;
        let blocks = |blocker: UserId, blocked: UserId| {
            disk.get(SOCIAL_TABLE, &blocker.to_bytes())
                .ok()
                .flatten()
                .and_then(|value| blocked_in_record(&value).ok())
                .is_some_and(|list| list.contains(&blocked))
        };
        let mut failures = Vec::new();
        let mut judged = 0;
        for (written, sender, added) in commits {
            let Some((inviter, inviter_name)) = users.get(&sender) else {
                continue;
            };
            judged += 1;
            for device in added {
                let Some((user, name)) = users.get(&device) else {
                    continue;
                };
                if user != inviter && blocks(*user, *inviter) {
                    let what = match written {
                        Written::Sequenced => "sequenced",
                        Written::Relayed => "relayed",
                    };
                    failures.push(format!(
                        "{} {what} a commit of {inviter_name} adding a device of {name}, who blocked {inviter_name}, as its own records showed",
                        self.actors[gateway as usize].name
                    ));
                }
            }
        }
        *self.faults.entry("block-judged").or_default() += judged;
        for detail in failures {
            self.checker
                .fail_safety(Invariant::BlocksHold, self.now, detail);
        }
    }
}
