//! Conversations that span domains (issue 15, step 3): which conversations this gateway is
//! the authority of and which other domains have members in them, and which it keeps a
//! replica of for its own devices, and whose authority that is.
//!
//! One authority per conversation: its home gateway sequences every message. A member
//! gateway relays its devices' messages there ([`crate::federation::entry::Entry::Relay`]),
//! receives every sequenced message in order ([`crate::federation::entry::Entry::Sequenced`])
//! into a replica of the log, and serves its devices from it with the usual windows, cursors
//! and replay. This module only keeps the roles, durably; the gateway routes by them.

use std::collections::{BTreeMap, BTreeSet};

use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, MsgId};

/// One row per conversation spanning domains: key conversation (16); value
/// `0 | domain` for a replica (the authority's domain), or `1 | (domain len u8 | domain |
/// count u32 | devices)*` for a conversation homed here (its members in other domains).
pub const SPANNING_TABLE: Table = Table("spanning_conversations");

/// This gateway's part in a conversation that spans domains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Homed here: this gateway sequences it; these devices of other domains are members,
    /// each domain's gateway keeping a replica.
    Authority(BTreeMap<String, BTreeSet<DeviceId>>),
    /// Homed at the gateway of this domain; this gateway keeps a replica for its devices.
    Replica(String),
}

/// The roles of every conversation spanning domains.
#[derive(Clone, Debug, Default)]
pub struct Spanning {
    roles: BTreeMap<ConversationId, Role>,
    /// Messages relayed to their authority and not answered yet (in memory: after a restart
    /// a device's next copy is relayed again, and the authority answers both).
    pending: BTreeSet<(ConversationId, DeviceId, MsgId)>,
}

impl Spanning {
    /// Reads the roles back from `store`.
    pub fn recover(store: &dyn StoreRead) -> Result<Spanning, StoreError> {
        let mut roles = BTreeMap::new();
        scan_all(store, SPANNING_TABLE, |key, value| {
            let corrupt = || StoreError::Corrupt {
                table: SPANNING_TABLE.0,
                reason: "a role that does not decode".into(),
            };
            let key: [u8; 16] = key.try_into().map_err(|_| corrupt())?;
            let role = decode_role(value).ok_or_else(corrupt)?;
            roles.insert(ConversationId::from_bytes(key), role);
            Ok(())
        })?;
        Ok(Spanning {
            roles,
            pending: BTreeSet::new(),
        })
    }

    /// The domain whose gateway sequences `conv`, if this gateway keeps a replica of it.
    pub fn authority_of(&self, conv: ConversationId) -> Option<&str> {
        match self.roles.get(&conv) {
            Some(Role::Replica(domain)) => Some(domain),
            _ => None,
        }
    }

    /// The other domains with members in `conv`, if it is homed here and spans domains.
    pub fn foreign_domains(&self, conv: ConversationId) -> impl Iterator<Item = &str> + '_ {
        let members = match self.roles.get(&conv) {
            Some(Role::Authority(members)) => Some(members),
            _ => None,
        };
        members
            .into_iter()
            .flat_map(|m| m.keys().map(String::as_str))
    }

    /// True if `device` of `domain` is a member of `conv`, homed here.
    pub fn is_foreign_member(&self, conv: ConversationId, domain: &str, device: DeviceId) -> bool {
        matches!(
            self.roles.get(&conv),
            Some(Role::Authority(members)) if members.get(domain).is_some_and(|d| d.contains(&device))
        )
    }

    /// The role of `conv`, if it spans domains.
    pub fn role(&self, conv: ConversationId) -> Option<&Role> {
        self.roles.get(&conv)
    }

    /// True if this message was relayed and its answer has not come back.
    pub fn relay_pending(&self, conv: ConversationId, device: DeviceId, msg_id: MsgId) -> bool {
        self.pending.contains(&(conv, device, msg_id))
    }

    /// This message was relayed to its authority.
    pub fn relayed(&mut self, conv: ConversationId, device: DeviceId, msg_id: MsgId) {
        self.pending.insert((conv, device, msg_id));
    }

    /// The authority answered this message.
    pub fn answered(&mut self, conv: ConversationId, device: DeviceId, msg_id: MsgId) {
        self.pending.remove(&(conv, device, msg_id));
    }

    /// How many conversations span domains, as authority and as replica.
    pub fn counts(&self) -> (usize, usize) {
        let homed = self
            .roles
            .values()
            .filter(|r| matches!(r, Role::Authority(_)))
            .count();
        (homed, self.roles.len() - homed)
    }

    /// `conv`, homed here, gets these members of `domain`. Returns false (and changes nothing)
    /// if `conv` is a replica here: only its authority shares it.
    pub fn share(
        &mut self,
        conv: ConversationId,
        domain: &str,
        devices: &[DeviceId],
        writes: &mut WriteBatch,
    ) -> bool {
        let role = self
            .roles
            .entry(conv)
            .or_insert_with(|| Role::Authority(BTreeMap::new()));
        let Role::Authority(members) = role else {
            return false;
        };
        members
            .entry(domain.to_string())
            .or_default()
            .extend(devices.iter().copied());
        writes.put(SPANNING_TABLE, conv.to_bytes().to_vec(), encode_role(role));
        true
    }

    /// `conv` is homed at `authority`'s gateway; this one keeps a replica. Returns false (and
    /// changes nothing) if `conv` is known here under another role or authority.
    pub fn follow(
        &mut self,
        conv: ConversationId,
        authority: &str,
        writes: &mut WriteBatch,
    ) -> bool {
        match self.roles.get(&conv) {
            Some(Role::Replica(domain)) => domain == authority,
            Some(Role::Authority(_)) => false,
            None => {
                let role = Role::Replica(authority.to_string());
                writes.put(SPANNING_TABLE, conv.to_bytes().to_vec(), encode_role(&role));
                self.roles.insert(conv, role);
                true
            }
        }
    }
}

