//! The web admin page (`--admin-web ADDR`): devices, certificates and revocations, enrolment
//! tokens, the CRL, conversations (ids, kinds, member counts, heads; never content) and the
//! gateway's health with a small chart, for an operator's browser on the gateway's machine.
//!
//! The page itself (`/`, `/app.js`) holds no data. Everything under `/api/` needs the admin
//! token in an `Authorization: Bearer …` header: a random secret the gateway writes once into
//! `DATA_DIR/admin-web.token` (mode 0600), so only who can read the data directory can sign in.
//! A bearer header is never sent by a browser on its own, so another site the operator visits
//! cannot act through the page (no cookies, nothing for a cross-site request to ride on). Each
//! change is carried out exactly as `sund-gateway admin` does it (released by its commit) and
//! logged as an audit line (target `sund_gateway::audit`, source `web`, the peer address).

use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::AdminRequest;
use crate::control::{self, ControlReply};
use crate::driver::AdminClient;
use crate::metrics::Gauges;

/// The token file's name inside the data directory.
pub const TOKEN_FILE: &str = "admin-web.token";
/// The largest request body the page sends (bytes): a user name.
const BODY_MAX: usize = 4 * 1024;
/// How long one request may take, a commit on a slow disk included.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// The admin page's server; dropping it stops serving.
pub struct WebAdmin {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Where the token is.
    pub token_file: PathBuf,
    task: JoinHandle<()>,
}

impl Drop for WebAdmin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The admin token: compared in constant time, never logged.
#[derive(Clone)]
struct AdminToken(Arc<String>);

impl AdminToken {
    /// Whether the request carries this token.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let (a, b) = (given.trim().as_bytes(), self.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Reads the token from `DATA_DIR/admin-web.token`, creating it (32 random bytes as hex,
/// mode 0600) on first use. A file others may read is refused: the token is a credential.
pub fn load_or_create_token(data_dir: &Path) -> Result<(PathBuf, String), String> {
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::metadata(&path) {
        Ok(meta) => {
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(format!(
                    "{} may be read by other users: `chmod 600` it, or delete it for a new token",
                    path.display()
                ));
            }
            let token = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                .trim()
                .to_string();
            if token.len() < 32 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "{} does not hold a token (64 hex digits): delete it and restart for a new one",
                    path.display()
                ));
            }
            Ok((path, token))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            sund_model::env::Entropy::fill_bytes(
                &mut sund_runtime::entropy::OsEntropy,
                &mut secret,
            );
            let token = sund_model::hex::encode(&secret);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            use std::io::Write;
            file.write_all(format!("{token}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok((path, token))
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

#[derive(Clone)]
struct Web {
    admin: AdminClient,
    token: AdminToken,
    data_dir: Arc<PathBuf>,
}

/// Serves the page on `addr` for the gateway whose data directory is `data_dir`.
pub async fn listen(
    addr: SocketAddr,
    admin: AdminClient,
    data_dir: &Path,
) -> Result<WebAdmin, String> {
    let (token_file, token) = load_or_create_token(data_dir)?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve the admin page on {addr}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot serve the admin page: {e}"))?;
    let state = Web {
        admin,
        token: AdminToken(Arc::new(token)),
        data_dir: Arc::new(data_dir.to_path_buf()),
    };
    let app = router(state);
    let task = tokio::spawn(async move {
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, service).await {
            tracing::error!(error = %e, "the admin page stopped serving");
        }
    });
    Ok(WebAdmin {
        addr,
        token_file,
        task,
    })
}

fn router(state: Web) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/app.js", get(script))
        .route("/api/overview", get(overview))
        .route(
            "/api/devices",
            listing_route("/api/devices", AdminRequest::Devices { json: true }),
        )
        .route("/api/devices/{device}/revoke", post(revoke))
        .route(
            "/api/crl",
            listing_route("/api/crl", AdminRequest::Crl { json: true }),
        )
        .route(
            "/api/conversations",
            listing_route("/api/conversations", AdminRequest::List { json: true }),
        )
        .route(
            "/api/tokens",
            listing_route("/api/tokens", AdminRequest::Tokens { json: true }).post(issue_token),
        )
        .route("/api/tokens/{id}/expire", post(expire_token))
        .layer(DefaultBodyLimit::max(BODY_MAX))
        .with_state(state)
}

const PAGE: &str = include_str!("web/index.html");
const SCRIPT: &str = include_str!("web/app.js");

