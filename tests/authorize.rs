//! `tokend authorize` and `tokend revoke` against the loopback mock: URLs, state, PKCE, each
//! provider's code-exchange shape, the password grant, API keys, timeouts, revocation.

mod support;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;
use support::World;
use tokend::dev::mock::MockSettings;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `tokend authorize`, with the authorization URL it printed.
struct Authorizing {
    child: tokio::process::Child,
    url: url::Url,
    stdout: Vec<String>,
}

impl Authorizing {
    async fn start(w: &World, args: &[&str]) -> Authorizing {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokend"))
            .arg("authorize")
            .args(args)
            .env("TOKEND_CONFIG", w.config_path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdout = Vec::new();
        let url = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let line = lines.next_line().await.unwrap().expect("authorize printed no URL");
                stdout.push(line.clone());
                if line.starts_with("http") {
                    // The instruction follows the URL after a blank line.
                    while let Ok(Some(next)) = lines.next_line().await {
                        let done = !next.is_empty();
                        stdout.push(next);
                        if done {
                            break;
                        }
                    }
                    // Keep reading in the background so the child never blocks on a full pipe.
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    return url::Url::parse(&line).unwrap();
                }
            }
        })
        .await
        .expect("URL within 20 s");
        Authorizing { child, url, stdout }
    }

    fn param(&self, name: &str) -> Option<String> {
        self.url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
    }

    async fn paste(&mut self, text: &str) {
        let mut stdin = self.child.stdin.take().unwrap();
        stdin.write_all(format!("{text}\n").as_bytes()).await.unwrap();
    }

    async fn finish(mut self) -> (i32, String) {
        let mut stderr = self.child.stderr.take().unwrap();
        let status =
            tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.expect("authorize exits").unwrap();
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await.unwrap();
        (status.code().unwrap_or(-1), text)
    }
}

/// Plays the browser: follows the provider's redirect to tokend's loopback listener.
async fn deliver(redirect: &str) -> String {
    reqwest::get(redirect).await.unwrap().text().await.unwrap()
}

