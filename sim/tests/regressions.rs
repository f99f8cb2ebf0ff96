//! Seeds that once broke a run, replayed forever (see SIMULATION.md, "Regression seeds").

use sund_sim::scenario::parse;
use sund_sim::world::{Outcome, World};

fn run(file: &str, seed: u64) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let scenario = parse(file, &text).unwrap_or_else(|e| panic!("{e}"));
    let report = World::new(scenario, seed).unwrap().run();
    assert!(
        matches!(report.outcome, Outcome::Passed),
        "{file} seed {seed}: {:?}",
        report.outcome
    );
}

/// A device crashed after asking for a DM and before the DM's first commit: its group entry
/// was on disk without an MLS group, and recovery refused the store as corrupt.
#[test]
fn dm_1k_with_reloads_seed_5_recovers_a_dm_not_yet_created() {
    run("../scenarios/dm-1k-with-reloads.sund", 5);
}

/// A device's own accepted message came back without its plaintext: a refusal of an older copy
/// (already re-encrypted) triggered a second re-encryption, which failed while a removal was
/// pending, and the message was dropped as rejected.
#[test]
fn commits_under_loss_seed_10_keeps_a_re_encrypted_message() {
    run("../scenarios/commits-under-50-percent-loss.sund", 10);
}

/// The echo of a commit removed the wrong queued intent (the request to commit the gateway's
/// proposal), so the designated member committed updates forever instead of the removal.
#[test]
fn commits_under_loss_seed_84_commits_the_proposed_removal() {
    run("../scenarios/commits-under-50-percent-loss.sund", 84);
}

/// A removal notice was overtaken by the Welcome that added the device back; the device
/// thought itself still a member and never read the conversation again.
#[test]
fn multi_device_churn_seed_4_rejoins_after_an_overtaken_removal() {
    run("../scenarios/multi-device-churn.sund", 4);
}

/// A CRL pushed on revocation was lost in flight, and a device with an open session never
/// asked again: it held an old CRL forever. Gateways now name their CRL version in every
/// `HeartbeatAck`.
#[test]
fn crl_propagation_seed_1_fetches_a_lost_crl() {
    run("../scenarios/crl-propagation.sund", 1);
}

/// Four revocations were pending in one room at once; the committing member put all four
/// removals in one commit, which the gateway refuses (one removal per commit), and the room
/// stalled. The gateway now proposes one removal per epoch.
#[test]
fn crl_propagation_seed_41_removes_revoked_devices_one_per_epoch() {
    run("../scenarios/crl-propagation.sund", 41);
}

/// A device removed from a room (and added back) after a file was offered to it asked the
/// gateway for the file's chunks at every heartbeat for ever, hearing `NoSuchUpload` each
/// time: the gateway had let the upload go once the members it still counted had it. The
/// fetch now ends with what to do.
#[test]
fn files_swarm_47_a_fetch_the_gateway_let_go_ends() {
    run("tests/regressions/files-swarm-47.sund", 47);
}

/// A device crashed 1 ms after a file was offered to it, before its fetch (asked for at once)
/// was durable: after its restart it never fetched the file. The simulated application now
/// fetches again every file offered and not yet asked for after a restart, as `sund follow
/// --fetch-into` does when the message carrying it comes again.
#[test]
fn mls_swarm_5110_a_file_offered_just_before_a_crash_is_fetched() {
    run("tests/regressions/mls-swarm-5110.sund", 5110);
}

/// A whole upload's file message met a removal waiting for its commit (MLS sends nothing
/// then) and was dropped with "try again in a moment". It now waits, durably, for a later
/// heartbeat.
#[test]
fn files_swarm_105_a_file_message_waits_for_a_pending_removal() {
    run("tests/regressions/files-swarm-105.sund", 105);
}

/// A device removed from a room in the middle of an upload opened it again every 30 s for
/// ever, silently refused. Its uploads and fetches there now end when it is removed.
#[test]
fn files_swarm_106_a_removed_device_stops_uploading() {
    run("tests/regressions/files-swarm-106.sund", 106);
}

/// Two lossy crashes of a gateway in one lying spell gave seq 1 to two messages, and each of
/// the user's two devices read one: neither was told its history diverged (a silent fork).
/// The placeholder of a lost seq now keeps the message the first device read there.
#[test]
fn lying_disk_swarm_22782_two_lost_histories_at_one_seq_are_told() {
    run("tests/regressions/lying-disk-swarm-22782.sund", 22782);
}

