//! The scenario DSL: what parses, what is refused and how the errors read.

use std::time::Duration;

use sund_sim::scenario::{parse, Action, Invariant, Target, Timing};
use sund_sim::world::World;

// ---- helpers ----

fn error(text: &str) -> String {
    parse("bad.sund", text).unwrap_err().to_string()
}

const TOPOLOGY: &str =
    "duration 1s\ngateway gw\nuser alice devices 2\nconversation c members alice\n";

// ---- tests ----

#[test]
fn a_full_scenario_parses_into_its_parts() {
    let s = parse(
        "scenarios/x.sund",
        "# why
name demo
seed 9
duration 2m
liveness within 45s
gateway gw
user alice devices 2
users m count 3 devices 1
conversation room members alice m*
network latency 1ms..4ms loss 5% duplicate 0.01 reorder 2%
link alice/1 gw latency 50ms loss 50%
disk gw commit 2ms
skew alice/0 -250ms
config heartbeat 2s
send room from alice every 100ms size 64 start 1s stop 30s
at 10s partition alice gw
every 5s start 20s stop 40s jitter 250ms crash random-gateway
check no-loss order
",
    )
    .unwrap();
    assert_eq!(s.name, "demo");
    assert_eq!(s.seed, 9);
    assert_eq!(s.duration, Duration::from_secs(120));
    assert_eq!(s.liveness, Duration::from_secs(45));
    assert_eq!(s.users.len(), 4);
    assert_eq!(s.users[3].name, "m2");
    assert_eq!(
        s.conversations[0].members,
        vec![Target::User("alice".into()), Target::UserGlob("m".into())]
    );
    assert_eq!(s.network.loss, 0.05);
    assert_eq!(s.network.latency_us_max, 4_000);
    assert_eq!(s.skews, vec![(Target::Device("alice".into(), 0), -250_000)]);
    assert_eq!(s.workloads[0].size, 64);
    assert_eq!(
        s.schedule[0].action,
        Action::Partition(Target::User("alice".into()), Target::Gateway("gw".into()))
    );
    assert_eq!(
        s.schedule[1].timing,
        Timing::Every {
            period: Duration::from_secs(5),
            start: Duration::from_secs(20),
            stop: Duration::from_secs(40),
            jitter: Duration::from_millis(250)
        }
    );
    assert_eq!(
        s.invariants.iter().copied().collect::<Vec<_>>(),
        vec![
            Invariant::NoLoss,
            Invariant::Order,
            Invariant::SenderOrder,
            Invariant::NoPanic
        ],
        "sender-order and no-panic are checked whether named or not"
    );
}

#[test]
fn the_name_defaults_to_the_file_stem() {
    let s = parse("scenarios/steady.sund", TOPOLOGY).unwrap();
    assert_eq!(s.name, "steady");
}

