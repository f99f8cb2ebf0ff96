//! Contacts across domains: telling a peer gateway that one of this domain's users added, or
//! stopped adding, one of its users, and taking what peers tell of theirs.
//!
//! Each gateway keeps its own users' relations and a mirror of what other domains' users did
//! toward them ([`super::social`], "Across domains"): mutuality, requests and blocks then work
//! as at home. What crosses the link is the state of one add after a change
//! ([`Entry::Contact`]) and of one block ([`Entry::Block`], after the withdrawn add). The
//! blocked user's gateway keeps the block to enforce it as it would its own user's: its
//! authority refuses a commit by the blocked user adding the blocker (with KeyPackages
//! fetched before the block), and its rule hides the blocker's presence. It never shows the
//! block to the blocked user's devices: their listing shows only that the add is gone, and
//! an invitation is refused in the same words as at home.
//!
//! Whose word counts: a device names another domain's user by the whole address and sends
//! the domain with the id it computed, so its statement fixes that user's domain here. A peer
//! speaks only for users of its own domain, to users of this one: what it says about a user
//! who has devices here or was named at another domain, or to a user known to be of another
//! domain, is dropped and counted, as are requests past the foreign user's request rate and
//! users past [`FOREIGN_USERS_PER_PEER_MAX`] for the peer. A request to a user who has no
//! device here yet is kept: it is theirs to see when their first device comes.

use super::social::FOREIGN_USERS_PER_PEER_MAX;
use super::{Gateway, Refusal};
use crate::federation::entry::Entry;
use crate::ids::UserId;
use crate::time::Instant;
use crate::trust::valid_domain;
use crate::wire::payload::{ContactAction, ErrorCode};

impl Gateway {
    /// The domain of `other` if it is a user of another domain: the one the device named
    /// (`named`), else the one this gateway knows them by. An add needs a peer this gateway
    /// federates with; a remove or block is taken here whatever the domain.
    pub(super) fn contact_domain(
        &self,
        other: UserId,
        named: Option<&str>,
        action: ContactAction,
    ) -> Result<Option<String>, Refusal> {
        let domain = match named {
            Some(domain) if !valid_domain(domain) => {
                return Err(Refusal::error(
                    ErrorCode::MalformedFrame,
                    "the contact's domain is not a valid domain name",
                ));
            }
            Some(domain) if domain == self.config.domain => return Ok(None),
            Some(domain) => domain,
            None => match self.social.domain_of(other) {
                Some(domain) => domain,
                None => return Ok(None),
            },
        };
        let peer = self.federation.as_ref().is_some_and(|f| f.is_peer(domain));
        if action == ContactAction::Add && !peer {
            return Err(Refusal::error(
                ErrorCode::UnknownDomain,
                format!(
                    "this gateway does not federate with {domain}: contacts with its users need its operator to add {domain} as a federation peer"
                ),
            ));
        }
        Ok(Some(domain.to_string()))
    }

    /// After `user` changed their relation to `other`, a user of `domain`: records that
    /// domain as the device named it, and tells that domain's gateway if the add or the block
    /// changed (`was_added`, `was_blocked`: before the change), the add first.
    pub(super) fn tell_contact_abroad(
        &mut self,
        domain: &str,
        user: UserId,
        other: UserId,
        was_added: bool,
        was_blocked: bool,
    ) {
        self.social.note_domain(other, domain, self.fx.writes());
        let added = self.social.added(user, other);
        let blocked = self.social.blocked(user, other);
        let mut entries = Vec::new();
        if added != was_added {
            entries.push(Entry::Contact {
                from: user,
                to: other,
                added,
            });
        }
        if blocked != was_blocked {
            entries.push(Entry::Block {
                from: user,
                to: other,
                blocked,
            });
        }
        for entry in entries {
            // A domain that is no longer a peer is not told: its users' adds of this user
            // stay as they were told, and this user's listing shows the request as still
            // theirs.
            if self.send_entry(domain, &entry).is_ok() {
                self.social.count_told_abroad();
            }
        }
    }