/// A gateway's lying disk lost seqs 27 to 31 of a conversation a device had read; after the
/// crash a retried message got its old seq 31 back, so the message at the device's cursor
/// matched and the gateway took the device's history for its own, though 27 to 30 now held
/// other messages (a silent fork). A device's first cursor in a gateway's run is now
/// examined whatever the message at it (shrunk from a 100,000-seed swarm, seed 500624).
#[test]
fn lying_disk_swarm_500624_a_retried_message_at_its_old_seq_hides_no_fork() {
    run(
        "tests/regressions/lying-disk-retried-at-its-old-seq-swarm-500624-shrunk.sund",
        500624,
    );
}

/// Two lossy crashes in one lying spell, and devices that read the lost seqs in different
/// runs stopped at different seqs: nobody was told (a silent fork). The placeholders now keep
/// the run their fencer read them in, and a device that read there in another run is told.
#[test]
fn lying_disk_two_lost_runs_swarm_508215_no_silent_fork() {
    run(
        "tests/regressions/lying-disk-two-lost-runs-swarm-508215.sund",
        508215,
    );
}

/// A DM's member asked to leave while the other member was cut off and then revoked: nobody
/// was left to commit its removal, and it asked for good (a gap the checker let pass). The
/// gateway now ends a conversation whose last device able to commit leaves, removing the
/// revoked devices with it; the checker's two exemptions for such groups are gone.
#[test]
fn last_able_member_leaves_swarm_704_the_conversation_ends() {
    run(
        "tests/regressions/last-able-member-leaves-swarm-704.sund",
        704,
    );
}

/// A lying disk lost what bob read; the gateway gave those seqs to alice's messages and then
/// restarted again, honestly, before bob came back: the head it recovered was past the loss, so
/// it compared bob's cursor with nothing lost and told nobody (ten seeds of a 27,000-seed
/// swarm, e.g. 506537, failed this way). The gateway now keeps in which run each device last
/// had a session and where each run began sequencing, and tells bob and carol.
#[test]
fn lying_disk_restarted_again_before_the_reader_came_back_is_no_silent_fork() {
    run("tests/regressions/lying-disk-restarted-again.sund", 1);
}

/// A device of another domain sent into a room, its gateway crashed before the authority's
/// answers came back, and the device left the room meanwhile: its gateway answered the
/// retries `not_member`, so its application was told "rejected" of messages every member had
/// read. A copy of a message sequenced while its device was a member now gets its seq back
/// at both gateways, as a local device's does (swarm seed 500326).
#[test]
fn left_member_swarm_500326_is_not_told_its_sequenced_messages_were_refused() {
    run(
        "tests/regressions/left-member-retry-swarm-500326.sund",
        500326,
    );
}

/// Both members of a plain conversation were revoked while it held messages nobody had read,
/// and the gateway's restart refused its own store as corrupt (a log with no member): it
/// could never start again (swarm seed 504383).
#[test]
fn revoked_last_members_swarm_504383_the_gateway_restarts() {
    run(
        "tests/regressions/revoked-last-members-swarm-504383.sund",
        504383,
    );
}

/// A DM's other member was revoked and removed; the last member then asked to leave, and the
/// gateway ended its membership at the head it had read (nobody was left to commit its
/// removal). The device took the notice for news of an earlier membership and ignored it: it
/// asked to leave, was told `not_member`, and its messages waited, for ever (the first minute
/// of `scripts/long-swarm.sh`, seed 2026120600452; mls seed 514655 was the same).
#[test]
fn last_member_leaves_swarm_2026120600452_hears_it_was_removed() {
    run(
        "tests/regressions/last-member-leaves-swarm-2026120600452.sund",
        2026120600452,
    );
}

/// A DM's creating commit added the other user's second device, revoked a moment before the
/// commit reached the gateway, which refused it (`forbidden`). The creator took every refusal
/// of a creation for "another device created it first" and waited for a Welcome that never
/// came: the DM was never created. It now makes the creation again from fresh packages.
#[test]
fn dm_creation_revoked_swarm_21070_is_made_again_without_the_revoked_device() {
    run(
        "tests/regressions/dm-creation-revoked-swarm-21070.sund",
        21070,
    );
}

