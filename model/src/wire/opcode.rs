use super::WireError;

macro_rules! opcodes {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, )*) => {
        /// What a frame is. Values are grouped by concern in blocks of 0x100; every opcode of the
        /// design is reserved now so that the numbering never changes.
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
        #[repr(u16)]
        pub enum Opcode {
            $( $(#[$doc])* $name = $value, )*
        }

        impl Opcode {
            /// Every opcode, in numeric order.
            pub const ALL: &'static [Opcode] = &[ $( Opcode::$name, )* ];

            /// The opcode for a wire value, or `UnknownOpcode`.
            pub fn from_u16(value: u16) -> Result<Opcode, WireError> {
                match value {
                    $( $value => Ok(Opcode::$name), )*
                    found => Err(WireError::UnknownOpcode { found }),
                }
            }
        }
    };
}

opcodes! {
    // 0x00xx: session
    /// Node → gateway: open a session (device, resume cursors).
    Hello = 0x0001,
    /// Gateway → node: a nonce the node must sign with its device key.
    Challenge = 0x0002,
    /// Node → gateway: the signed challenge and the device certificate.
    Proof = 0x0003,
    /// Gateway → node: the session is open.
    HelloOk = 0x0004,
    /// Node → gateway: resume a session with a token.
    Resume = 0x0005,
    /// Either way: liveness probe.
    Heartbeat = 0x0006,
    /// Either way: answer to a heartbeat.
    HeartbeatAck = 0x0007,
    /// Either way: the sender closes the session, with a reason.
    Goodbye = 0x0008,
    /// Either way: a request failed; carries a machine-readable code and a message.
    Error = 0x000F,
    // 0x01xx: delivery
    /// Node → gateway: a message for a conversation (routing: conversation, sender).
    Send = 0x0100,
    /// Gateway → node: the message was durably sequenced (routing: conversation, seq).
    SendAck = 0x0101,
    /// Gateway → node: a sequenced message (routing: conversation, sender, seq).
    Deliver = 0x0102,
    /// Node → gateway: everything up to `seq` in a conversation is processed (mailbox cursor).
    Ack = 0x0103,
    /// Node → gateway: please resend a conversation from a seq (gap detected).
    ReplayRequest = 0x0104,
    // 0x02xx: MLS
    /// Node → gateway: upload a batch of KeyPackages.
    KeyPackageUpload = 0x0200,
    /// Node → gateway: fetch KeyPackages of a user's devices.
    KeyPackageFetch = 0x0201,
    /// Gateway → node: KeyPackages answered to a fetch.
    KeyPackages = 0x0202,
    /// Gateway → node: an MLS Welcome from the device's inbox (it was added to a group).
    Welcome = 0x0203,
    /// Gateway → group: an external-sender proposal (server-initiated removal).
    ExternalProposal = 0x0204,
    /// Gateway → node: how many of its KeyPackages the device has left.
    KeyPackageCount = 0x0205,
    /// Gateway → node: a commit removed the device from a group (from the device's inbox).
    Removed = 0x0206,
    /// Node → gateway: remove this device from the conversation in the header (the gateway
    /// proposes the removal as the group's external sender; a member commits it).
    Leave = 0x0207,
    // 0x03xx: identity and trust
    /// Node → gateway: register a device key with an enrolment token.
    Register = 0x0300,
    /// Gateway → node: a device certificate.
    Certificate = 0x0301,
    /// Node → gateway: fetch the CRL.
    CrlFetch = 0x0302,
    /// Gateway → node: a signed, versioned CRL (answer or push).
    Crl = 0x0303,
    /// Node → gateway: fetch the trust root.
    TrustRootFetch = 0x0304,
    /// Gateway → node: the trust root.
    TrustRoot = 0x0305,
    /// Node → gateway: this device vouches for a pairing code (a new device of its user).
    PairVouch = 0x0306,
    /// Gateway → node: the vouch is stored; the code can be used.
    PairVouched = 0x0307,
    /// Gateway → node: a new device registered with a pairing code this device vouched for.
    DeviceLinked = 0x0308,
    /// Node → gateway, in a session: renew this device's certificate (answered by
    /// `Certificate`).
    RenewCertificate = 0x0309,
    /// Gateway → node, in a session: the roots of the domains the gateway federates with,
    /// signed by the device's own root (pushed when the set changes; `HelloOk` carries it at
    /// each session's start).
    PeerRoots = 0x030A,
    // 0x04xx: contacts and presence
    /// Node → gateway: be invisible or visible (answered by `Contacts`).
    PresenceUpdate = 0x0400,
    /// Node → gateway: this session's watchlist (answered by `PresenceNotify`).
    PresenceSubscribe = 0x0401,
    /// Gateway → node: watched users' presence (after a subscribe, and on each change).
    PresenceNotify = 0x0402,
    /// Node → gateway: add, remove, block or unblock a user (answered by `Contacts`).
    ContactChange = 0x0403,
    /// Node → gateway: send the user's contacts (answered by `Contacts`).
    ContactsFetch = 0x0404,
    /// Gateway → node: the user's contacts, requests, blocks and visibility.
    Contacts = 0x0405,
    // 0x05xx: files
    /// Node → gateway: send these chunks of an upload.
    ChunkRequest = 0x0500,
    /// Either way, only as the first frame of a chunk stream: the head of one sealed chunk,
    /// whose bytes follow the frame.
    Chunk = 0x0501,
    /// Gateway → node: an uploaded chunk is durable.
    ChunkAck = 0x0502,
    /// Receiver → sender: signed receipt for a whole file (reserved: receipts travel inside
    /// the conversation's MLS messages).
    FileReceipt = 0x0503,
    /// Node → gateway: open or resume an upload (its chunk list).
    UploadOpen = 0x0504,
    /// Gateway → node: the chunks an upload still lacks.
    UploadStatus = 0x0505,
    /// Node → gateway: this device holds all of an upload's file.
    FileFetched = 0x0506,
    /// Gateway → node: requested chunks that cannot be sent.
    ChunksUnavailable = 0x0507,
    // 0x06xx: federation (gateway-to-gateway links, `crate::federation`)
    /// Gateway → gateway: mutual authentication.
    FederationHello = 0x0600,
    /// Gateway → gateway: a frame forwarded for another domain.
    FederationForward = 0x0601,
    /// Gateway → gateway: signed hand-over of a conversation's authority.
    HandoverCertificate = 0x0602,
    /// Gateway → gateway: every forwarded frame up to the header's seq is durable here (also
    /// the link's heartbeat).
    FederationAck = 0x0603,
}

impl Opcode {
    /// The wire value.
    pub fn to_u16(self) -> u16 {
        self as u16
    }
}
