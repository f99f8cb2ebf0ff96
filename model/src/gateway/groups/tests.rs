//! Unit tests of the gateway's view of groups: roles, handover, declarations, records.

use super::*;
use crate::env::WriteOp;
use crate::mls::group_ops::AddedDevice;

fn d(n: u128) -> DeviceId {
    DeviceId(n)
}

fn u(n: u128) -> UserId {
    UserId(n)
}

/// Devices 1x belong to user 1, 2x to user 2, 3x to user 3.
fn user_of(device: DeviceId) -> Option<UserId> {
    Some(u(device.0 / 10))
}

fn ops(added: &[u128], removed: &[u128]) -> GroupOps {
    GroupOps {
        create: None,
        added: added
            .iter()
            .enumerate()
            .map(|(i, n)| AddedDevice::new(d(*n), user_of(d(*n)).unwrap(), i as u32 + 1))
            .collect(),
        removed: removed
            .iter()
            .map(|n| ByteArray::from(d(*n).to_bytes()))
            .collect(),
        roles: Vec::new(),
        domains: None,
        dm_with: None,
        external_sender: None,
    }
}

#[test]
fn a_declaration_naming_more_domains_than_added_devices_is_invalid() {
    use crate::mls::group_ops::AddedDomain;
    let domain = |domain: &str| AddedDomain {
        device: ByteArray::from(d(20).to_bytes()),
        domain: domain.into(),
    };
    let mut declared = ops(&[20], &[]);
    declared.domains = Some(vec![domain("b.example")]);
    assert_eq!(GroupOps::decode(&declared.encode()), Ok(declared.clone()));
    declared.domains = Some(vec![domain("b.example"), domain("c.example")]);
    assert!(matches!(
        GroupOps::decode(&declared.encode()),
        Err(GroupRefusal::Invalid(_))
    ));
    declared.domains = Some(vec![domain(&"a".repeat(254))]);
    assert!(GroupOps::decode(&declared.encode()).is_err());
    // Without other domains' devices the field is left out: the bytes are as before.
    let plain = ops(&[20], &[]);
    assert!(!plain.encode().is_empty());
    assert_eq!(GroupOps::decode(&plain.encode()), Ok(plain));
}

fn room() -> GroupState {
    let mut g = GroupState::create(GroupKind::Room, d(10), u(1));
    let change = g
        .check(d(10), &ops(&[11, 20, 21, 30], &[]), user_of)
        .unwrap();
    g.apply(&change);
    g
}

#[test]
fn owner_adds_anyone_member_only_own_devices() {
    let g = room();
    assert_eq!(g.role(u(2)), Some(Role::Member));
    assert!(g.check(d(20), &ops(&[22], &[]), user_of).is_ok());
    assert!(matches!(
        g.check(d(20), &ops(&[40], &[]), user_of),
        Err(GroupRefusal::Forbidden(_))
    ));
    assert!(matches!(
        g.check(d(20), &ops(&[11], &[]), user_of),
        Err(GroupRefusal::Invalid(_))
    ));
}

#[test]
fn removal_follows_roles() {
    let mut g = room();
    // A member removes its own device, not another user's.
    assert!(g.check(d(20), &ops(&[], &[21]), user_of).is_ok());
    assert!(matches!(
        g.check(d(20), &ops(&[], &[30]), user_of),
        Err(GroupRefusal::Forbidden(_))
    ));
    // An admin removes members but not the owner.
    let promote = GroupOps {
        roles: vec![RoleChange {
            user: ByteArray::from(u(2).to_bytes()),
            role: Role::Admin as u8,
        }],
        ..GroupOps::default()
    };
    assert!(matches!(
        g.check(d(30), &promote, user_of),
        Err(GroupRefusal::Forbidden(_))
    ));
    let change = g.check(d(10), &promote, user_of).unwrap();
    g.apply(&change);
    assert_eq!(g.role(u(2)), Some(Role::Admin));
    assert!(g.check(d(20), &ops(&[], &[30]), user_of).is_ok());
    assert!(matches!(
        g.check(d(20), &ops(&[], &[10]), user_of),
        Err(GroupRefusal::Forbidden(_))
    ));
    // Removing a user's last device drops its role.
    let change = g.check(d(10), &ops(&[], &[30]), user_of).unwrap();
    g.apply(&change);
    assert_eq!(g.role(u(3)), None);
}