fn encode_role(role: &Role) -> Vec<u8> {
    let mut out = Vec::new();
    match role {
        Role::Replica(domain) => {
            out.push(0);
            out.extend_from_slice(domain.as_bytes());
        }
        Role::Authority(members) => {
            out.push(1);
            for (domain, devices) in members {
                assert!(domain.len() <= usize::from(u8::MAX), "domains are short");
                out.push(domain.len() as u8);
                out.extend_from_slice(domain.as_bytes());
                out.extend_from_slice(&(devices.len() as u32).to_be_bytes());
                for device in devices {
                    out.extend_from_slice(&device.to_bytes());
                }
            }
        }
    }
    out
}

fn decode_role(value: &[u8]) -> Option<Role> {
    let (&kind, mut rest) = value.split_first()?;
    match kind {
        0 => Some(Role::Replica(String::from_utf8(rest.to_vec()).ok()?)),
        1 => {
            let mut members = BTreeMap::new();
            while let Some((&len, tail)) = rest.split_first() {
                let len = usize::from(len);
                let domain = String::from_utf8(tail.get(..len)?.to_vec()).ok()?;
                let count = u32::from_be_bytes(tail.get(len..len + 4)?.try_into().ok()?) as usize;
                let start = len + 4;
                let end = start.checked_add(count.checked_mul(16)?)?;
                let devices = tail
                    .get(start..end)?
                    .chunks_exact(16)
                    .map(|c| DeviceId::from_bytes(c.try_into().expect("16 bytes")))
                    .collect();
                members.insert(domain, devices);
                rest = &tail[end..];
            }
            Some(Role::Authority(members))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{commit_durably, MemStore};

    #[test]
    fn roles_survive_a_restart_and_do_not_change_hands() {
        let mut spanning = Spanning::default();
        let mut writes = WriteBatch::default();
        let homed = ConversationId(1);
        let followed = ConversationId(2);
        assert!(spanning.share(homed, "b.example", &[DeviceId(7), DeviceId(8)], &mut writes));
        assert!(spanning.share(homed, "c.example", &[DeviceId(9)], &mut writes));
        assert!(spanning.follow(followed, "b.example", &mut writes));
        // Only the authority shares; a replica follows one authority.
        assert!(!spanning.share(followed, "c.example", &[DeviceId(1)], &mut writes));
        assert!(!spanning.follow(followed, "c.example", &mut writes));
        assert!(!spanning.follow(homed, "b.example", &mut writes));
        assert!(spanning.follow(followed, "b.example", &mut writes));

        let mut store = MemStore::default();
        commit_durably(&mut store, writes).expect("commits");
        let back = Spanning::recover(&store).expect("reads");
        assert_eq!(back.roles, spanning.roles);
        assert_eq!(back.authority_of(followed), Some("b.example"));
        assert_eq!(back.authority_of(homed), None);
        assert!(back.is_foreign_member(homed, "b.example", DeviceId(8)));
        assert!(!back.is_foreign_member(homed, "c.example", DeviceId(8)));
        assert_eq!(
            back.foreign_domains(homed).collect::<Vec<_>>(),
            ["b.example", "c.example"]
        );
        assert_eq!(back.counts(), (1, 1));
    }

    #[test]
    fn a_damaged_row_is_refused_not_misread() {
        for value in [
            &[][..],
            &[2][..],
            &[1, 9, b'a'][..],
            &[1, 1, b'a', 0, 0, 0, 2][..],
        ] {
            assert_eq!(decode_role(value), None, "{value:?}");
        }
    }
}