/// Headers every answer carries: no framing, no sniffing, scripts from this origin only, and
/// nothing cached (answers hold the gateway's state).
fn hardened(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn page() -> Response {
    hardened(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response())
}

async fn script() -> Response {
    hardened(
        (
            [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
            SCRIPT,
        )
            .into_response(),
    )
}

/// An error as the page shows it: `{"error": "…"}`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    hardened((status, Json(serde_json::json!({ "error": message.into() }))).into_response())
}

fn refused(peer: SocketAddr, path: &str) -> Response {
    tracing::warn!(
        target: "sund_gateway::audit",
        source = "web",
        peer = %peer,
        path,
        "admin page request refused: no or wrong admin token"
    );
    error(
        StatusCode::UNAUTHORIZED,
        "wrong or missing admin token: it is in the gateway's data directory, file admin-web.token",
    )
}

/// Runs one request as `sund-gateway admin` would, within the deadline; a change is logged.
async fn run(web: &Web, peer: SocketAddr, request: AdminRequest) -> Result<String, Response> {
    let reply = tokio::time::timeout(
        REQUEST_DEADLINE,
        control::execute(&web.admin, &request, &web.data_dir),
    )
    .await
    .map_err(|_| {
        error(
            StatusCode::GATEWAY_TIMEOUT,
            "the gateway did not answer within 30 s; look at its log",
        )
    })?;
    let writes = request.writes();
    match reply {
        ControlReply::Done(printed) => {
            if writes {
                tracing::info!(
                    target: "sund_gateway::audit",
                    source = "web",
                    peer = %peer,
                    request = request.verb(),
                    subject = %request.subject(),
                    "admin request done"
                );
            }
            Ok(printed.stdout)
        }
        ControlReply::Failed(why) => {
            if writes {
                tracing::warn!(
                    target: "sund_gateway::audit",
                    source = "web",
                    peer = %peer,
                    request = request.verb(),
                    subject = %request.subject(),
                    why = %why,
                    "admin request failed"
                );
            }
            Err(error(StatusCode::BAD_REQUEST, why))
        }
    }
}

/// `GET path`: a listing, answered as the JSON document `admin … --json` prints.
fn listing_route(path: &'static str, request: AdminRequest) -> MethodRouter<Web> {
    get(
        move |State(web): State<Web>,
              ConnectInfo(peer): ConnectInfo<SocketAddr>,
              headers: HeaderMap| {
            let request = request.clone();
            async move { listing(&web, peer, &headers, path, request).await }
        },
    )
}

/// A listing request answered as the JSON document `admin … --json` prints.
async fn listing(
    web: &Web,
    peer: SocketAddr,
    headers: &HeaderMap,
    path: &str,
    request: AdminRequest,
) -> Response {
    if !web.token.admits(headers) {
        return refused(peer, path);
    }
    match run(web, peer, request).await {
        Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(value) => hardened(Json(value).into_response()),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the gateway's listing is not JSON: {e}"),
            ),
        },
        Err(response) => response,
    }
}

/// Health: sessions, conversations, CRL version and the delivery counters the chart plots.
async fn overview(
    State(web): State<Web>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if !web.token.admits(&headers) {
        return refused(peer, "/api/overview");
    }
    let now = web
        .admin
        .inspect(|gateway, now| (gateway.stats(), Gauges::of(gateway, now)))
        .await;
    match now {
        Some((stats, gauges)) => hardened(
            Json(serde_json::json!({
                "serving": true,
                "sessions_open": gauges.sessions_open,
                "conversations": gauges.conversations,
                "crl_version": gauges.crl_version,
                "sequenced": stats.delivery.sequenced,
                "deliveries": stats.delivery.deliveries,
            }))
            .into_response(),
        ),
        None => hardened(
            Json(serde_json::json!({
                "serving": false,
                "problem": "the gateway cannot serve: its store is unavailable (see its log) or it is stopping",
            }))
            .into_response(),
        ),
    }
}

/// A change (revoke, expire): `{"done": "…"}` with what the CLI would print.
async fn change(
    web: &Web,
    peer: SocketAddr,
    headers: &HeaderMap,
    path: &str,
    request: AdminRequest,
) -> Response {
    if !web.token.admits(headers) {
        return refused(peer, path);
    }
    match run(web, peer, request).await {
        Ok(text) => hardened(Json(serde_json::json!({ "done": text.trim() })).into_response()),
        Err(response) => response,
    }
}

async fn revoke(
    State(web): State<Web>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    UrlPath(device): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let request = AdminRequest::Revoke { device };
    change(&web, peer, &headers, "/api/devices/…/revoke", request).await
}

/// The body of a token request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueToken {
    user: String,
}

async fn issue_token(
    State(web): State<Web>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !web.token.admits(&headers) {
        return refused(peer, "/api/tokens");
    }
    let Ok(IssueToken { user }) = serde_json::from_slice(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "send {\"user\": \"NAME\"} to issue a token",
        );
    };
    match run(&web, peer, AdminRequest::EnrolToken { user }).await {
        Ok(text) => {
            let token = text.trim().to_string();
            let id = sund_model::trust::EnrolmentToken::from_text(&token)
                .map(|t| crate::admin::hex_id(t.id()))
                .unwrap_or_default();
            hardened(Json(serde_json::json!({ "token": token, "id": id })).into_response())
        }
        Err(response) => response,
    }
}

async fn expire_token(
    State(web): State<Web>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let request = AdminRequest::ExpireToken { token: id };
    change(&web, peer, &headers, "/api/tokens/…/expire", request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_admitted() {
        let token = AdminToken(Arc::new("ab".repeat(32)));
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            headers
        };
        assert!(token.admits(&with(&format!("Bearer {}", "ab".repeat(32)))));
        assert!(!token.admits(&HeaderMap::new()));
        assert!(!token.admits(&with(&format!("Bearer {}", "ab".repeat(31)))));
        assert!(!token.admits(&with(&format!("Bearer {}ac", "ab".repeat(31)))));
        assert!(!token.admits(&with(&format!("Basic {}", "ab".repeat(32)))));
        assert!(!token.admits(&with("Bearer ")));
    }

    #[test]
    fn the_token_file_is_made_once_owner_only_and_a_loose_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, token) = load_or_create_token(dir.path()).unwrap();
        assert_eq!(token.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_token(dir.path()).unwrap().1, token, "kept");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create_token(dir.path()).unwrap_err();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not a token").unwrap();
        let err = load_or_create_token(dir.path()).unwrap_err();
        assert!(err.contains("delete it"), "{err}");
    }
}