#[test]
fn ownership_passes_to_the_earliest_admin_then_the_earliest_member() {
    // Owner user 1; user 3 joins before user 2 (a later commit), so 3 is the elder.
    let mut g = GroupState::create(GroupKind::Room, d(10), u(1));
    let change = g.check(d(10), &ops(&[30], &[]), user_of).unwrap();
    g.apply(&change);
    let change = g.check(d(10), &ops(&[20, 40], &[]), user_of).unwrap();
    g.apply(&change);
    let keep = g.clone();
    // No admin: the owner's only device is revoked (the gateway asks for its removal) and
    // a member commits it; the earliest-joined member, not the smallest id, owns the room.
    assert!(g.propose_removal(d(10)));
    let change = g.check(d(20), &ops(&[], &[10]), user_of).unwrap();
    assert_eq!(g.apply(&change), Some(u(3)));
    assert_eq!(g.role(u(3)), Some(Role::Owner));
    assert_eq!(g.role(u(2)), Some(Role::Member));
    // With admins, the earliest-joined admin comes first, whatever the members' order.
    let mut g = keep;
    let promote = GroupOps {
        roles: [2u128, 4]
            .iter()
            .map(|n| RoleChange {
                user: ByteArray::from(u(*n).to_bytes()),
                role: Role::Admin as u8,
            })
            .collect(),
        ..GroupOps::default()
    };
    let change = g.check(d(10), &promote, user_of).unwrap();
    assert_eq!(g.apply(&change), None, "the owner is still there");
    assert!(g.propose_removal(d(10)));
    let change = g.check(d(30), &ops(&[], &[10]), user_of).unwrap();
    assert_eq!(
        g.apply(&change),
        Some(u(2)),
        "2 and 4 joined in one commit, 2 listed first"
    );
    assert_eq!(g.role(u(2)), Some(Role::Owner));
    assert_eq!(g.role(u(4)), Some(Role::Admin));
    // The join order survives a restart.
    let mut batch = WriteBatch::default();
    g.persist(ConversationId(7), &mut batch);
    let WriteOp::Put { key, value, .. } = &batch.ops()[0] else {
        panic!("a put")
    };
    let (_, back) = GroupState::decode(key, value).unwrap();
    assert_eq!(back, g);
}

#[test]
fn a_dm_holds_two_users() {
    let mut g = GroupState::create(GroupKind::Dm, d(10), u(1));
    let change = g.check(d(10), &ops(&[11, 20, 21], &[]), user_of).unwrap();
    g.apply(&change);
    assert!(matches!(
        g.check(d(20), &ops(&[30], &[]), user_of),
        Err(GroupRefusal::Forbidden(_))
    ));
    // Either user adds a new device of either user; removes only its own.
    assert!(g.check(d(20), &ops(&[12], &[]), user_of).is_ok());
    assert!(g.check(d(20), &ops(&[], &[21]), user_of).is_ok());
    assert!(matches!(
        g.check(d(20), &ops(&[], &[11]), user_of),
        Err(GroupRefusal::Forbidden(_))
    ));
}

#[test]
fn declarations_are_bounded_and_checked() {
    let g = room();
    let two_removes = ops(&[], &[20, 21]).encode();
    assert!(matches!(
        GroupOps::decode(&two_removes),
        Err(GroupRefusal::Invalid(_))
    ));
    assert!(GroupOps::decode(&[0xff, 0x00]).is_err());
    assert_eq!(GroupOps::decode(&[]).unwrap(), GroupOps::default());
    // Unbound device, non-member sender.
    assert!(g.check(d(10), &ops(&[11], &[]), |_| None).is_err());
    assert!(matches!(
        g.check(d(99), &ops(&[], &[]), user_of),
        Err(GroupRefusal::Forbidden(_))
    ));
    // The owner's last device cannot leave while others stay.
    let mut g = room();
    let change = g.check(d(10), &ops(&[], &[11]), user_of).unwrap();
    g.apply(&change);
    assert!(matches!(
        g.check(d(10), &ops(&[], &[10]), user_of),
        Err(GroupRefusal::Forbidden(_))
    ));
}

#[test]
fn records_round_trip() {
    let g = room();
    let mut batch = WriteBatch::default();
    g.persist(ConversationId(5), &mut batch);
    let Some(WriteOp::Put { key, value, .. }) = batch.ops().first().cloned() else {
        panic!("one put");
    };
    let (key, value) = (&key[..], &value[..]);
    let (conv, back) = GroupState::decode(key, value).unwrap();
    assert_eq!(conv, ConversationId(5));
    assert_eq!(back, g);
    assert!(GroupState::decode(key, &[0xa0]).is_err());
    assert!(GroupState::decode(&[1, 2], value).is_err());
}