    /// True if what `peer` says `from` did toward `to` is to be dropped: `peer` speaks only
    /// for users of its own domain, to users of this one (see the module docs).
    fn not_theirs_to_say(&self, peer: &str, from: UserId, to: UserId) -> bool {
        let ours = self.registry.devices_of(from).next().is_some();
        let known_from = self.social.domain_of(from);
        let claimed_elsewhere = known_from.is_some_and(|d| d != peer);
        let to_abroad = self.social.domain_of(to).is_some();
        let full =
            known_from.is_none() && self.social.foreign_users(peer) >= FOREIGN_USERS_PER_PEER_MAX;
        ours || claimed_elsewhere || to_abroad || from == to || full
    }

    /// `peer` says that `from`, a user of its domain, now adds `to` or no longer does
    /// ([`Entry::Contact`]: `Add` or `Remove`), or blocks them or no longer does
    /// ([`Entry::Block`]: `Block` or `Unblock`, after the withdrawn add).
    pub(super) fn on_relation_entry(
        &mut self,
        now: Instant,
        peer: &str,
        from: UserId,
        to: UserId,
        action: ContactAction,
    ) {
        if self.not_theirs_to_say(peer, from, to) {
            self.social.count_dropped_from_abroad();
            return;
        }
        if action == ContactAction::Add
            && !self.social.added(from, to)
            && self.limits.admit_contact_request(now, from).is_err()
        {
            self.social.count_dropped_from_abroad();
            return;
        }
        self.social.note_domain(from, peer, self.fx.writes());
        let max = self.config.limits.contacts_max as usize;
        match self.social.change(from, to, action, max, self.fx.writes()) {
            Ok(changed) => {
                self.social.count_taken_from_abroad();
                if !changed.changed {
                    return;
                }
                // A block is not shown to `to`; the add it withdrew came by its own entry.
                if matches!(action, ContactAction::Add | ContactAction::Remove) {
                    self.tell_contacts(to, None);
                }
                // Watchers of either may see something else now: `to`'s, here and abroad
                // (this gateway decides), and `from`'s here.
                self.presence.push(now, to, &self.social, &mut self.fx);
                self.presence.push(now, from, &self.social, &mut self.fx);
            }
            Err(_) => self.social.count_dropped_from_abroad(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_pair::{frames, Pair, NOW};
    use super::super::GatewayInput;
    use crate::federation::entry::Entry;
    use crate::ids::{ConnectionId, UserId};
    use crate::testing::drain_gateway;
    use crate::wire::payload::{ContactAction, ContactChange, Contacts, ErrorCode, Payload};
    use crate::wire::{Frame, Routing};

    fn alice() -> UserId {
        UserId::of("alice", "a.example")
    }

    fn bob() -> UserId {
        UserId::of("bob", "b.example")
    }

    fn carol() -> UserId {
        UserId::of("carol", "c.example")
    }

    /// `user`'s device at gateway `at` (session on `conn`) changes its relation to `other`,
    /// naming `domain`; the gateway's answer.
    fn change(
        w: &mut Pair,
        at: usize,
        conn: ConnectionId,
        other: UserId,
        domain: Option<&str>,
        action: ContactAction,
    ) -> Payload {
        let change = ContactChange {
            user: other.to_bytes().into(),
            action: action as u8,
            domain: domain.map(str::to_string),
        };
        let frame = Frame::new(
            Routing {
                seq: 1 << 63 | 7,
                ..Routing::default()
            },
            Payload::ContactChange(change),
        );
        let (g, store) = &mut w.gateways[at];
        g.handle(NOW, GatewayInput::Frame(conn, frame.encode()));
        frames(&drain_gateway(g, store), conn)
            .into_iter()
            .find(|p| matches!(p, Payload::Contacts(_) | Payload::Error(_)))
            .expect("answered")
    }

    fn listing(answer: Payload) -> Contacts {
        match answer {
            Payload::Contacts(c) => c,
            other => panic!("not a listing: {other:?}"),
        }
    }

    fn ids(users: &[UserId]) -> Vec<minicbor::bytes::ByteArray<16>> {
        users.iter().map(|u| u.to_bytes().into()).collect()
    }

    #[test]
    fn a_request_across_domains_is_seen_accepted_blocked_and_unblocked_on_both_sides() {
        let mut w = Pair::new();
        let (a_conn, a_device) = w.open_session(0, 1, alice());
        let (b_conn, _) = w.open_session(1, 2, bob());
        // alice asks bob: her gateway tells his.
        let asked = listing(change(
            &mut w,
            0,
            a_conn,
            bob(),
            Some("b.example"),
            ContactAction::Add,
        ));
        assert_eq!(asked.outgoing, ids(&[bob()]));
        let told = w.settle();
        assert!(
            told.iter().flat_map(|e| e.clone().into_entries()).any(|e| e
                == Entry::Contact {
                    from: alice(),
                    to: bob(),
                    added: true
                }),
            "{told:?}"
        );
        // bob's device heard of the request unasked, and accepts by id alone: his gateway
        // knows alice's domain from the request.
        let heard = frames(&w.released[1], b_conn);
        assert!(
            heard
                .iter()
                .any(|p| matches!(p, Payload::Contacts(c) if c.incoming == ids(&[alice()]))),
            "{heard:?}"
        );
        let accepted = listing(change(&mut w, 1, b_conn, alice(), None, ContactAction::Add));
        assert_eq!(accepted.contacts, ids(&[alice()]));
        w.settle();
        let (g, _) = &w.gateways[0];
        assert!(g.social.mutual(alice(), bob()));
        assert_eq!(g.social.domain_of(bob()), Some("b.example"));
        assert_eq!(g.social.stats().taken_from_abroad, 1);
        // bob blocks alice: her gateway learns only that his add is gone.
        change(&mut w, 1, b_conn, alice(), None, ContactAction::Block);
        let told = w.settle();
        assert!(
            told.iter().flat_map(|e| e.clone().into_entries()).any(|e| e
                == Entry::Contact {
                    from: bob(),
                    to: alice(),
                    added: false
                }),
            "{told:?}"
        );
        assert!(
            told.iter().flat_map(|e| e.clone().into_entries()).any(|e| e
                == Entry::Block {
                    from: bob(),
                    to: alice(),
                    blocked: true
                }),
            "{told:?}"
        );
        let (g, _) = &mut w.gateways[0];
        assert!(!g.social.mutual(alice(), bob()));
        assert_eq!(g.social.listing(alice()).outgoing, ids(&[bob()]));
        assert!(g.social.listing(alice()).blocked.is_empty());
        // Her gateway keeps the block to enforce it: a commit of hers adding bob (with
        // KeyPackages fetched before the block) is refused in the words used at home.
        assert!(g.social.blocked(bob(), alice()));
        let adds_bob = crate::gateway::groups::Change {
            added: vec![(crate::ids::DeviceId::from_bytes([9; 16]), bob(), None)],
            removed: vec![],
            roles: vec![],
        };
        let conv = crate::ids::ConversationId::from_bytes([7; 16]);
        let msg = crate::ids::MsgId::from_bytes([1; 16]);
        let refused = g
            .admit_invitations(NOW, a_device, conv, msg, &adds_bob)
            .unwrap_err();
        assert_eq!(refused.code(), ErrorCode::Forbidden);
        // A repeat of the block tells nothing more.
        change(&mut w, 1, b_conn, alice(), None, ContactAction::Block);
        assert!(w.settle().is_empty());
        // The unblock crosses too: the invitation passes again.
        change(&mut w, 1, b_conn, alice(), None, ContactAction::Unblock);
        w.settle();
        let (g, _) = &mut w.gateways[0];
        assert!(!g.social.blocked(bob(), alice()));
        g.admit_invitations(NOW, a_device, conv, msg, &adds_bob)
            .unwrap();
    }

    #[test]
    fn an_add_for_a_domain_not_federated_with_is_refused_and_a_block_is_taken() {
        let mut w = Pair::new();
        let (a_conn, _) = w.open_session(0, 1, alice());
        match change(
            &mut w,
            0,
            a_conn,
            carol(),
            Some("c.example"),
            ContactAction::Add,
        ) {
            Payload::Error(e) => assert_eq!(ErrorCode::from_u16(e.code), ErrorCode::UnknownDomain),
            other => panic!("not refused: {other:?}"),
        }
        let blocked = listing(change(
            &mut w,
            0,
            a_conn,
            carol(),
            Some("c.example"),
            ContactAction::Block,
        ));
        assert_eq!(blocked.blocked, ids(&[carol()]));
        assert!(w.settle().is_empty(), "nothing to tell");
        match change(
            &mut w,
            0,
            a_conn,
            bob(),
            Some("not a domain"),
            ContactAction::Add,
        ) {
            Payload::Error(e) => assert_eq!(ErrorCode::from_u16(e.code), ErrorCode::MalformedFrame),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_peer_speaks_only_for_its_own_users_to_users_of_this_domain() {
        let mut w = Pair::new();
        let (a_conn, _) = w.open_session(0, 1, alice());
        // alice names carol as a user of c.example.
        change(
            &mut w,
            0,
            a_conn,
            carol(),
            Some("c.example"),
            ContactAction::Block,
        );
        let lies = [
            // carol, whom alice's device named at c.example.
            Entry::Contact {
                from: carol(),
                to: alice(),
                added: true,
            },
            // alice herself, a user with devices at a.example.
            Entry::Contact {
                from: alice(),
                to: alice(),
                added: true,
            },
            // to carol, a user of c.example.
            Entry::Contact {
                from: bob(),
                to: carol(),
                added: true,
            },
            // to itself.
            Entry::Contact {
                from: bob(),
                to: bob(),
                added: true,
            },
            // a block by carol, whom alice's device named at c.example.
            Entry::Block {
                from: carol(),
                to: alice(),
                blocked: true,
            },
        ];
        let (g, store) = &mut w.gateways[0];
        for lie in lies {
            g.handle_entry(NOW, "b.example", lie);
            drain_gateway(g, store);
        }
        assert_eq!(g.social.stats().dropped_from_abroad, 5);
        assert!(!g.social.blocked(carol(), alice()));
        assert_eq!(g.social.stats().taken_from_abroad, 0);
        let list = g.social.listing(alice());
        assert!(
            list.incoming.is_empty() && list.contacts.is_empty(),
            "{list:?}"
        );
        assert_eq!(g.social.domain_of(carol()), Some("c.example"));
        assert_eq!(g.social.domain_of(bob()), None);
        assert_eq!(g.social.foreign_users("b.example"), 0);
        assert_eq!(g.social.foreign_users("c.example"), 1);
    }

    #[test]
    fn a_request_to_a_user_without_a_device_yet_waits_for_their_first_device() {
        let mut w = Pair::new();
        let (b_conn, _) = w.open_session(1, 2, bob());
        change(
            &mut w,
            1,
            b_conn,
            alice(),
            Some("a.example"),
            ContactAction::Add,
        );
        w.settle();
        // alice's first device comes after the request: it is hers to see.
        let (a_conn, _) = w.open_session(0, 1, alice());
        let list = listing(change(&mut w, 0, a_conn, bob(), None, ContactAction::Add));
        assert_eq!(list.contacts, ids(&[bob()]));
        w.settle();
        let (g, _) = &w.gateways[1];
        assert!(g.social.mutual(alice(), bob()));
    }

    #[test]
    fn what_a_device_names_outranks_a_peer_that_claimed_the_user_first() {
        let mut w = Pair::new();
        let (a_conn, _) = w.open_session(0, 1, alice());
        // b.example claims carol (of c.example) asked alice.
        let (g, store) = &mut w.gateways[0];
        g.handle_entry(
            NOW,
            "b.example",
            Entry::Contact {
                from: carol(),
                to: alice(),
                added: true,
            },
        );
        drain_gateway(g, store);
        assert_eq!(g.social.listing(alice()).incoming, ids(&[carol()]));
        // alice's device names carol at c.example: the claim from b.example goes.
        let list = listing(change(
            &mut w,
            0,
            a_conn,
            carol(),
            Some("c.example"),
            ContactAction::Block,
        ));
        assert!(list.incoming.is_empty(), "{list:?}");
        let (g, _) = &w.gateways[0];
        assert_eq!(g.social.domain_of(carol()), Some("c.example"));
        assert!(!g.social.added(carol(), alice()));
    }

    #[test]
    fn foreign_adds_and_their_domain_survive_a_restart() {
        let mut w = Pair::new();
        let (a_conn, _) = w.open_session(0, 1, alice());
        w.open_session(1, 2, bob());
        change(
            &mut w,
            0,
            a_conn,
            bob(),
            Some("b.example"),
            ContactAction::Add,
        );
        w.settle();
        let (g, store) = &w.gateways[1];
        let recovered = super::super::social::Social::recover(store).unwrap();
        assert_eq!(recovered.domain_of(alice()), Some("a.example"));
        assert_eq!(recovered.foreign_users("a.example"), 1);
        assert!(recovered.added(alice(), bob()));
        assert_eq!(recovered.listing(bob()), g.social.listing(bob()));
    }
}
