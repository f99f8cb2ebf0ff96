//! The running gateway's control socket: `sund-gateway admin …` on the same data directory
//! reaches the running gateway through it, instead of opening the database (which the running
//! gateway holds locked).
//!
//! The socket is `DATA_DIR/admin.sock`, created by the gateway with mode 0600 inside its 0700
//! data directory, and a connection whose peer is not the gateway's own user is refused: only
//! the user the gateway runs as (or root) can administer it. One connection carries one request:
//! the client writes an [`AdminRequest`] as JSON and closes its side; the gateway answers with
//! one [`ControlReply`] as JSON once the commit that makes the answer true is durable, and
//! writes an audit line (who, what, the outcome; never a token).

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::admin::{AdminRequest, Printed};
use crate::driver::AdminClient;

/// The control socket's file name inside the gateway's data directory.
pub const SOCKET_NAME: &str = "admin.sock";
/// The largest request the gateway reads (bytes): a `create-conversation` naming
/// [`crate::admin::MEMBERS_MAX`] keys fits.
pub const REQUEST_MAX: u64 = 512 * 1024;
/// The largest answer a client reads (bytes).
pub const REPLY_MAX: u64 = 256 * 1024 * 1024;
/// How long the gateway waits for a connection's request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client waits for the answer (a commit on a busy, slow disk included).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests served at once; more connections are answered "busy".
const CONCURRENT_MAX: usize = 8;

/// What the running gateway answers to one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlReply {
    /// Done: what to print.
    Done(Printed),
    /// Refused or failed: what to tell the operator.
    Failed(String),
}

/// The control socket of a running gateway. Dropping it stops accepting and removes the file.
pub struct ControlSocket {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates the control socket of the gateway whose data directory is `data_dir` and serves
/// operator requests through `admin`. Call it only while holding the gateway's database (so no
/// other gateway serves this data directory): a socket left by a gateway that was killed is
/// replaced.
pub fn listen(data_dir: &Path, admin: AdminClient) -> std::io::Result<ControlSocket> {
    let path = &data_dir.join(SOCKET_NAME);
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    let listener = {
        let (short, _dir) = socket_address(path)?;
        UnixListener::bind(short)?
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let owner = std::fs::metadata(path)?.uid();
    let task = tokio::spawn(accept(
        listener,
        admin,
        owner,
        Arc::new(data_dir.to_path_buf()),
    ));
    Ok(ControlSocket {
        path: path.to_path_buf(),
        task,
    })
}

async fn accept(listener: UnixListener, admin: AdminClient, owner: u32, data_dir: Arc<PathBuf>) {
    let slots = Arc::new(Semaphore::new(CONCURRENT_MAX));
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let busy = ControlReply::Failed(format!(
                "the gateway is serving {CONCURRENT_MAX} admin requests already: try again in a moment"
            ));
            tokio::spawn(async move { write_reply(&mut stream, &busy).await });
            continue;
        };
        let admin = admin.clone();
        let data_dir = data_dir.clone();
        tokio::spawn(async move {
            serve_one(stream, &admin, owner, &data_dir).await;
            drop(slot);
        });
    }
}

async fn serve_one(mut stream: UnixStream, admin: &AdminClient, owner: u32, data_dir: &Path) {
    let (uid, pid) = match stream.peer_cred() {
        Ok(cred) => (cred.uid(), cred.pid()),
        Err(e) => {
            tracing::warn!(error = %e, "control socket: cannot tell who connected; refused");
            return;
        }
    };
    if uid != owner && uid != 0 {
        tracing::warn!(
            target: "sund_gateway::audit",
            uid,
            pid,
            "admin request refused: not the gateway's user"
        );
        let refused =
            ControlReply::Failed("only the user the gateway runs as may administer it".into());
        write_reply(&mut stream, &refused).await;
        return;
    }
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(request)) => request,
        Ok(Err(e)) => {
            tracing::warn!(target: "sund_gateway::audit", uid, pid, error = %e, "admin request refused");
            write_reply(&mut stream, &ControlReply::Failed(e)).await;
            return;
        }
        Err(_) => {
            tracing::warn!(target: "sund_gateway::audit", uid, pid, "admin request refused: none arrived within 10 s");
            return;
        }
    };
    let reply = execute(admin, &request, data_dir).await;
    match &reply {
        ControlReply::Done(_) => tracing::info!(
            target: "sund_gateway::audit",
            uid,
            pid,
            request = request.verb(),
            subject = %request.subject(),
            "admin request done"
        ),
        ControlReply::Failed(why) => tracing::warn!(
            target: "sund_gateway::audit",
            uid,
            pid,
            request = request.verb(),
            subject = %request.subject(),
            why = %why,
            "admin request failed"
        ),
    }
    write_reply(&mut stream, &reply).await;
}