/// A contact request committed after its connection closed (a stalled gateway disk, constant
/// disconnects) was never put in the checker's ledger, so a later, allowed presence
/// notification failed `presence-privacy`. Answers now apply by the connection they were
/// asked on, open or not.
#[test]
fn presence_swarm_40565_a_request_answered_after_its_connection_closed_counts() {
    run("tests/regressions/presence-swarm-40565.sund", 40565);
}

/// A paced device (after a rate limit) whose acknowledgements of a whole window were lost
/// learned from its own messages coming back that they were sequenced, but sent nothing
/// behind them, and no timer woke it: its outbox waited for good. Its own deliveries now
/// widen the pace and send what waits, as acknowledgements do.
#[test]
fn paced_own_deliveries_swarm_61459_keep_the_outbox_moving() {
    run(
        "tests/regressions/paced-own-deliveries-swarm-61459.sund",
        61459,
    );
}

/// The same, shrunk with the fix reverted (the shrinker keeping the failure's kind: a stalled
/// outbox, not a slow drain): a rate limit, half a second of isolation and one sender.
#[test]
fn paced_own_deliveries_swarm_61459_shrunk_keeps_the_outbox_moving() {
    run(
        "tests/regressions/paced-own-deliveries-swarm-61459-shrunk.sund",
        61459,
    );
}

/// A drain that waited for a stalled disk with nothing pending was never checked again once the
/// disk resumed: the gateway refused connections for good (a simulator bug, found by the first
/// swarm seeds to draw drains).
#[test]
fn drain_on_a_stalled_disk_swarm_162_finishes_when_the_disk_resumes() {
    run(
        "tests/regressions/drain-on-a-stalled-disk-swarm-162.sund",
        162,
    );
}

/// A gateway that crashed while draining stayed marked as draining and, started again, refused
/// every connection (a simulator bug).
#[test]
fn crash_while_draining_swarm_918_ends_the_drain() {
    run("tests/regressions/crash-while-draining-swarm-918.sund", 918);
}

/// A drain whose goodbye waited behind a file on a 256 kbit link never finished, and the
/// gateway refused every connection for good (a simulator bug: the real gateway exits after its
/// drain timeout, as the simulated one now does).
#[test]
fn drain_behind_a_slow_link_swarm_701646_stops_at_the_drain_timeout() {
    run(
        "tests/regressions/drain-behind-a-slow-link-swarm-701646.sund",
        701646,
    );
}

/// carol/0 was removed from room-a and added back while offline; at her gateway (a replica of
/// the room) the new Welcome replaced what she still had to read before her removal, so she
/// never read seqs 13–65. A replica now holds the Welcome until she has, as an authority does.
#[test]
fn federation_mls_seed_4_a_device_re_added_abroad_reads_up_to_its_removal_first() {
    run("../scenarios/federation-mls.sund", 4);
}

/// The authority proposed the next removal while applying a commit, and the proposal went to
/// the other domains before the commit itself: their replicas took the commit's seq as lost.
#[test]
fn federation_mls_seed_6_a_proposal_goes_abroad_after_the_commit_before_it() {
    run("../scenarios/federation-mls.sund", 6);
}

/// mh's fetch of another domain's KeyPackages crossed two gateways and their link and took
/// longer than the resend timeout; the device asked again and dropped the late answer, for
/// ever, so the room never added m1. Late answers are now taken and unanswered fetches back off.
#[test]
fn late_key_packages_swarm_1961_are_taken() {
    run("tests/regressions/late-key-packages-swarm-1961.sund", 1961);
}

/// gwb asked gwc for dm-bc, crashed, and came back before gwc's crossing claim arrived: it had
/// forgotten its question, granted gwc's claim while gwc granted its own, and neither made the
/// DM. A question out is now durable.
#[test]
fn federation_dm_race_seed_9_a_question_out_outlives_a_crash() {
    run("../scenarios/federation-dm-race.sund", 9);
}

/// `federation-mls-handover` seed 5: a commit removed the last devices of a domain whose
/// gateway had not yet said where its replica ended after the handover; the new authority
/// forgot that domain, so it never got the messages before the removal, and its departing
/// device was told they were lost. A waiting domain now stays until it has followed.
#[test]
fn federation_mls_handover_seed_5_a_waiting_domain_gets_what_it_missed_before_its_removal() {
    run("../scenarios/federation-mls-handover.sund", 5);
}