#[test]
fn syntax_errors_name_file_line_column_and_what_was_expected() {
    insta::assert_snapshot!(error("duration 5 seconds\n"), @"bad.sund:1:10: expected a duration like `250ms`, `5s`, `2m`, found `5`");
    insta::assert_snapshot!(error("gateway gw\n  frobnicate x\n"), @"bad.sund:2:3: unknown statement `frobnicate`; expected one of: name, seed, duration, liveness, gateway, federate, user, users, conversation, network, link, disk, skew, config, send, at, every, check, plant");
    insta::assert_snapshot!(error("network latency 5ms..1ms\n"), @"bad.sund:1:17: expected a latency range like `1ms..5ms` (low <= high), found `5ms..1ms`");
    insta::assert_snapshot!(error("network loss 150%\n"), @"bad.sund:1:14: expected a loss probability like `5%` or `0.05` (between 0 and 1), found `150%`");
    insta::assert_snapshot!(error("at 5s explode gw\n"), @"bad.sund:1:7: unknown action `explode`; expected one of: partition, heal, isolate, rejoin, hold, release, block, unblock, disconnect, crash, restart, drain, stall-disk, resume-disk, fill-disk, free-disk, lie-disk, honest-disk, clock, drift, network, link, revoke, handover, relay, commit, send-file, contact, invisible, watch");
    insta::assert_snapshot!(error("duration 5s\ngateway gw\nuser a\nat 1s lie-disk a\n"), @"bad.sund:4:1: `lie-disk` takes gateways: a device whose disk lies is not modelled yet");
    insta::assert_snapshot!(error("at 5s partition gw\n"), @"bad.sund:1:19: expected a target (gateway, user, user/N, prefix*, all-devices, random-device, ...), found end of line");
    insta::assert_snapshot!(error("check no-loss sanity\n"), @"bad.sund:1:15: unknown invariant `sanity`; known: no-loss, no-duplicate, order, converge, epoch-agreement, decrypt, revoked-never-authenticates, crl-converge, single-authority, federation-links, sender-order, no-panic, files, rate-limits, ordinary-unthrottled, peer-limit, presence-privacy, contacts-converge, blocks-hold");
    insta::assert_snapshot!(error("gateway gw\nuser a\nconversation c kind club members a\n"), @"bad.sund:3:21: unknown conversation kind `club`; expected room, dm or own");
    insta::assert_snapshot!(error("duration 5s\ngateway gw\nuser a devices 2\nuser b\nconversation c kind own members a/0 b\n"), @"bad.sund:5:37: the group of a user's own devices (`kind own`) holds the devices of one user only");
    insta::assert_snapshot!(error("gateway gw\nuser a address 300.1.2.3\n"), @"bad.sund:2:16: expected an IPv4 address such as 203.0.113.7, found `300.1.2.3`");
    insta::assert_snapshot!(error("seed 12 13\n"), @"bad.sund:1:9: expected end of line, found `13`");
    let files = "duration 5s\ngateway gw\nuser a\nconversation c kind room members a\n";
    insta::assert_snapshot!(error(&format!("{files}at 1s send-file c from a size 0 name x\n")), @"bad.sund:5:31: a file is 1 to 67108864 bytes here");
    insta::assert_snapshot!(error(&format!("{files}at 1s send-file c from a size 100 name y like x\n")), @"bad.sund:5:1: `like x`: no `send-file ... name x` in this scenario");
    insta::assert_snapshot!(error(&format!("{files}at 1s send-file c from a name x\n")), @"bad.sund:5:26: expected `size`, found `name`");
    insta::assert_snapshot!(error("gateway gw\nusers d count 100000 devices 2\n"), @"bad.sund:2:1: this would make 200000 devices; a scenario has at most 100000");
}

#[test]
fn name_errors_point_at_the_token_that_used_the_name() {
    insta::assert_snapshot!(error(&format!("{TOPOLOGY}at 1s partition bob gw\n")), @"bad.sund:5:17: unknown gateway or user `bob`");
    insta::assert_snapshot!(error(&format!("{TOPOLOGY}at 1s crash alice/2\n")), @"bad.sund:5:13: user `alice` has 2 devices (numbered from 0); there is no `alice/2`");
    insta::assert_snapshot!(error(&format!("{TOPOLOGY}send room from alice every 1s\n")), @"bad.sund:5:6: unknown conversation `room`");
    insta::assert_snapshot!(error("duration 1s\ngateway gw\ngateway gw\n"), @"bad.sund:3:1: gateway `gw` is declared twice");
    insta::assert_snapshot!(error("gateway gw\n"), @"bad.sund:1:1: missing `duration <time>`: every scenario says how long its workload runs");
}

#[test]
fn comments_and_blank_lines_are_ignored() {
    let s = parse(
        "x.sund",
        &format!("# header\n\n{TOPOLOGY}   # trailing\nat 1s disconnect alice # why\n"),
    )
    .unwrap();
    assert_eq!(s.schedule.len(), 1);
}