fn fields(form: BTreeMap<String, String>) -> Vec<String> {
    form.into_keys().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nudge_loopback_redirect_with_state_and_pkce() {
    let w = World::new(MockSettings::default()).await;
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    w.write_config(&format!(
        "[[credential]]\nname = \"n\"\nprovider = \"nudge\"\nbase_url = \"{{mock}}\"\nclient_id = \"nudge-id\"\nclient_secret = \"nudge-secret\"\nredirect_uri = \"{redirect}\"\n[[credential.sink]]\npath = \"n.token\"\n"
    ));
    let a = Authorizing::start(&w, &["n"]).await;
    assert_eq!(a.url.path(), "/api/oauth/zapier/authorize");
    assert_eq!(a.url.host_str(), Some("127.0.0.1"));
    assert_eq!(a.param("response_type").as_deref(), Some("code"));
    assert_eq!(a.param("client_id").as_deref(), Some("nudge-id"));
    assert_eq!(a.param("redirect_uri").as_deref(), Some(redirect.as_str()));
    assert_eq!(a.param("scope").as_deref(), Some("read write"));
    assert_eq!(a.param("code_challenge_method").as_deref(), Some("S256"));
    let state = a.param("state").expect("state");
    assert!(state.len() >= 32, "state has enough entropy: {state}");
    let challenge = a.param("code_challenge").expect("PKCE challenge");
    assert!(a.stdout.iter().any(|l| l.contains("Waiting for the redirect")), "{:?}", a.stdout);

    let code = w.mock.issue_code("n", &redirect, Some(&challenge));
    let page = deliver(&format!("{redirect}?code={code}&state={state}")).await;
    assert!(page.contains("You can close this tab"), "{page}");
    let (exit, stderr) = a.finish().await;
    assert_eq!(exit, 0, "{stderr}");

    let request = w.mock.requests().pop().unwrap();
    assert_eq!(request.path, "/api/oauth/zapier/token");
    let form = request.form().expect("form body");
    assert_eq!(
        fields(form.clone()),
        ["client_id", "client_secret", "code", "code_verifier", "grant_type", "redirect_uri"]
    );
    assert_eq!(form["grant_type"], "authorization_code");
    assert_eq!(form["code"], code);
    assert_eq!(form["redirect_uri"], redirect);
    assert_eq!(
        tokend::authorize::pkce_challenge(&form["code_verifier"]),
        challenge,
        "the verifier matches the challenge"
    );
    assert_eq!(w.row("n").await["status"], "active");
    assert_eq!(std::fs::read_to_string(w.path("n.token")).unwrap(), w.show("n").await.stdout.trim());
    assert!(w.mock.live_refresh_token("n").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nationbuilder_pasted_redirect_and_json_code_exchange() {
    let w = World::new(MockSettings::default()).await;
    w.write_config(
        "[[credential]]\nname = \"nb\"\nprovider = \"nationbuilder\"\nslug = \"mynation\"\ntoken_url = \"{mock}/oauth/token\"\nclient_id = \"nb-id\"\nclient_secret = \"nb-secret\"\nredirect_uri = \"https://myapp.example/oauth_callback\"\n",
    );
    let mut a = Authorizing::start(&w, &["nb"]).await;
    assert_eq!(a.url.as_str().split('?').next(), Some("https://mynation.nationbuilder.com/oauth/authorize"));
    assert!(
        a.stdout.iter().any(|l| l.contains("paste the full URL")),
        "not loopback: asks for a paste: {:?}",
        a.stdout
    );
    let code = w.mock.issue_code("nb", "https://myapp.example/oauth_callback", a.param("code_challenge").as_deref());
    a.paste(&format!("https://myapp.example/oauth_callback?code={code}&state={}", a.param("state").unwrap())).await;
    let (exit, stderr) = a.finish().await;
    assert_eq!(exit, 0, "{stderr}");
    let request = w.mock.requests().pop().unwrap();
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("accept"), Some("application/json"));
    let body = request.json().unwrap();
    let mut keys: Vec<&str> = body.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["client_id", "client_secret", "code", "code_verifier", "grant_type", "redirect_uri"]);
    assert_eq!(
        (body["grant_type"].as_str(), body["client_secret"].as_str()),
        (Some("authorization_code"), Some("nb-secret"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildapricot_site_url_and_basic_auth_code_exchange() {
    let w = World::new(MockSettings { send_created_at: false, ..MockSettings::default() }).await;
    w.write_config(
        "[[credential]]\nname = \"wa\"\nprovider = \"wildapricot\"\nsite = \"myorganization.wildapricot.org\"\ntoken_url = \"{mock}/auth/token\"\nclient_id = \"tcRsnqk4mp\"\nclient_secret = \"wa-secret\"\nredirect_uri = \"https://mycustomdomain.org/authcallback\"\n",
    );
    let mut a = Authorizing::start(&w, &["wa", "--paste"]).await;
    assert_eq!(a.url.as_str().split('?').next(), Some("https://myorganization.wildapricot.org/sys/login/OAuthLogin"));
    assert_eq!(a.param("scope").as_deref(), Some("auto"));
    assert_eq!(a.param("code_challenge"), None, "Wild Apricot does not document PKCE");
    let code = w.mock.issue_code("wa", "https://mycustomdomain.org/authcallback", None);
    a.paste(&format!("https://mycustomdomain.org/authcallback?code={code}&state={}", a.param("state").unwrap())).await;
    let (exit, stderr) = a.finish().await;
    assert_eq!(exit, 0, "{stderr}");
    let request = w.mock.requests().pop().unwrap();
    assert_eq!(request.basic_auth(), Some(("tcRsnqk4mp".into(), "wa-secret".into())));
    let form = request.form().unwrap();
    assert_eq!(fields(form.clone()), ["client_id", "code", "grant_type", "redirect_uri", "scope"]);
    assert_eq!((form["client_id"].as_str(), form["scope"].as_str()), ("tcRsnqk4mp", "auto"));
}

async fn refused(w: &World, redirect_query: impl Fn(&Authorizing, &str) -> String) -> (i32, String) {
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    w.write_config(&format!(
        "[[credential]]\nname = \"o\"\nprovider = \"oauth2\"\nauthorize_url = \"{{mock}}/authorize\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\nredirect_uri = \"{redirect}\"\n"
    ));
    let a = Authorizing::start(w, &["o"]).await;
    let query = redirect_query(&a, &redirect);
    deliver(&format!("{redirect}?{query}")).await;
    a.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pasted_redirect_with_a_wrong_or_missing_state_is_refused() {
    // (The loopback listener ignores such requests instead and keeps waiting: tests/security.rs.)
    let w = World::new(MockSettings::default()).await;
    let redirect = "https://myapp.example/cb";
    w.write_config(&format!(
        "[[credential]]\nname = \"o\"\nprovider = \"oauth2\"\nauthorize_url = \"{{mock}}/authorize\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\nredirect_uri = \"{redirect}\"\n"
    ));
    for (query, expected) in [
        (
            format!("code={}&state=forged", w.mock.issue_code("o", redirect, None)),
            "state does not match this authorization request",
        ),
        (format!("code={}", w.mock.issue_code("o", redirect, None)), "carries no state"),
    ] {
        let mut a = Authorizing::start(&w, &["o"]).await;
        a.paste(&format!("{redirect}?{query}")).await;
        let (exit, stderr) = a.finish().await;
        assert_eq!(exit, 1);
        assert!(stderr.contains(expected), "{stderr}");
    }
    assert!(w.mock.requests().is_empty(), "no code was exchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_denied_is_reported() {
    let w = World::new(MockSettings::default()).await;
    let (exit, stderr) = refused(&w, |a, _| {
        format!("error=access_denied&error_description=User+said+no&state={}", a.param("state").unwrap())
    })
    .await;
    assert_eq!(exit, 1);
    assert!(stderr.contains("access was denied at the provider (access_denied: User said no)"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkce_verifier_is_checked_by_the_provider() {
    let w = World::new(MockSettings::default()).await;
    // The provider bound the code to another challenge: the verifier tokend sends cannot match.
    let (exit, stderr) = refused(&w, |a, r| {
        format!("code={}&state={}", w.mock.issue_code("o", r, Some("some-other-challenge")), a.param("state").unwrap())
    })
    .await;
    assert_eq!(exit, 1);
    assert!(stderr.contains("PKCE verification failed"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_redirect_times_out() {
    let w = World::new(MockSettings::default()).await;
    let port = free_port();
    w.write_config(&format!(
        "[[credential]]\nname = \"o\"\nprovider = \"oauth2\"\nauthorize_url = \"{{mock}}/authorize\"\ntoken_url = \"{{mock}}/token\"\nclient_id = \"id\"\nredirect_uri = \"http://127.0.0.1:{port}/callback\"\n"
    ));
    let run = w.tokend(&["authorize", "o", "--timeout", "1"], None).await;
    assert_eq!(run.code, 7, "{}", run.stderr);
    assert!(run.stderr.contains("no redirect arrived within 1s"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wild_apricot_password_grant_never_shows_the_password() {
    let w = World::new(MockSettings::default()).await;
    w.mock.add_user("joe@mail.com", "pwd-Sup3r-s3cret");
    w.write_config(
        "[[credential]]\nname = \"wa\"\nprovider = \"wildapricot\"\ntoken_url = \"{mock}/auth/token\"\nclient_id = \"cid\"\nclient_secret = \"csecret\"\n",
    );
    let run = w
        .tokend_env(
            &["authorize", "wa", "--password"],
            Some("joe@mail.com\npwd-Sup3r-s3cret\n"),
            &[("RUST_LOG", "trace")],
        )
        .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.stderr.contains("pwd-Sup3r-s3cret") && !run.stdout.contains("pwd-Sup3r-s3cret"), "password leaked");
    let request = w.mock.requests().pop().unwrap();
    assert_eq!(request.basic_auth(), Some(("cid".into(), "csecret".into())));
    let form = request.form().unwrap();
    assert_eq!(fields(form.clone()), ["grant_type", "password", "scope", "username"]);
    assert_eq!(
        (form["grant_type"].as_str(), form["username"].as_str(), form["scope"].as_str()),
        ("password", "joe@mail.com", "auto")
    );
    assert!(w.mock.live_refresh_token("password:joe@mail.com").is_some());
    // Never stored: the database holds tokens, not the password.
    let db = std::fs::read(w.path("tokend.db")).unwrap();
    let wal = std::fs::read(w.path("tokend.db-wal")).unwrap_or_default();
    let needle = b"pwd-Sup3r-s3cret";
    assert!(!db.windows(needle.len()).any(|x| x == needle) && !wal.windows(needle.len()).any(|x| x == needle));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_credentials_just_obtain_their_token() {
    let w = World::new(MockSettings::default()).await;
    w.write_config("[[credential]]\nname = \"key\"\nprovider = \"wildapricot\"\ntoken_url = \"{mock}/auth/token\"\napi_key = \"k-1\"\n");
    let run = w.tokend(&["authorize", "key"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.starts_with("authorized key: generation 1"), "{}", run.stdout);
    assert_eq!(w.mock.requests()[0].field("grant_type").as_deref(), Some("client_credentials"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_at_nudge_then_forget_elsewhere() {
    let w = World::new(MockSettings::default()).await;
    w.write_config(
        "[[credential]]\nname = \"n\"\nprovider = \"nudge\"\nbase_url = \"{mock}\"\nclient_id = \"nid\"\nclient_secret = \"ns\"\n[[credential.sink]]\npath = \"n.token\"\n\n[[credential]]\nname = \"nb\"\nprovider = \"nationbuilder\"\nslug = \"x\"\ntoken_url = \"{mock}/oauth/token\"\nclient_id = \"i\"\nclient_secret = \"s\"\n",
    );
    let answer = w.authorize_and_import("n").await;
    w.authorize_and_import("nb").await;
    assert!(w.path("n.token").exists());
    let run = w.tokend(&["revoke", "n"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let request = w.mock.requests().pop().unwrap();
    assert_eq!(request.path, "/api/oauth/zapier/revoke");
    let form = request.form().unwrap();
    assert_eq!(fields(form.clone()), ["client_id", "client_secret", "token", "token_type_hint"]);
    assert_eq!(form["token"], answer["refresh_token"].as_str().unwrap());
    assert_eq!(form["token_type_hint"], "refresh_token");
    assert!(w.mock.is_revoked(answer["refresh_token"].as_str().unwrap()));
    assert_eq!(w.row("n").await["status"], "revoked");
    assert!(!w.path("n.token").exists(), "sinks removed");
    assert_eq!(w.show("n").await.code, 5);

    let refused = w.tokend(&["revoke", "nb"], None).await;
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.contains("nationbuilder has no revocation endpoint; run with --forget"),
        "{}",
        refused.stderr
    );
    let forget = w.tokend(&["revoke", "nb", "--forget"], None).await;
    assert_eq!(forget.code, 0, "{}", forget.stderr);
    assert_eq!(w.row("nb").await["status"], "no_token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_revocation_is_refused_and_forget_then_forgets_anyway() {
    let w = World::new(MockSettings::default()).await;
    w.write_config(
        "[[credential]]\nname = \"n\"\nprovider = \"nudge\"\nbase_url = \"{mock}\"\nclient_id = \"nid\"\nclient_secret = \"ns\"\n[[credential.sink]]\npath = \"n.token\"\n",
    );
    let answer = w.authorize_and_import("n").await;
    let refresh_token = answer["refresh_token"].as_str().unwrap();
    let down = || tokend::dev::mock::Fault::Answer { status: 503, body: "maintenance".into(), headers: vec![] };

    w.mock.push_fault(down());
    let refused = w.tokend(&["revoke", "n"], None).await;
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("revocation refused (HTTP 503): maintenance; run with --forget"),
        "{}",
        refused.stderr
    );
    assert_eq!(w.row("n").await["status"], "active", "nothing changed locally");
    assert!(w.path("n.token").exists());

    w.mock.push_fault(down());
    let forget = w.tokend(&["revoke", "n", "--forget"], None).await;
    assert_eq!(forget.code, 0, "{}", forget.stderr);
    assert!(forget.stdout.contains("the provider did NOT revoke the grant"), "{}", forget.stdout);
    assert!(!forget.stderr.contains(refresh_token) && !forget.stdout.contains(refresh_token));
    assert_eq!(w.row("n").await["status"], "no_token");
    assert!(!w.path("n.token").exists(), "sinks removed");
    assert!(!w.mock.is_revoked(refresh_token), "the provider was not told");
}
