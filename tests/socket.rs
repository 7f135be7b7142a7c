//! The socket API (`[daemon] socket`) and systemd's `LoadCredential=` protocol
//! (`[daemon] credential_socket`) against a real `tokend run` child, over real Unix sockets, with
//! callers of other uids (setpriv) where access control is the point.

mod support;

use nix::sys::signal::Signal;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::{World, wait_for};
use tokend::dev::mock::{Fault, MockSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The server's connection limit (`tokend::socket::MAX_CONNECTIONS`).
const LIMIT: usize = tokend::socket::MAX_CONNECTIONS;

fn credential(name: &str, extra: &str) -> String {
    format!(
        "[[credential]]\nname = \"{name}\"\nprovider = \"oauth2\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"c\"\nclient_secret = \"s\"\n{extra}\n"
    )
}

/// A world whose daemon serves the API on `<dir>/tokend.sock` (and the credential socket).
async fn world(settings: MockSettings, credentials: &str) -> World {
    let w = World::new(settings).await;
    w.write_config_with_daemon(
        "socket = \"tokend.sock\"\ncredential_socket = \"credentials.sock\"\ntrigger_dir = \"triggers\"",
        credentials,
    );
    w
}

struct Answer {
    status: u16,
    body: serde_json::Value,
    raw: String,
}

/// One request on its own connection (`Connection: close`), answer read to EOF.
async fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Answer {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // A server refusing a large body may answer and close before reading it all: the write can
    // fail, and the read end with a reset after the answer.
    let _ = stream.write_all(request.as_bytes()).await;
    parse(&read_all(&mut stream).await)
}

/// Reads until EOF or an error, within 60 s.
async fn read_all(stream: &mut UnixStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let read = async {
        let mut buf = [0u8; 8192];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.expect("an answer within 60 s");
    raw
}

fn parse(raw: &[u8]) -> Answer {
    let raw = String::from_utf8_lossy(raw).into_owned();
    let status = raw.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Answer { status, body: serde_json::from_str(body).unwrap_or_default(), raw }
}

fn token_path(name: &str) -> String {
    format!("/v1/credentials/{name}/token")
}

fn refresh_body(token: &str) -> String {
    serde_json::json!({ "rejected": token }).to_string()
}

fn stored_token(w: &World, name: &str) -> String {
    w.store().get(name).unwrap().unwrap().access_token.expose().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_and_error_code() {
    let mut config = String::new();
    for name in ["a", "fresh", "gone", "limited", "broken"] {
        config.push_str(&credential(name, ""));
    }
    config.push_str(&credential("empty", ""));
    let w = world(MockSettings { expires_in: 600, ..MockSettings::default() }, &config).await;
    for name in ["a", "fresh", "gone", "limited", "broken"] {
        w.authorize_and_import(name).await;
    }
    let daemon = w.start_daemon().await;
    let socket = w.path("tokend.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "the socket is 0660");

    // GET /v1/credentials
    let list = call(&socket, "GET", "/v1/credentials", None).await;
    assert_eq!(list.status, 200, "{}", list.raw);
    let rows = list.body["credentials"].as_array().unwrap();
    assert_eq!(rows.len(), 6);
    let a = rows.iter().find(|r| r["name"] == "a").unwrap();
    assert_eq!((a["status"].as_str(), a["generation"].as_i64()), (Some("active"), Some(1)));
    assert!(a["expires_in"].as_i64().unwrap() > 590 && a["next_refresh_at"].is_string(), "{a}");
    assert_eq!(rows.iter().find(|r| r["name"] == "empty").unwrap()["status"], "no_token");
    assert!(!list.raw.contains(&stored_token(&w, "a")), "a listing holds no token");

    // GET …/token
    let got = call(&socket, "GET", &token_path("a"), None).await;
    assert_eq!(got.status, 200, "{}", got.raw);
    assert_eq!(got.body["access_token"], stored_token(&w, "a"));
    assert_eq!(got.body["token_type"], "Bearer");
    assert_eq!(got.body["generation"], 1);
    assert!((590..=600).contains(&got.body["expires_in"].as_i64().unwrap()), "{}", got.body);
    assert!(got.body["expires_at"].is_string());
    assert!(got.raw.to_ascii_lowercase().contains("cache-control: no-store"));

    // Errors: each a JSON {error, message}, never with a token in it.
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        ("GET", token_path("empty"), None, 404, "no_token"),
        ("GET", token_path("nobody"), None, 404, "not_found"),
        ("GET", "/v1/credentials/..%2F..%2Fetc%2Fpasswd/token".into(), None, 400, "invalid_name"),
        ("GET", "/v1/credentials/../../etc/passwd".into(), None, 404, "not_found"),
        ("GET", "/v1/credentials/a/../../token".into(), None, 404, "not_found"),
        ("GET", "/v2/credentials".into(), None, 404, "not_found"),
        ("GET", format!("{}?min_valid=soon", token_path("a")), None, 400, "bad_request"),
        ("GET", format!("{}?min_valid=600", token_path("a")), None, 400, "min_valid_too_long"),
        ("PUT", token_path("a"), None, 405, "method_not_allowed"),
        ("POST", "/v1/credentials/a/refresh".into(), Some("{\"rejected\": ".into()), 400, "invalid_json"),
        (
            "POST",
            "/v1/credentials/a/refresh".into(),
            Some(format!("\"{}\"", stored_token(&w, "a"))),
            400,
            "invalid_json",
        ),
        ("POST", "/v1/credentials/a/refresh".into(), Some("{\"token\": \"x\"}".into()), 400, "invalid_json"),
        ("POST", "/v1/credentials/a/refresh".into(), Some("x".repeat(64 * 1024)), 413, "body_too_large"),
    ];
    for (method, path, body, status, code) in &cases {
        let answer = call(&socket, method, path, body.as_deref()).await;
        assert_eq!(
            (answer.status, answer.body["error"].as_str()),
            (*status, Some(*code)),
            "{method} {path}: {}",
            answer.raw
        );
        assert!(answer.body["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(!answer.raw.contains(&stored_token(&w, "a")), "{method} {path}: a token in an error: {}", answer.raw);
    }
    assert_eq!(w.mock.refreshes(), 0, "no error above reached the provider");

    // A token already replaced is answered with the current one, no provider request.
    let old = call(&socket, "POST", "/v1/credentials/a/refresh", Some(&refresh_body("not-the-current-one"))).await;
    assert_eq!((old.status, old.body["generation"].as_i64()), (200, Some(1)), "{}", old.raw);
    assert_eq!(w.mock.refreshes(), 0);

    // The current token reported rejected: replaced.
    let current = stored_token(&w, "fresh");
    let new = call(&socket, "POST", "/v1/credentials/fresh/refresh", Some(&refresh_body(&current))).await;
    assert_eq!((new.status, new.body["generation"].as_i64()), (200, Some(2)), "{}", new.raw);
    assert_ne!(new.body["access_token"], current);
    assert_eq!(new.body["access_token"], stored_token(&w, "fresh"));
    assert_eq!(w.mock.refreshes(), 1);

    // 409: the provider rejects the grant.
    w.mock.push_fault(Fault::Answer {
        status: 400,
        body: r#"{"error":"invalid_grant","error_description":"revoked"}"#.into(),
        headers: vec![],
    });
    let gone =
        call(&socket, "POST", "/v1/credentials/gone/refresh", Some(&refresh_body(&stored_token(&w, "gone")))).await;
    assert_eq!((gone.status, gone.body["error"].as_str()), (409, Some("needs_reauth")), "{}", gone.raw);
    let again = call(&socket, "GET", &token_path("gone"), None).await;
    assert_eq!((again.status, again.body["error"].as_str()), (409, Some("needs_reauth")), "{}", again.raw);

    // 503: the provider fails.
    w.mock.push_fault(Fault::Answer { status: 500, body: "oops".into(), headers: vec![] });
    let broken =
        call(&socket, "POST", "/v1/credentials/broken/refresh", Some(&refresh_body(&stored_token(&w, "broken")))).await;
    assert_eq!((broken.status, broken.body["error"].as_str()), (503, Some("refresh_failed")), "{}", broken.raw);
    assert!(broken.raw.to_ascii_lowercase().contains("retry-after:"));

    // 429: the provider asks for a pause (for this endpoint and client: every credential here);
    // asking again meanwhile is answered at once.
    w.mock.push_fault(Fault::Answer {
        status: 429,
        body: r#"{"error":"slow_down"}"#.into(),
        headers: vec![("Retry-After".into(), "120".into())],
    });
    let token = stored_token(&w, "limited");
    let limited = call(&socket, "POST", "/v1/credentials/limited/refresh", Some(&refresh_body(&token))).await;
    assert_eq!((limited.status, limited.body["error"].as_str()), (429, Some("rate_limited")), "{}", limited.raw);
    assert!(limited.raw.to_ascii_lowercase().contains("retry-after: 120"), "{}", limited.raw);
    let requests = w.mock.requests().len();
    let paused = call(&socket, "POST", "/v1/credentials/limited/refresh", Some(&refresh_body(&token))).await;
    assert_eq!(paused.status, 429, "{}", paused.raw);
    assert_eq!(w.mock.requests().len(), requests, "no request while paused");

    let log = daemon.log_text();
    for name in ["a", "fresh", "gone", "limited", "broken"] {
        let token = stored_token(&w, name);
        assert!(!log.contains(&token), "{name}'s token in the daemon's log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_callers_reporting_one_rejected_token_cause_one_refresh() {
    let w = world(MockSettings { delay: Duration::from_millis(300), ..MockSettings::default() }, &credential("nb", ""))
        .await;
    w.authorize_and_import("nb").await;
    let _daemon = w.start_daemon().await;
    let socket = w.path("tokend.sock");
    let rejected = stored_token(&w, "nb");
    let callers: Vec<_> = (0..100)
        .map(|_| {
            let (socket, body) = (socket.clone(), refresh_body(&rejected));
            tokio::spawn(async move { call(&socket, "POST", "/v1/credentials/nb/refresh", Some(&body)).await })
        })
        .collect();
    let mut tokens = std::collections::HashSet::new();
    for caller in callers {
        let answer = caller.await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.raw);
        assert_eq!(answer.body["generation"], 2);
        tokens.insert(answer.body["access_token"].as_str().unwrap().to_string());
    }
    assert_eq!(w.mock.refreshes(), 1, "exactly one provider request");
    assert_eq!(w.mock.reuses(), 0, "no refresh token was spent twice");
    assert_eq!(tokens.len(), 1, "every caller got the same token");
    let new = tokens.into_iter().next().unwrap();
    assert_ne!(new, rejected);
    assert_eq!(new, stored_token(&w, "nb"));

    // A caller still holding the old token gets the current one, with no provider request.
    let late = call(&socket, "POST", "/v1/credentials/nb/refresh", Some(&refresh_body(&rejected))).await;
    assert_eq!((late.status, late.body["access_token"].as_str()), (200, Some(new.as_str())), "{}", late.raw);
    assert_eq!(w.mock.refreshes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_refreshes_of_one_credential_keep_the_trigger_floor() {
    let w = world(MockSettings::default(), &credential("nb", "")).await;
    w.authorize_and_import("nb").await;
    let _daemon = w.start_daemon().await;
    let socket = w.path("tokend.sock");
    let first = call(&socket, "POST", "/v1/credentials/nb/refresh", Some(&refresh_body(&stored_token(&w, "nb")))).await;
    assert_eq!((first.status, first.body["generation"].as_i64()), (200, Some(2)), "{}", first.raw);
    // The new token reported rejected at once: refreshed, but not before the floor (5 s) ends.
    let rejected = first.body["access_token"].as_str().unwrap();
    let second = call(&socket, "POST", "/v1/credentials/nb/refresh", Some(&refresh_body(rejected))).await;
    assert_eq!((second.status, second.body["generation"].as_i64()), (200, Some(3)), "{}", second.raw);
    let at: Vec<i64> = w.mock.requests().iter().map(|r| r.received_at_ms).collect();
    assert_eq!(at.len(), 2);
    assert!(at[1] - at[0] >= 4_500, "the second forced refresh came {} ms after the first", at[1] - at[0]);
    // A trigger file right after shares the floor.
    std::fs::write(w.path("triggers/nb.refresh"), "").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(w.mock.refreshes(), 2, "the trigger waits for the floor the socket set");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_valid_beyond_the_remaining_life_refreshes_once_and_beyond_the_whole_life_is_refused() {
    let w = world(MockSettings { expires_in: 40, ..MockSettings::default() }, &credential("nb", "")).await;
    w.authorize_and_import("nb").await;
    let _daemon = w.start_daemon().await;
    let socket = w.path("tokend.sock");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let enough = call(&socket, "GET", &format!("{}?min_valid=30", token_path("nb")), None).await;
    assert_eq!((enough.status, enough.body["generation"].as_i64()), (200, Some(1)), "{}", enough.raw);
    assert_eq!(w.mock.refreshes(), 0, "37 s left is enough for 30");

    let callers: Vec<_> = (0..10)
        .map(|_| {
            let socket = socket.clone();
            tokio::spawn(async move { call(&socket, "GET", &format!("{}?min_valid=39", token_path("nb")), None).await })
        })
        .collect();
    for caller in callers {
        let answer = caller.await.unwrap();
        assert_eq!((answer.status, answer.body["generation"].as_i64()), (200, Some(2)), "{}", answer.raw);
        assert!(answer.body["expires_in"].as_i64().unwrap() >= 39, "{}", answer.body);
    }
    assert_eq!(w.mock.refreshes(), 1, "ten callers, one refresh");

    let too_long = call(&socket, "GET", &format!("{}?min_valid=41", token_path("nb")), None).await;
    assert_eq!(
        (too_long.status, too_long.body["error"].as_str()),
        (400, Some("min_valid_too_long")),
        "{}",
        too_long.raw
    );
    assert_eq!(w.mock.refreshes(), 1);

    // `tokend token` asks the daemon.
    let run = w.tokend(&["token", "nb", "--min-valid", "30s"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.trim(), stored_token(&w, "nb"));
    let run = w.tokend(&["token", "nb", "--min-valid", "2m"], None).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("min_valid_too_long"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokend_token_without_a_daemon_reads_the_store_and_refreshes_under_the_lease() {
    let w = world(MockSettings { expires_in: 40, ..MockSettings::default() }, &credential("nb", "")).await;
    w.authorize_and_import("nb").await;
    let first = stored_token(&w, "nb");
    let run = w.tokend(&["token", "nb"], None).await;
    assert_eq!((run.code, run.stdout.trim()), (0, first.as_str()), "{}", run.stderr);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let run = w.tokend(&["token", "nb", "--min-valid", "39", "--json"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["generation"], 2);
    assert_eq!(json["access_token"], stored_token(&w, "nb"));
    assert_eq!(w.mock.refreshes(), 1);
    let run = w.tokend(&["token", "nobody"], None).await;
    assert_eq!(run.code, 4, "{}", run.stderr);
}

/// Runs `tokend token NAME` as `uid` with supplementary `groups`.
async fn token_as(w: &World, uid: u32, groups: &str, name: &str) -> support::Run {
    let bin = env!("CARGO_BIN_EXE_tokend");
    let config = w.config_path();
    let output = tokio::process::Command::new("setpriv")
        .args(["--reuid", &uid.to_string(), "--regid", &uid.to_string(), "--groups", groups, "--"])
        .args([bin, "--config", config.to_str().unwrap(), "token", name])
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("setpriv (util-linux) runs");
    support::Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_of_other_uids_are_served_by_the_kernel_s_word() {
    assert!(nix::unistd::geteuid().is_root(), "this test switches uids and needs root");
    let config =
        format!("{}{}", credential("open", ""), credential("narrow", "readers = [\"uid:61002\", \"group:nogroup\"]"));
    let w = world(MockSettings::default(), &config).await;
    w.authorize_and_import("open").await;
    w.authorize_and_import("narrow").await;
    // Other users must reach the socket and read the config (not the database).
    std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(w.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let daemon = w.start_daemon().await;
    let gid = std::fs::metadata(w.path("tokend.sock")).unwrap().gid_of();

    // A member of the socket's group: the default readers.
    let member = token_as(&w, 61001, &gid.to_string(), "open").await;
    assert_eq!((member.code, member.stdout.trim()), (0, stored_token(&w, "open").as_str()), "{}", member.stderr);
    // ... but not one of `narrow`'s readers.
    let refused = token_as(&w, 61001, &gid.to_string(), "narrow").await;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(refused.stderr.contains("403 forbidden"), "{}", refused.stderr);
    assert!(refused.stdout.is_empty());
    assert!(
        wait_for(Duration::from_secs(5), || daemon.log_text().contains("uid=61001")
            && daemon.log_text().contains("may not read this credential"))
        .await,
        "the denial is logged with the uid: {}",
        daemon.log_text()
    );
    // Allowed by uid, and by a group given in `readers`.
    let by_uid = token_as(&w, 61002, &gid.to_string(), "narrow").await;
    assert_eq!((by_uid.code, by_uid.stdout.trim()), (0, stored_token(&w, "narrow").as_str()), "{}", by_uid.stderr);
    let nogroup = nix::unistd::Group::from_name("nogroup").unwrap().unwrap().gid;
    let by_group = token_as(&w, 61003, &format!("{gid},{nogroup}"), "narrow").await;
    assert_eq!(by_group.code, 0, "{}", by_group.stderr);
    // Not in the socket's group: the kernel refuses the connection itself.
    let outsider = token_as(&w, 61004, "61004", "open").await;
    assert_eq!(outsider.code, 1, "{}", outsider.stderr);
    assert!(outsider.stderr.contains("Permission denied"), "{}", outsider.stderr);
}

trait GidOf {
    fn gid_of(&self) -> u32;
}

impl GidOf for std::fs::Metadata {
    fn gid_of(&self) -> u32 {
        std::os::unix::fs::MetadataExt::gid(self)
    }
}

/// What systemd does for `LoadCredential=ID:socket` when starting `unit`: bind the abstract
/// address `\0<random>/unit/<unit>/<ID>`, connect, read to EOF. `address: None` connects unbound.
fn load_credential(socket: &Path, address: Option<&str>) -> Vec<u8> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, connect, socket as new_socket};
    use std::io::Read;
    let fd = new_socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    if let Some(address) = address {
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new_abstract(address.as_bytes()).unwrap()).unwrap();
    }
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(socket).unwrap()).unwrap();
    let mut stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut read = Vec::new();
    stream.read_to_end(&mut read).unwrap();
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_load_credential_is_served_to_the_units_named_and_to_nobody_else() {
    let config = format!(
        "{}{}",
        credential("my-nation", "units = [\"report-job.service\", \"report-*.service\"]"),
        credential("as-json", "units = [\"json-job.service\"]\ncredential_format = \"json\""),
    );
    let w = world(MockSettings::default(), &config).await;
    w.authorize_and_import("my-nation").await;
    w.authorize_and_import("as-json").await;
    let daemon = w.start_daemon().await;
    let socket = w.path("credentials.sock");
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    let token = stored_token(&w, "my-nation");
    let load = |address: Option<String>| {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || load_credential(&socket, address.as_deref()))
    };
    let served = load(Some("6f1b2c3d4e5f6a7b/unit/report-job.service/my-nation".into())).await.unwrap();
    assert_eq!(String::from_utf8(served).unwrap(), token, "the unit named gets the raw token");
    let globbed = load(Some("01/unit/report-daily.service/my-nation".into())).await.unwrap();
    assert_eq!(String::from_utf8(globbed).unwrap(), token, "a unit matching a glob");
    let json = load(Some("02/unit/json-job.service/as-json".into())).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(json["access_token"], stored_token(&w, "as-json"));
    for address in [
        Some("03/unit/other.service/my-nation".to_string()),
        Some("04/unit/json-job.service/my-nation".to_string()),
        Some("05/unit/report-job.service/nobody".to_string()),
        Some("06/unit/report-job.service".to_string()),
        Some("not-hex/unit/report-job.service/my-nation".to_string()),
        Some("07/user/report-job.service/my-nation".to_string()),
        None,
    ] {
        let got = load(address.clone()).await.unwrap();
        assert!(got.is_empty(), "{address:?} got {} bytes", got.len());
    }
    assert!(
        wait_for(Duration::from_secs(5), || daemon.log_text().matches("closed with nothing written").count() >= 7)
            .await,
        "every refusal is logged: {}",
        daemon.log_text()
    );
    assert!(!daemon.log_text().contains(&token));
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_callers_get_clear_refusals_bounded_memory_and_the_schedule_goes_on() {
    // `tick` refreshes on its own every ~2 s (4 s tokens) throughout.
    let config = format!("{}{}", credential("a", ""), credential("tick", "refresh_at = \"50%\""));
    let w = world(MockSettings { expires_in: 4, ..MockSettings::default() }, &config).await;
    w.authorize_and_import("a").await;
    w.authorize_and_import("tick").await;
    let daemon = w.start_daemon().await;
    let socket = w.path("tokend.sock");
    let rss_before = rss_kib(daemon.pid());
    let started = std::time::Instant::now();
    let generation_before = w.generation("tick");

    // Headers too large, or too many: 431 from the HTTP layer.
    let big = format!("GET /v1/credentials HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "y".repeat(16 * 1024));
    let many: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /v1/credentials HTTP/1.1\r\nHost: t\r\n{many}\r\n");
    for request in [big, many] {
        let mut stream = UnixStream::connect(&socket).await.unwrap();
        let _ = stream.write_all(request.as_bytes()).await;
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await.unwrap();
        assert_eq!(parse(&raw).status, 431, "{}", String::from_utf8_lossy(&raw));
    }
    // A body that never finishes, and one declared far larger than allowed.
    let mut stream = UnixStream::connect(&socket).await.unwrap();
    stream
        .write_all(b"POST /v1/credentials/a/refresh HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"rej")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await.unwrap().unwrap();
    assert_eq!(parse(&raw).status, 408, "{}", String::from_utf8_lossy(&raw));

    // Slowloris: a byte a second never completes a request head; the connection is closed.
    let mut slow = UnixStream::connect(&socket).await.unwrap();
    let loris = tokio::spawn(async move {
        let since = std::time::Instant::now();
        for byte in b"GET /v1/credentials HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\n\r\n" {
            if slow.write_all(&[*byte]).await.is_err() {
                return since.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("a slow client finished its request");
    });

    // Idle connections beyond the limit: 100 more than it (10,000 would only take the same
    // path 9,900 more times, and need the test's own descriptor limit raised). The slow client
    // above holds one slot, so 101 are closed at once and the rest stay open.
    let mut idle = Vec::new();
    for _ in 0..LIMIT + 100 {
        idle.push(UnixStream::connect(&socket).await.unwrap());
    }
    let mut probes = tokio::task::JoinSet::new();
    for mut stream in idle {
        probes.spawn(async move {
            let mut byte = [0u8; 1];
            let closed = matches!(
                tokio::time::timeout(Duration::from_millis(1000), stream.read(&mut byte)).await,
                Ok(Ok(0) | Err(_))
            );
            (stream, closed)
        });
    }
    let mut held = Vec::new();
    let mut closed_at_once = 0;
    while let Some(probe) = probes.join_next().await {
        let (stream, closed) = probe.unwrap();
        if closed {
            closed_at_once += 1;
        } else {
            held.push(stream);
        }
    }
    assert_eq!(closed_at_once, 101, "the connections past the limit are closed at once, the others kept");
    let rss_loaded = rss_kib(daemon.pid());
    // While every slot is taken, a new caller is closed at once too (no answer, no wait).
    let full = call(&socket, "GET", &token_path("a"), None).await;
    assert_eq!(full.status, 0, "{}", full.raw);
    // An idle connection is closed when no request head arrives in time; then callers are served.
    for mut stream in held {
        let rest = read_all(&mut stream).await;
        assert!(rest.is_empty(), "an idle connection got {} bytes", rest.len());
    }
    let took = loris.await.unwrap();
    assert!(took < Duration::from_secs(15), "slowloris closed after {took:?}");
    let served = call(&socket, "GET", &token_path("a"), None).await;
    assert_eq!(served.status, 200, "{}", served.raw);

    // Meanwhile `tick` kept its schedule: refreshed every ~2 s (half its 4 s tokens, ±5 %).
    let elapsed = started.elapsed();
    let ticks: Vec<i64> =
        w.mock.requests().iter().filter(|r| r.chain.as_deref() == Some("tick")).map(|r| r.received_at_ms).collect();
    let refreshed = w.generation("tick") - generation_before;
    let worst_gap = ticks.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(i64::MAX);
    assert!(ticks.len() >= 3, "{} refreshes of tick in {elapsed:?}", ticks.len());
    // 4 s tokens refreshed at half their life: a gap of 3.5 s would still leave the token valid,
    // one of 4 s would not.
    assert!(worst_gap < 3_500, "tick's refreshes were up to {worst_gap} ms apart (due every ~2,000 ms)");
    assert!(
        rss_loaded < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss_loaded} KiB with {} connections",
        LIMIT + 100
    );
    support::record_figures(
        "socket_hostile",
        &format!(
            "RSS {rss_before} KiB before, {rss_loaded} KiB with {LIMIT} connections held ({} KiB each); tick refreshed {refreshed} times in {:.1} s, worst gap {worst_gap} ms (due every ~2,000 ms)",
            (rss_loaded.saturating_sub(rss_before)) / LIMIT as u64,
            elapsed.as_secs_f64()
        ),
    );
    daemon.signal(Signal::SIGTERM);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let w = world(MockSettings::default(), &credential("a", "")).await;
    w.authorize_and_import("a").await;
    // A socket file nobody listens on: a daemon that died.
    drop(std::os::unix::net::UnixListener::bind(w.path("tokend.sock")).unwrap());
    let mut daemon = w.start_daemon().await;
    assert!(daemon.log_text().contains("replacing a stale socket"), "{}", daemon.log_text());
    assert_eq!(call(&w.path("tokend.sock"), "GET", &token_path("a"), None).await.status, 200);

    // A second daemon (its own database) pointed at the same live socket refuses to start.
    let other: PathBuf = w.path("other.toml");
    let text = std::fs::read_to_string(w.config_path()).unwrap().replace("tokend.db", "other.db");
    std::fs::write(&other, text).unwrap();
    let run = w.tokend(&["--config", other.to_str().unwrap(), "run"], None).await;
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("served by another running process"), "{}", run.stderr);
    assert_eq!(
        call(&w.path("tokend.sock"), "GET", &token_path("a"), None).await.status,
        200,
        "the first one still serves"
    );

    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, 0);
    assert!(!w.path("tokend.sock").exists(), "the socket is removed at exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_follow_a_configuration_reload() {
    assert!(nix::unistd::geteuid().is_root(), "this test switches uids and needs root");
    let w = world(MockSettings::default(), &credential("a", "readers = [\"uid:61005\"]")).await;
    w.authorize_and_import("a").await;
    std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(w.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let daemon = w.start_daemon().await;
    let gid = std::fs::metadata(w.path("tokend.sock")).unwrap().gid_of().to_string();
    let before = token_as(&w, 61006, &gid, "a").await;
    assert!(before.stderr.contains("403 forbidden"), "{}", before.stderr);
    let text = std::fs::read_to_string(w.config_path()).unwrap().replace("uid:61005", "uid:61006");
    std::fs::write(w.config_path(), text).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || daemon.log_text().contains("configuration reloaded")).await,
        "{}",
        daemon.log_text()
    );
    let after = token_as(&w, 61006, &gid, "a").await;
    assert_eq!((after.code, after.stdout.trim()), (0, stored_token(&w, "a").as_str()), "{}", after.stderr);
    let dropped = token_as(&w, 61005, &gid, "a").await;
    assert!(dropped.stderr.contains("403 forbidden"), "{}", dropped.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_answer_carries_the_provider_extras() {
    let settings =
        MockSettings { answer_extras: Some(serde_json::json!({"org_id": "o-77"})), ..MockSettings::default() };
    let w = world(settings, &credential("a", "extra_fields = [\"org_id\"]")).await;
    w.authorize_and_import("a").await;
    let _daemon = w.start_daemon().await;
    let socket = w.path("tokend.sock");
    let got = call(&socket, "GET", &token_path("a"), None).await;
    assert_eq!((got.status, &got.body["extra"]), (200, &serde_json::json!({"org_id": "o-77"})), "{}", got.raw);
    let replaced =
        call(&socket, "POST", "/v1/credentials/a/refresh", Some(&refresh_body(&stored_token(&w, "a")))).await;
    assert_eq!(
        (replaced.body["generation"].as_i64(), &replaced.body["extra"]["org_id"]),
        (Some(2), &serde_json::json!("o-77"))
    );
    let run = w.tokend(&["token", "a", "--json"], None).await;
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["extra"]["org_id"], "o-77", "{}", run.stderr);
}

/// The API keeps tokens in memory (src/socket/snapshot.rs): a token another process put in the
/// store (`tokend import` writes the sinks, then tells the daemon) is served once the daemon has
/// heard of it, and the old one never again; and a store encrypted at rest is read with the
/// daemon's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_imported_meanwhile_is_served_once_the_sink_has_it_and_a_sealed_store_is_read() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    let init = w.tokend(&["key", "init", "tokend.key"], None).await;
    assert_eq!(init.code, 0, "{}", init.stderr);
    w.write_config_with_daemon(
        "socket = \"tokend.sock\"\nkey_file = \"tokend.key\"",
        &credential("a", "[[credential.sink]]\npath = \"out/a.token\""),
    );
    let first = w.authorize_and_import("a").await["access_token"].as_str().unwrap().to_string();
    let _daemon = w.start_daemon().await;
    let socket = w.path("tokend.sock");
    for _ in 0..3 {
        let got = call(&socket, "GET", &token_path("a"), None).await;
        assert_eq!((got.status, got.body["access_token"].as_str()), (200, Some(first.as_str())), "{}", got.raw);
    }
    // `tokend import` is another process: the daemon learns of it through `<database>.changed`.
    let second = w.authorize_and_import("a").await["access_token"].as_str().unwrap().to_string();
    assert_ne!(first, second);
    let sink = std::fs::read_to_string(w.path("out/a.token")).unwrap();
    assert_eq!(sink.trim(), second, "tokend import writes the sinks itself");
    let mut served = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let got = call(&socket, "GET", &token_path("a"), None).await;
        assert_eq!(got.status, 200, "{}", got.raw);
        served.push(got.body["access_token"].as_str().unwrap().to_string());
        if served.iter().rev().take(20).filter(|t| **t == second).count() == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_new = served.iter().position(|t| *t == second).expect("the imported token was never served");
    assert!(served[first_new..].iter().all(|t| *t == second), "the old token came back: {served:?}");
    assert!(served.len() - first_new >= 20, "{served:?}");
}