/// The four scenarios the mission names must be expressible and runnable (a scenario needing a
/// feature this build lacks would parse, and the runner refuse it saying what is missing).
#[test]
fn the_mission_scenarios_are_expressible() {
    for (file, runnable) in [
        ("tests/dsl/chaos-10k-disconnects.sund", true),
        ("../scenarios/commits-under-50-percent-loss.sund", true),
        ("tests/dsl/crl-propagation.sund", true),
        ("tests/dsl/federation-handover.sund", true),
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let scenario = parse(file, &text).unwrap_or_else(|e| panic!("{e}"));
        match World::new(scenario, 1) {
            Ok(_) => assert!(runnable, "{file} should need a later feature"),
            Err(e) => {
                assert!(!runnable, "{file}: {e}");
                assert!(
                    e.to_string().contains("lands with")
                        || e.to_string().contains("cannot check it yet"),
                    "{e}"
                );
            }
        }
    }
}

/// The long scenarios CI does not run still parse (and are not left to rot until someone
/// wants a measurement from them).
#[test]
fn every_long_scenario_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/long");
    let mut parsed = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "sund") {
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let scenario = parse(&name, &text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(format!("{}.sund", scenario.name), name);
            parsed.push(name);
        }
    }
    parsed.sort();
    assert!(
        parsed.contains(&"handover-1k-members.sund".to_string())
            && parsed.contains(&"handover-1k-mls.sund".to_string()),
        "{parsed:?}"
    );
}

#[test]
fn an_unknown_planted_bug_is_named_with_the_ones_there_are() {
    insta::assert_snapshot!(error("gateway gw\nplant everything\n"), @"bad.sund:2:7: unknown planted bug `everything`; expected one of: gateway-ack-before-commit, dedup-forgets, node-ack-before-durable, resume-off-by-one, send-limit-ignored, presence-ignores-invisible, invitation-limit-ignored, handover-keeps-sequencing, peer-crl-ignored, peer-limit-ignored, blocks-ignored");
}

#[test]
fn rate_limits_are_read_and_checked() {
    let s = parse(
        "ok.sund",
        "duration 1s\ngateway gw\nconfig send-limit 20 burst 40\nconfig conversation-limit off\n",
    )
    .unwrap();
    assert_eq!(
        s.tunables.send_limit,
        Some(Some(sund_model::gateway::limits::Rate::per_second(20, 40)))
    );
    assert_eq!(s.tunables.conversation_limit, Some(None));
    insta::assert_snapshot!(error("gateway gw\nconfig send-limit lots\n"), @"bad.sund:2:19: expected a rate limit (how many per period, like `20 burst 40`, or `off`), found `lots`");
}

#[test]
fn harsher_fault_values_are_checked() {
    insta::assert_snapshot!(error("gateway gw\nnetwork bandwidth fast\n"), @"bad.sund:2:19: expected a bandwidth (`unlimited`, or bits per second like `64kbit`, `10mbit`), found `fast`");
    insta::assert_snapshot!(error("gateway gw\nuser a\nat 1s drift a 5%\n"), @"bad.sund:3:15: expected a clock rate like `+200ppm` or `-50ppm` (at most 100000), found `5%`");
    insta::assert_snapshot!(error("gateway gw\nuser a\nat 1s clock a soon\n"), @"bad.sund:3:15: expected a clock jump like `+250ms` or `-1s`, found `soon`");
}

#[test]
fn federation_links_are_declared_between_known_gateways_and_relays_need_one() {
    let s = parse(
        "f.sund",
        "duration 1s\ngateway gwa\ngateway gwb\nfederate gwb gwa\nevery 50ms relay gwa to gwb\ncheck federation-links\n",
    )
    .unwrap();
    assert_eq!(s.federations, vec![("gwa".to_string(), "gwb".to_string())]);
    assert_eq!(
        s.schedule[0].action,
        Action::Relay("gwa".into(), "gwb".into())
    );
    assert!(s.invariants.contains(&Invariant::FederationLinks));
    insta::assert_snapshot!(error("duration 1s\ngateway gwa\nfederate gwa gwz\n"), @"bad.sund:3:14: unknown gateway `gwz`");
    insta::assert_snapshot!(error("duration 1s\ngateway gwa\nfederate gwa gwa\n"), @"bad.sund:3:14: `federate gwa gwa`: a gateway does not federate with itself");
    insta::assert_snapshot!(error("duration 1s\ngateway gwa\ngateway gwb\nfederate gwa gwb\nfederate gwb gwa\n"), @"bad.sund:5:1: `federate gwb gwa` is declared twice");
    insta::assert_snapshot!(error("duration 1s\ngateway gwa\ngateway gwb\nat 1s relay gwa to gwb\n"), @"bad.sund:4:1: `relay gwa to gwb`: the two gateways are not linked; add `federate gwa gwb`");
}

