//! Deliberate protocol bugs, planted only by the simulator (`cargo sim --plant NAME`) to show
//! that its swarms find them and its shrinker reduces them to a few lines.
//!
//! A configuration field holds at most one; production drivers never set it (the default is
//! none), and a gateway or node built from a configuration file cannot: no file format names
//! them. Each site that reads the switch is one `if` on a configuration value.

use std::fmt;

/// One known protocol bug to plant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PlantedBug {
    /// The gateway acknowledges a message before the write that sequences it is durable: a
    /// gateway crash loses a message its sender was told is safe.
    GatewayAckBeforeCommit,
    /// The gateway's duplicate detection forgets a message once two newer ones are sequenced
    /// after it: a late retry is sequenced a second time.
    DedupForgets,
    /// A node acknowledges a delivery before its cursor is durable: a device crash loses a
    /// message the gateway was told is read.
    NodeAckBeforeDurable,
    /// A resumed session starts one past the device's cursor, as if the device had read one
    /// message more than it had.
    ResumeOffByOne,
    /// The gateway charges each device's sends to its rate limit but never refuses one: a
    /// flooding device takes the sequencer for itself.
    SendLimitIgnored,
    /// The gateway tells watchers a user's presence while the user is invisible.
    PresenceIgnoresInvisible,
    /// The gateway charges each user's invitations to its rate limit but never refuses a
    /// commit for them: one user can pull others into conversations as fast as it likes.
    InvitationLimitIgnored,
    /// A gateway handing a conversation over goes on sequencing it instead of freezing it: for
    /// a while two gateways sequence the same conversation.
    HandoverKeepsSequencing,
    /// A gateway takes no peer domain's CRL, as if each failed its checks: a device revoked by
    /// its own domain is refused there only, and every other gateway goes on taking its
    /// relayed messages.
    PeerCrlIgnored,
    /// The authority counts what each peer gateway relays but never refuses a relay by its
    /// limit per peer: one peer can take the sequencer for itself.
    PeerLimitIgnored,
    /// The gateway records blocks but enforces none on invitations: it hands a user's
    /// KeyPackages to someone they blocked (its own directory and other domains' fetches),
    /// and admits that user's commits adding them.
    BlocksIgnored,
}

impl PlantedBug {
    /// Every planted bug with its command-line name.
    pub const ALL: &'static [(&'static str, PlantedBug)] = &[
        (
            "gateway-ack-before-commit",
            PlantedBug::GatewayAckBeforeCommit,
        ),
        ("dedup-forgets", PlantedBug::DedupForgets),
        ("node-ack-before-durable", PlantedBug::NodeAckBeforeDurable),
        ("resume-off-by-one", PlantedBug::ResumeOffByOne),
        ("send-limit-ignored", PlantedBug::SendLimitIgnored),
        (
            "presence-ignores-invisible",
            PlantedBug::PresenceIgnoresInvisible,
        ),
        (
            "invitation-limit-ignored",
            PlantedBug::InvitationLimitIgnored,
        ),
        (
            "handover-keeps-sequencing",
            PlantedBug::HandoverKeepsSequencing,
        ),
        ("peer-crl-ignored", PlantedBug::PeerCrlIgnored),
        ("peer-limit-ignored", PlantedBug::PeerLimitIgnored),
        ("blocks-ignored", PlantedBug::BlocksIgnored),
    ];

    /// Looks a bug up by its command-line name.
    pub fn parse(name: &str) -> Option<PlantedBug> {
        PlantedBug::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| *b)
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        PlantedBug::ALL
            .iter()
            .find(|(_, b)| *b == self)
            .expect("every planted bug is named")
            .0
    }
}

impl fmt::Display for PlantedBug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bug_is_found_by_its_name() {
        for &(name, bug) in PlantedBug::ALL {
            assert_eq!(PlantedBug::parse(name), Some(bug));
            assert_eq!(bug.to_string(), name);
        }
        assert_eq!(PlantedBug::parse("no-such-bug"), None);
    }
}