/// Reads one request: JSON up to [`REQUEST_MAX`] bytes, ended by the client closing its side.
async fn read_request(stream: &mut UnixStream) -> Result<AdminRequest, String> {
    let mut bytes = Vec::new();
    (&mut *stream)
        .take(REQUEST_MAX + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("cannot read the request: {e}"))?;
    decode_request(&bytes)
}

/// Decodes a request as the gateway receives it; never panics, whatever the bytes.
pub fn decode_request(bytes: &[u8]) -> Result<AdminRequest, String> {
    if bytes.len() as u64 > REQUEST_MAX {
        return Err(format!(
            "the request is longer than {REQUEST_MAX} bytes: split it"
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        format!("the request is not one this gateway knows ({e}): use a `sund-gateway` of the same version")
    })
}

/// Carries out one request on the running gateway (the control socket and the web page share it).
pub(crate) async fn execute(
    admin: &AdminClient,
    request: &AdminRequest,
    data_dir: &Path,
) -> ControlReply {
    const UNAVAILABLE: &str = "the gateway cannot answer now: its store is unavailable (see its log) or it is stopping; try again once it serves";
    let command = match request.command() {
        Ok(command) => command,
        Err(why) => return ControlReply::Failed(why),
    };
    if let AdminRequest::Backup { file } = request {
        let Some(reader) = admin.reader().await else {
            return ControlReply::Failed(UNAVAILABLE.into());
        };
        let (data_dir, dest) = (data_dir.to_path_buf(), PathBuf::from(file));
        // A snapshot read beside the commits, on a thread that yields the CPU and the disk
        // to them.
        let done = sund_runtime::background::run("sund-backup", move || {
            crate::backup::backup(&reader, &data_dir, &dest)
        })
        .await;
        return match done {
            Ok(Ok(printed)) => ControlReply::Done(printed),
            Ok(Err(why)) => ControlReply::Failed(why),
            Err(_) => ControlReply::Failed("the backup stopped before it finished".into()),
        };
    }
    let answer = match command {
        Some(command) => match admin.admin(command).await {
            Some(answer) => Some(answer),
            None => return ControlReply::Failed(UNAVAILABLE.into()),
        },
        None => None,
    };
    let request = request.clone();
    match admin
        .inspect(move |gateway, now| request.render(gateway, now, answer))
        .await
    {
        Some(Ok(printed)) => ControlReply::Done(printed),
        Some(Err(why)) => ControlReply::Failed(why),
        None => ControlReply::Failed(UNAVAILABLE.into()),
    }
}

async fn write_reply(stream: &mut UnixStream, reply: &ControlReply) {
    let bytes = serde_json::to_vec(reply).expect("a reply always encodes");
    if let Err(e) = stream.write_all(&bytes).await {
        tracing::warn!(error = %e, "control socket: the admin client left before its answer");
    }
    let _ = stream.shutdown().await;
}

/// The longest path a Unix socket address holds on Linux (`sun_path` is 108 bytes with its NUL).
const SOCKET_PATH_MAX: usize = 107;

/// An address for the socket at `path` that fits a socket address: `path` itself, or, for a
/// data directory deeper than that allows, the socket's name under `/proc/self/fd/N` where `N`
/// is the directory held open (returned beside it: keep it open while binding or connecting).
fn socket_address(path: &Path) -> std::io::Result<(PathBuf, Option<std::fs::File>)> {
    use std::os::fd::AsRawFd;
    if path.as_os_str().len() <= SOCKET_PATH_MAX {
        return Ok((path.to_path_buf(), None));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok((path.to_path_buf(), None));
    };
    let dir = std::fs::File::open(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    Ok((short, Some(dir)))
}

/// Why [`ask`] got no answer.
#[derive(Debug)]
pub enum AskError {
    /// No gateway listens on this data directory (no socket, or one left by a gateway that
    /// stopped): the database can be opened directly.
    NotRunning,
    /// A gateway runs but the request did not get through; what to tell the operator.
    Failed(String),
}

/// Sends `request` to the gateway running on the data directory whose control socket is `path`
/// and waits for its answer (blocking; for the `sund-gateway admin` command).
pub fn ask(path: &Path, request: &AdminRequest) -> Result<Result<Printed, String>, AskError> {
    // A gateway makes its socket 0600 in a 0700 directory: one that others may open, or that
    // another user owns, was not made by it, and gets no request (a token is a secret).
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let me = std::fs::metadata(path.parent().unwrap_or(Path::new("."))).map(|d| d.uid());
        if meta.mode() & 0o077 != 0 || me.is_ok_and(|owner| owner != meta.uid()) {
            return Err(AskError::Failed(format!(
                "{} is not as the gateway makes it (mode {:o}, owner uid {}): another user could have made or reach it. Stop the gateway, remove the file, and start the gateway again",
                path.display(),
                meta.mode() & 0o7777,
                meta.uid()
            )));
        }
    }
    let connected = socket_address(path)
        .and_then(|(short, _dir)| std::os::unix::net::UnixStream::connect(short));
    let mut stream = match connected {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(AskError::NotRunning)
        }
        Err(e) => {
            return Err(AskError::Failed(format!(
                "cannot reach the running gateway through {}: {e}; run this as the user the gateway runs as",
                path.display()
            )))
        }
    };
    let failed = |e: std::io::Error| {
        AskError::Failed(format!(
            "the running gateway ({}) did not answer: {e}; see its log",
            path.display()
        ))
    };
    // A backup takes as long as the store is large; everything else answers within a commit.
    let timeout = match request {
        AdminRequest::Backup { .. } => None,
        _ => Some(REPLY_TIMEOUT),
    };
    stream.set_read_timeout(timeout).map_err(failed)?;
    let bytes = serde_json::to_vec(request).expect("a request always encodes");
    stream.write_all(&bytes).map_err(failed)?;
    stream.shutdown(std::net::Shutdown::Write).map_err(failed)?;
    let mut answer = Vec::new();
    stream
        .take(REPLY_MAX)
        .read_to_end(&mut answer)
        .map_err(failed)?;
    if answer.is_empty() {
        return Err(AskError::Failed(format!(
            "the running gateway ({}) closed the connection without an answer; see its log",
            path.display()
        )));
    }
    match serde_json::from_slice::<ControlReply>(&answer) {
        Ok(ControlReply::Done(printed)) => Ok(Ok(printed)),
        Ok(ControlReply::Failed(why)) => Ok(Err(why)),
        Err(e) => Err(AskError::Failed(format!(
            "the running gateway's answer is not understood ({e}): use a `sund-gateway` of the same version"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_have_a_stable_form_on_the_socket() {
        let request = AdminRequest::Revoke {
            device: "dev:00".into(),
        };
        let text = String::from_utf8(serde_json::to_vec(&request).unwrap()).unwrap();
        assert_eq!(text, r#"{"request":"revoke","device":"dev:00"}"#);
        assert_eq!(decode_request(text.as_bytes()), Ok(request));
        let reply = ControlReply::Failed("no".into());
        assert_eq!(
            String::from_utf8(serde_json::to_vec(&reply).unwrap()).unwrap(),
            r#"{"failed":"no"}"#
        );
    }

    #[test]
    fn unknown_fields_and_oversized_requests_are_refused() {
        let err =
            decode_request(br#"{"request":"revoke","device":"dev:00","all":true}"#).unwrap_err();
        assert!(err.contains("same version"), "{err}");
        let big = vec![b' '; REQUEST_MAX as usize + 1];
        assert!(decode_request(&big).unwrap_err().contains("longer than"));
    }

    #[test]
    fn a_socket_others_may_open_gets_no_request() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(SOCKET_NAME);
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        match ask(&path, &AdminRequest::Crl { json: false }) {
            Err(AskError::Failed(why)) => {
                assert!(
                    why.contains("mode 666") && why.contains("remove the file"),
                    "{why}"
                )
            }
            other => panic!("asked through a loose socket: {other:?}"),
        }
    }

    #[test]
    fn a_socket_deeper_than_a_socket_address_allows_is_still_reached() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join(SOCKET_NAME);
        assert!(path.as_os_str().len() > SOCKET_PATH_MAX);
        let (short, dir) = socket_address(&path).unwrap();
        assert!(short.as_os_str().len() <= SOCKET_PATH_MAX && dir.is_some());
        let listener = std::os::unix::net::UnixListener::bind(&short).unwrap();
        drop(dir);
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_socket());
        let (client, _dir) = socket_address(&path).unwrap();
        let _stream = std::os::unix::net::UnixStream::connect(client).unwrap();
        assert!(listener.accept().is_ok());
        // A short path is used as it is.
        let short_path = tmp.path().join(SOCKET_NAME);
        if short_path.as_os_str().len() <= SOCKET_PATH_MAX {
            assert_eq!(socket_address(&short_path).unwrap().0, short_path);
        }
    }

    proptest! {
        #[test]
        fn any_bytes_decode_to_a_request_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(&bytes);
        }

        #[test]
        fn requests_round_trip(user in "\\PC{0,40}", keys in proptest::collection::vec("[0-9a-f]{64}", 0..4)) {
            for request in [
                AdminRequest::EnrolToken { user: user.clone() },
                AdminRequest::Revoke { device: user.clone() },
                AdminRequest::CreateConversation { name: user.clone(), members: keys.clone() },
                AdminRequest::Devices { json: false },
                AdminRequest::Crl { json: true },
                AdminRequest::List { json: false },
            ] {
                let bytes = serde_json::to_vec(&request).unwrap();
                prop_assert_eq!(decode_request(&bytes), Ok(request));
            }
        }
    }
}