#[test]
fn a_handover_names_a_conversation_and_a_gateway_that_keeps_a_copy() {
    const SPANNING: &str = "duration 1s\ngateway gwa\ngateway gwb\ngateway gwc\nfederate gwa gwb\nfederate gwa gwc\nuser a gateway gwa\nuser b gateway gwb\nconversation room gateway gwa members a b\nconversation dm gateway gwa kind dm members a\n";
    let s = parse(
        "h.sund",
        &format!("{SPANNING}at 1s handover room to gwb\ncheck single-authority\n"),
    )
    .unwrap();
    assert_eq!(
        s.schedule[0].action,
        Action::Handover("room".into(), "gwb".into())
    );
    assert!(s.invariants.contains(&Invariant::SingleAuthority));
    insta::assert_snapshot!(error(&format!("{SPANNING}at 1s handover room to gwc\n")), @"bad.sund:11:1: `handover room to gwc`: no member of `room` is at `gwc`; hand it to a gateway that keeps a copy (its home or a member's gateway)");
    // MLS conversations are handed over too, to a gateway one of their members is at.
    let mls = parse(
        "h.sund",
        &format!("{SPANNING}conversation team gateway gwa kind room members a b\nat 1s handover team to gwb\n"),
    )
    .unwrap();
    assert_eq!(
        mls.schedule[0].action,
        Action::Handover("team".into(), "gwb".into())
    );
    insta::assert_snapshot!(error(&format!("{SPANNING}at 1s handover dm to gwb\n")), @"bad.sund:11:1: `handover dm to gwb`: no member of `dm` is at `gwb`; hand it to a gateway that keeps a copy (its home or a member's gateway)");
    insta::assert_snapshot!(error(&format!("{SPANNING}at 1s handover room to gwz\n")), @"bad.sund:11:24: unknown gateway `gwz`");
}

#[test]
fn a_dm_member_may_start_the_dm_and_a_commit_names_its_kind() {
    use sund_sim::scenario::CommitKind;
    let s = parse(
        "x.sund",
        "duration 2s\ngateway gw\nuser a\nuser b\nconversation d kind dm members a b\nat 1s commit d from b start\n",
    )
    .unwrap();
    assert!(
        s.schedule
            .iter()
            .any(|e| matches!(&e.action, Action::Commit(c, _, CommitKind::Start) if c == "d")),
        "{:?}",
        s.schedule
    );
    insta::assert_snapshot!(
        error("duration 2s\ngateway gw\nuser a\nconversation d kind dm members a\nat 1s commit d from a join\n"),
        @"bad.sund:5:23: expected `add`, `remove`, `update`, `leave`, `start` or `admin USER`, found `join`"
    );
    // `admin` names a user of the scenario.
    let s = parse(
        "x.sund",
        "duration 2s\ngateway gw\nuser a\nuser b\nconversation r kind room members a b\nat 1s commit r from a/0 admin b\n",
    )
    .unwrap();
    assert!(
        s.schedule.iter().any(
            |e| matches!(&e.action, Action::Commit(c, _, CommitKind::Admin(u)) if c == "r" && u == "b")
        ),
        "{:?}",
        s.schedule
    );
    insta::assert_snapshot!(
        error("duration 2s\ngateway gw\nuser a\nconversation r kind room members a\nat 1s commit r from a admin zed\n"),
        @"bad.sund:5:29: unknown gateway or user `zed`"
    );
}