#[test]
fn each_users_count_of_conversations_follows_its_devices_and_survives_a_restart() {
    use crate::env::{MemStore, Store};
    let mut groups = Groups::default();
    let mut batch = WriteBatch::default();
    // Room 1: users 1, 2 and 3. Room 2: users 1 and 2, then user 2's last device leaves.
    groups.set_state(ConversationId(1), room(), &mut batch);
    let mut g = GroupState::create(GroupKind::Room, d(10), u(1));
    let change = g.check(d(10), &ops(&[20, 21], &[]), user_of).unwrap();
    g.apply(&change);
    groups.set_state(ConversationId(2), g.clone(), &mut batch);
    assert_eq!(
        [1, 2, 3, 4].map(|n| groups.conversations_of(u(n))),
        [2, 2, 1, 0]
    );
    let change = g.check(d(10), &ops(&[], &[20]), user_of).unwrap();
    g.apply(&change);
    groups.set_state(ConversationId(2), g.clone(), &mut batch);
    assert_eq!(
        groups.conversations_of(u(2)),
        2,
        "one device of user 2 is left"
    );
    let change = g.check(d(10), &ops(&[], &[21]), user_of).unwrap();
    g.apply(&change);
    groups.set_state(ConversationId(2), g, &mut batch);
    assert_eq!(
        [1, 2, 3, 4].map(|n| groups.conversations_of(u(n))),
        [2, 1, 1, 0]
    );
    let mut store = MemStore::default();
    store.commit(batch).unwrap();
    let back = Groups::recover(&store).unwrap();
    assert_eq!(back.memberships, groups.memberships);
}

#[test]
fn the_group_of_own_devices_holds_only_its_users_devices() {
    let mut g = GroupState::create(GroupKind::Own, d(10), u(1));
    let change = g.check(d(10), &ops(&[11, 12], &[]), user_of).unwrap();
    g.apply(&change);
    // Nobody else, whoever asks and however few users it holds.
    for device in [10, 11] {
        assert!(matches!(
            g.check(d(device), &ops(&[20], &[]), user_of),
            Err(GroupRefusal::Forbidden(_))
        ));
    }
    assert!(g.check(d(11), &ops(&[13], &[]), user_of).is_ok());
    assert!(g.check(d(11), &ops(&[], &[12]), user_of).is_ok());
    // No roles to set in it.
    let promote = GroupOps {
        roles: vec![RoleChange {
            user: ByteArray::from(u(1).to_bytes()),
            role: Role::Admin as u8,
        }],
        ..GroupOps::default()
    };
    assert!(matches!(
        g.check(d(10), &promote, user_of),
        Err(GroupRefusal::Forbidden(_))
    ));
}

#[test]
fn after_a_handover_every_commit_takes_the_new_external_sender_and_removals_wait_for_it() {
    use crate::testing::TestEntropy;
    let conv = ConversationId(0xC0);
    let key = [7u8; 32];
    let mut state = room();
    state.expect_external_sender(key);
    // The record a handover carries keeps what waits.
    let back = GroupState::decode_record(&state.encode()).unwrap();
    assert_eq!(back, state);
    assert_eq!(back.external_pending(), Some(key));
    let mut groups = Groups::default();
    let mut writes = WriteBatch::default();
    let mut entropy = TestEntropy(5);
    groups.set_state(conv, state.clone(), &mut writes);
    let epoch = state.epoch();
    let commit = |groups: &Groups, ops: &GroupOps, epoch: u64| {
        groups.check_commit(d(20), conv, epoch, ops, None, false, &user_of, None)
    };
    // A member that committed before reading the proposal commits again, after it.
    let refused = commit(&groups, &ops(&[], &[]), epoch);
    assert!(matches!(refused, Err((ErrorCode::StaleEpoch, _, e)) if e == epoch));
    let mut other_key = ops(&[], &[]);
    other_key.external_sender = Some(ByteArray::from([8u8; 32]));
    assert!(matches!(
        commit(&groups, &other_key, epoch),
        Err((ErrorCode::StaleEpoch, _, _))
    ));
    // Until a commit takes it, the group's external sender is the old authority: removals
    // are kept, not proposed with a key members would refuse.
    assert!(matches!(
        groups.request_removal(conv, d(30), &|_| false, &mut writes),
        Removal::Propose
    ));
    assert!(groups
        .removal_proposal(conv, d(30), &mut entropy, &mut writes)
        .is_none());
    assert_eq!(groups.next_removal(conv), Some(d(30)));
    let mut taking = ops(&[], &[]);
    taking.external_sender = Some(ByteArray::from(key));
    let effect = commit(&groups, &taking, epoch).expect("the commit taking it passes");
    assert_eq!(effect.state.external_pending(), None);
    groups.set_state(conv, effect.state, &mut writes);
    assert!(groups
        .removal_proposal(conv, d(30), &mut entropy, &mut writes)
        .is_some());
    // A commit naming an external sender no proposal waits for is invalid.
    assert!(matches!(
        commit(&groups, &taking, epoch + 1),
        Err((ErrorCode::InvalidGroupMessage, _, _))
    ));
    // The gateway that hands a group over forgets it (and its members' count).
    assert_eq!(groups.conversations_of(u(2)), 1);
    groups.forget(conv, &mut writes);
    assert!(!groups.contains(conv));
    assert_eq!(groups.conversations_of(u(2)), 0);
}