/// `federation-mls-handover` seed 8 (the simulator's own bug): a commit refused as forbidden
/// made the world look for the room at its creator's gateway, which had handed it over, and
/// create it again.
#[test]
fn federation_mls_handover_seed_8_a_handed_over_room_is_not_created_again() {
    run("../scenarios/federation-mls-handover.sund", 8);
}

/// `federation-mls-handover` seed 13: the new authority's removal notice reached a member
/// gateway before the old authority's Welcome of that device (another link, cut then); the
/// device joined after its removal and read past it. Such notices now wait until the replica
/// has caught up with the old authority.
#[test]
fn federation_mls_handover_seed_13_a_removal_notice_waits_for_the_old_authoritys_welcome() {
    run("../scenarios/federation-mls-handover.sund", 13);
}

/// `federation-mls-handover` seed 17: a domain with no member left missed a handover, and the
/// new authority's Welcome re-adding its device was refused as from a stranger.
#[test]
fn federation_mls_handover_seed_17_a_domain_that_left_follows_the_new_authority_back_in() {
    run("../scenarios/federation-mls-handover.sund", 17);
}

/// `federation-mls-handover` seed 24: the old authority's Welcome of a commit just before the
/// handover came after the certificate and was refused.
#[test]
fn federation_mls_handover_seed_24_the_old_authoritys_last_welcome_is_taken() {
    run("../scenarios/federation-mls-handover.sund", 24);
}

/// `federation-mls-handover` seed 55: the new authority's replica began where its first
/// device joined, after a member's last message, so it and the member's gateway disagreed on
/// that member's sender order and refused each other's chain for ever. The handover now
/// carries each member's last message.
#[test]
fn federation_mls_handover_seed_55_the_new_authority_adopts_each_senders_last_message() {
    run("../scenarios/federation-mls-handover.sund", 55);
}

/// `federation-dm-lapse` at its own seed: the DM's winning creator crashes for good, so the
/// DM is made only once the grant lapsed, 10 minutes after it was made (across the granting
/// gateway's crash at 7 minutes), by the other user's device trying again every 5 minutes.
/// ben writes every 5 s from 2 s to 14 min, but only once he is in the DM: about 48 of his
/// 168 messages are sequenced. None would be without lapses (or with a grant whose time a
/// restart forgot: it would lapse at 17 minutes); about 168 if ben had made the DM at once.
#[test]
fn federation_dm_lapse_makes_the_dm_once_the_grant_lapsed() {
    let file = "../scenarios/federation-dm-lapse.sund";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let scenario = parse(file, &text).unwrap_or_else(|e| panic!("{e}"));
    let seed = scenario.seed;
    let report = World::new(scenario, seed).unwrap().run();
    assert!(
        matches!(report.outcome, Outcome::Passed),
        "{:?}",
        report.outcome
    );
    assert!(
        (30..=60).contains(&report.app.accepted),
        "{} of ben's messages sequenced",
        report.app.accepted
    );
}

/// A `disconnect` while the gateway was down made the simulator forget the connections the
/// crash had cut, so the restarted gateway never reset them and their devices waited out their
/// idle timeout (plain swarm seed 693, shrunk): fails every seed 1-5 before the fix.
#[test]
fn disconnect_while_gateway_down_swarm_693_resets_every_cut_connection() {
    for seed in 1..=5 {
        run(
            "tests/regressions/disconnect-while-gateway-down-swarm-693.sund",
            seed,
        );
    }
}

/// A watchlist the network delivered twice was taken anew: the gateway numbered its
/// notifications from 1 again, so when the next one was lost the device's count of what it
/// heard still matched the gateway's, and it never asked again (an3/0 saw its friend as
/// unknown for good). A copy is now recognised by its request id and changes nothing.
#[test]
fn presence_scrape_seed_1013_a_duplicated_watchlist_keeps_its_count() {
    run("../scenarios/presence-scrape.sund", 1013);
}

/// A DM whose other user blocked its creator before the creator's device (down since a crash)
/// could make it, and unblocked it later: the world gave the creation up while the block held
/// and never asked again, so `converge` found the DM never made (swarm seed 40337, mls). It
/// now asks again every second while only a block holds it back.
#[test]
fn dm_created_after_unblock_swarm_40337() {
    run(
        "tests/regressions/dm-created-after-unblock-swarm-40337.sund",
        40337,
    );
}
