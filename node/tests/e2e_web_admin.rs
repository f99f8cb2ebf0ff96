//! The gateway's web admin page in a real headless Chromium (Debian's `chromium`, which CI
//! installs): a forged token is refused, the operator signs in, revokes a device through the
//! page and its confirmation, and sees the CRL version grow; a token issued in the page can be
//! expired there. The browser is driven over the DevTools protocol.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::*;

/// A headless Chromium and one page of it, driven over the DevTools protocol.
struct Browser {
    _child: Guard,
    _profile: tempfile::TempDir,
    socket: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    session: String,
    next: u64,
}

fn chromium() -> String {
    std::env::var("SUND_CHROMIUM").unwrap_or_else(|_| {
        ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|b| {
                Command::new("sh")
                    .arg("-c")
                    .arg(format!("command -v {b}"))
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect(
                "no Chromium: `apt-get install chromium` (CI installs it), or set SUND_CHROMIUM",
            )
            .to_string()
    })
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keeps reading, so that Chromium never blocks on a full pipe.
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("Chromium says where its DevTools listen");
        let (socket, _) = tungstenite::connect(url.as_str()).expect("DevTools websocket");
        let mut browser = Browser {
            _child: Guard(child),
            _profile: profile,
            socket,
            session: String::new(),
            next: 0,
        };
        let target = browser.call("Target.createTarget", json!({ "url": "about:blank" }));
        let target = target["targetId"].as_str().unwrap().to_string();
        let attached = browser.call(
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser
    }

    /// Sends one command (to the page once attached) and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.socket
            .send(tungstenite::Message::text(message.to_string()))
            .unwrap();
        loop {
            let reply = self.socket.read().expect("DevTools answers");
            let Ok(text) = reply.to_text() else { continue };
            let reply: Value = serde_json::from_str(text).unwrap();
            if reply["id"] == json!(id) {
                assert!(reply.get("error").is_none(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        );
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true on the page.
    fn wait(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.eval(expression) != json!(true) {
            if Instant::now() > deadline {
                let body = self.eval("document.body ? document.body.innerText : ''");
                panic!(
                    "waiting for {what}; the page shows:\n{}",
                    body.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn text(&mut self, id: &str) -> String {
        let value = self.eval(&format!("document.getElementById({id:?}).textContent"));
        value.as_str().unwrap_or_default().to_string()
    }

    fn click(&mut self, selector: &str) {
        self.eval(&format!(
            "document.querySelector({selector:?}).click(); true"
        ));
    }
}

/// One HTTP request to the admin page: status line and body.
fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn crl(gw: &str) -> Value {
    let text = run(
        &gateway_binary(),
        &["admin", "crl", "--json", "--data-dir", gw],
    );
    serde_json::from_str(&text).unwrap()
}

#[test]
fn an_operator_signs_in_revokes_a_device_through_the_page_and_sees_the_crl_grow() {
    let room = RoomOfTwo::new();
    let (tmp, gw_dir, port, gw) = (room.tmp.path(), &room.gw_dir, room.port, room.gw());
    let (a, b) = (room.a.as_str(), room.b.as_str());
    let web = free_tcp_addr();
    let _gateway = Guard(start_gateway_with(gw_dir, port, &["--admin-web", &web]));
    let mut device_a = String::new();
    for dir in [a, b] {
        let status = run(&sund(), &["status", "--json", "--data-dir", dir]);
        let status: Value = serde_json::from_str(&status).unwrap();
        assert_eq!(status["connection"], "connected", "{status}");
        if dir == a {
            device_a = status["device"].as_str().unwrap().to_string();
        }
    }
    let token = std::fs::read_to_string(gw_dir.join("admin-web.token")).unwrap();
    let token = token.trim();

    // Without the token, or with a forged one, nothing is shown and nothing changes.
    let (status, body) = http(&web, "GET", "/api/devices", None);
    assert_eq!(status, "HTTP/1.1 401 Unauthorized", "{body}");
    assert!(body.contains("admin-web.token"), "{body}");
    assert!(!body.contains(&device_a));
    let revoke = format!("/api/devices/{device_a}/revoke");
    let (status, _) = http(&web, "POST", &revoke, Some(&"0".repeat(64)));
    assert_eq!(status, "HTTP/1.1 401 Unauthorized");
    assert_eq!(crl(gw)["version"], 0);

    let mut page = Browser::start();
    page.call("Page.navigate", json!({ "url": format!("http://{web}/") }));
    page.wait(
        "the sign-in form",
        "document.readyState === 'complete' && document.getElementById('login') !== null",
    );
    page.eval("document.getElementById('token').value = 'forged'; true");
    page.click("#login");
    page.wait(
        "the refusal",
        "document.getElementById('login-error').textContent.includes('wrong token')",
    );
    assert_eq!(
        page.eval("document.getElementById('admin-view').hidden"),
        json!(true)
    );

    page.eval(&format!(
        "document.getElementById('token').value = {token:?}; true"
    ));
    page.click("#login");
    let button = format!("[data-revoke=\"{device_a}\"]");
    page.wait(
        "the device list",
        &format!("document.querySelector({button:?}) !== null"),
    );
    page.wait(
        "the health figures",
        "document.getElementById('crl-version').textContent === '0'",
    );
    assert_eq!(page.text("sessions").parse::<u64>().map(|_| ()), Ok(()));

    // Revoking asks first; nothing changes until the operator confirms.
    page.click(&button);
    page.wait(
        "the confirmation",
        &format!(
            "!document.getElementById('confirm').hidden && document.getElementById('confirm-text').textContent.includes({device_a:?})"
        ),
    );
    assert_eq!(crl(gw)["version"], 0, "not before the confirmation");
    page.click("#confirm-yes");
    page.wait(
        "the CRL version to grow",
        "document.getElementById('crl-version').textContent === '1'",
    );
    page.wait(
        "the device shown revoked",
        &format!(
            "[...document.querySelectorAll('#devices tr')].some(r => r.textContent.includes({device_a:?}) && r.textContent.includes('revoked'))"
        ),
    );
    assert!(
        page.text("action-result").contains("revoked"),
        "{}",
        page.text("action-result")
    );
    // The gateway agrees, and the device is refused from now on.
    let now = crl(gw);
    assert_eq!(now["version"], 1);
    assert_eq!(now["revoked"], json!([device_a]));
    let out = Command::new(sund())
        .args(["status", "--data-dir", a])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));

    // A token issued in the page is listed by id and expires from there.
    page.eval("document.getElementById('token-user').value = 'carol'; true");
    page.click("#token-form button");
    page.wait(
        "the new token",
        "document.getElementById('new-token').textContent.includes('sund-enrol:')",
    );
    page.wait(
        "the token's expire button",
        "document.querySelector('[data-expire]') !== null",
    );
    page.click("[data-expire]");
    page.wait(
        "the token shown expired",
        "[...document.querySelectorAll('#tokens tr')].some(r => r.textContent.includes('expired'))",
    );
    let tokens = run(
        &gateway_binary(),
        &["admin", "tokens", "--json", "--data-dir", gw],
    );
    let tokens: Value = serde_json::from_str(&tokens).unwrap();
    let expired = tokens
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] == "expired")
        .count();
    assert_eq!(expired, 1, "{tokens}");

    // Every change made through the page is an audit line, and the token is in none.
    let log = std::fs::read_to_string(tmp.join("gateway.log")).unwrap();
    assert!(
        log.contains("source=\"web\"") && log.contains("request=\"revoke\""),
        "{log}"
    );
    assert!(log.contains("no or wrong admin token"));
    assert!(!log.contains(token));
}