#[test]
fn a_handover_proposal_names_the_new_key_in_the_groups_epoch_and_not_twice() {
    use crate::testing::TestEntropy;
    let conv = ConversationId(0xC1);
    let mut groups = Groups::default();
    let mut writes = WriteBatch::default();
    let mut entropy = TestEntropy(9);
    assert!(groups
        .external_sender_proposal(conv, [1; 32], &mut entropy, &mut writes)
        .is_err());
    let state = room();
    let epoch = state.epoch();
    groups.set_state(conv, state, &mut writes);
    let proposal = groups
        .external_sender_proposal(conv, [1; 32], &mut entropy, &mut writes)
        .unwrap();
    let (framing, _) = crate::mls::commit_authority::read_message(&proposal).unwrap();
    assert_eq!(framing.group_id, conv.to_bytes());
    assert_eq!(framing.epoch, epoch);
    assert_eq!(framing.kind, crate::mls::commit_authority::Kind::Proposal);
    // A gateway that took a group over and has not seen its key taken cannot sign for it.
    let mut taken = groups.get(conv).unwrap().clone();
    taken.expect_external_sender([2; 32]);
    groups.set_state(conv, taken, &mut writes);
    assert!(groups
        .external_sender_proposal(conv, [1; 32], &mut entropy, &mut writes)
        .is_err());
}

proptest::proptest! {
    /// A group record comes from a peer in a handover: any bytes give a group or an error,
    /// never a panic, and a group's own record reads back as itself.
    #[test]
    fn any_group_record_reads_or_is_refused(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
        let _ = GroupState::decode_record(&bytes);
        let g = room();
        proptest::prop_assert_eq!(GroupState::decode_record(&g.encode()), Ok(g));
    }
}

/// The last device able to commit asks to leave while every other device of the group is
/// revoked: nobody can commit its removal, so it goes at once, with the revoked devices, and
/// the conversation is over. While one other device could still commit, its removal is
/// proposed as usual. Swarm seed 704 waited for good here.
#[test]
fn the_last_device_able_to_commit_leaves_at_once_with_the_revoked_ones() {
    let conv = ConversationId(0xC1);
    let mut groups = Groups::default();
    let mut writes = WriteBatch::default();
    groups.set_state(conv, room(), &mut writes);
    let all_but_20_and_21 = |d: DeviceId| ![20, 21].contains(&d.0);
    assert!(matches!(
        groups.request_removal(conv, d(20), &all_but_20_and_21, &mut writes),
        Removal::Propose
    ));
    let all_but_20 = |d: DeviceId| d.0 != 20;
    match groups.request_removal(conv, d(20), &all_but_20, &mut writes) {
        Removal::LastMember(effect) => {
            assert_eq!(
                effect.change.removed,
                vec![d(10), d(11), d(20), d(21), d(30)]
            );
            assert!(effect.state.devices().is_empty());
        }
        _ => panic!("the last device able to commit goes at once"),
    }
    // A device that is not a member changes nothing.
    assert!(matches!(
        groups.request_removal(conv, d(99), &|_| true, &mut writes),
        Removal::Nothing
    ));
}
