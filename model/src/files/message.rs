//! A file as a message in its conversation: the manifest and the upload that holds its chunks,
//! encrypted by MLS like any message body.
//!
//! The body starts with [`FILE_MESSAGE_MAGIC`], whose first byte is NUL: text a person types
//! never starts with it (command-line arguments cannot hold NUL), so text bodies stay as they
//! have always been and a file body is never shown as text.

use core::fmt;

use super::{Manifest, ManifestError};

/// The first bytes of a file message body (format 1).
pub const FILE_MESSAGE_MAGIC: &[u8; 4] = b"\0SF\x01";

/// An upload's id, chosen by the uploading device (random), so that it can open the same
/// upload again after a crash or a lost answer, and members can name it when they fetch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UploadId(pub [u8; 16]);

impl fmt::Debug for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "upload:{}", crate::hex::encode(&self.0[..6]))
    }
}

/// A file sent into a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMessage {
    /// Where its chunks wait at the gateway.
    pub upload: UploadId,
    /// What the file is.
    pub manifest: Manifest,
}

impl FileMessage {
    /// The message body.
    pub fn encode(&self) -> Vec<u8> {
        let manifest = self.manifest.encode();
        let mut out = Vec::with_capacity(FILE_MESSAGE_MAGIC.len() + 16 + manifest.len());
        out.extend_from_slice(FILE_MESSAGE_MAGIC);
        out.extend_from_slice(&self.upload.0);
        out.extend_from_slice(&manifest);
        out
    }

    /// `None` for a body that is not a file message (text); otherwise the file, or why its
    /// manifest is refused.
    pub fn decode(body: &[u8]) -> Option<Result<FileMessage, ManifestError>> {
        let rest = body.strip_prefix(FILE_MESSAGE_MAGIC)?;
        let Some((upload, manifest)) = rest.split_first_chunk::<16>() else {
            return Some(Err(ManifestError::Malformed("a file message cut short")));
        };
        Some(Manifest::decode(manifest).map(|manifest| FileMessage {
            upload: UploadId(*upload),
            manifest,
        }))
    }
}
