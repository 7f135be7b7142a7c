//! Each provider's token request, asserted field by field against what the provider docs say,
//! through the real binary and real HTTP to the loopback mock.

mod support;

use support::World;
use tokend::dev::mock::MockSettings;

fn only_keys(json: &serde_json::Value, keys: &[&str]) {
    let mut got: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
    got.sort_unstable();
    let mut want = keys.to_vec();
    want.sort_unstable();
    assert_eq!(got, want);
}

fn form_keys(form: &std::collections::BTreeMap<String, String>) -> Vec<&str> {
    form.keys().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nationbuilder_json_body_with_client_credentials() {
    let w = World::new(MockSettings { expires_in: 86_400, ..MockSettings::default() }).await;
    w.write_config(
        r#"
[[credential]]
name = "nb"
provider = "nationbuilder"
token_url = "{mock}/oauth/token"
client_id = "nb-client"
client_secret = "nb-secret-value"
"#,
    );
    let first = w.authorize_and_import("nb").await;
    let run = w.tokend(&["refresh", "nb"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);

    let reqs = w.mock.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/oauth/token");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("accept"), Some("application/json"));
    assert_eq!(r.header("authorization"), None);
    let body = r.json().expect("JSON body");
    only_keys(&body, &["grant_type", "refresh_token", "client_id", "client_secret"]);
    assert_eq!(body["grant_type"], "refresh_token");
    assert_eq!(body["refresh_token"], first["refresh_token"]);
    assert_eq!(body["client_id"], "nb-client");
    assert_eq!(body["client_secret"], "nb-secret-value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nationbuilder_slug_builds_the_documented_url() {
    let w = World::new(MockSettings::default()).await;
    w.write_config(
        "[[credential]]\nname = \"nb\"\nprovider = \"nationbuilder\"\nslug = \"my-nation\"\nclient_id = \"a\"\nclient_secret = \"b\"\n",
    );
    let run = w.tokend(&["check"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("https://my-nation.nationbuilder.com/oauth/token"), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nudge_form_body_at_base_url_path() {
    let w = World::new(MockSettings { expires_in: 3600, send_created_at: false, ..MockSettings::default() }).await;
    w.write_config(
        r#"
[[credential]]
name = "nudge"
provider = "nudge"
base_url = "{mock}"
client_id = "nudge-client"
client_secret = "nudge-secret"
"#,
    );
    let first = w.authorize_and_import("nudge").await;
    let run = w.tokend(&["refresh", "nudge"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let r = &w.mock.requests()[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/api/oauth/zapier/token");
    assert_eq!(r.header("content-type"), Some("application/x-www-form-urlencoded"));
    assert_eq!(r.header("authorization"), None);
    let form = r.form().expect("form body");
    assert_eq!(form_keys(&form), ["client_id", "client_secret", "grant_type", "refresh_token"]);
    assert_eq!(form["grant_type"], "refresh_token");
    assert_eq!(form["client_id"], "nudge-client");
    assert_eq!(form["client_secret"], "nudge-secret");
    assert_eq!(form["refresh_token"], first["refresh_token"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildapricot_basic_auth_and_no_created_at() {
    let w = World::new(MockSettings { expires_in: 1800, send_created_at: false, ..MockSettings::default() }).await;
    w.write_config(
        r#"
[[credential]]
name = "wa"
provider = "wildapricot"
token_url = "{mock}/auth/token"
client_id = "tcRsnqk4mp"
client_secret = "wa-secret"
"#,
    );
    let first = w.authorize_and_import("wa").await;
    let before = tokend::clock::now_secs();
    let run = w.tokend(&["refresh", "wa"], None).await;
    let after = tokend::clock::now_secs();
    assert_eq!(run.code, 0, "{}", run.stderr);
    let r = &w.mock.requests()[0];
    assert_eq!(r.path, "/auth/token");
    assert_eq!(r.basic_auth(), Some(("tcRsnqk4mp".into(), "wa-secret".into())));
    let form = r.form().expect("form body");
    assert_eq!(form_keys(&form), ["grant_type", "refresh_token"]);
    assert_eq!(form["refresh_token"], first["refresh_token"].as_str().unwrap());

    // No created_at in the answer: the lifetime counts from when the request was sent.
    let row = w.row("wa").await;
    let expires_at = humantime::parse_rfc3339(row["expires_at"].as_str().unwrap()).unwrap();
    let expires_at = expires_at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((before + 1800..=after + 1800).contains(&expires_at), "{before} {expires_at} {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildapricot_api_key_uses_client_credentials_without_import() {
    let w = World::new(MockSettings { expires_in: 1800, send_created_at: false, ..MockSettings::default() }).await;
    std::fs::write(w.path("wa.key"), "o9se87rgoiysoer980709-\n").unwrap();
    w.write_config(
        r#"
[[credential]]
name = "wa-key"
provider = "wildapricot"
token_url = "{mock}/auth/token"
api_key_file = "wa.key"
"#,
    );
    let run = w.tokend(&["refresh", "wa-key"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let r = &w.mock.requests()[0];
    assert_eq!(r.basic_auth(), Some(("APIKEY".into(), "o9se87rgoiysoer980709-".into())));
    assert_eq!(r.header("authorization"), Some("Basic QVBJS0VZOm85c2U4N3Jnb2l5c29lcjk4MDcwOS0="));
    let form = r.form().unwrap();
    assert_eq!(form_keys(&form), ["grant_type", "scope"]);
    assert_eq!((form["grant_type"].as_str(), form["scope"].as_str()), ("client_credentials", "auto"));
    let show = w.show("wa-key").await;
    assert_eq!(show.code, 0, "{}", show.stderr);
    assert!(show.stdout.starts_with("at"), "{}", show.stdout);
    // Renewal asks again the same way.
    assert_eq!(w.tokend(&["refresh", "wa-key"], None).await.code, 0);
    assert_eq!(w.mock.requests().len(), 2);
    assert_eq!(w.row("wa-key").await["generation"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_each_client_auth_and_scope() {
    let w = World::new(MockSettings::default()).await;
    w.write_config(
        r#"
[[credential]]
name = "basic"
provider = "oauth2"
token_url = "{mock}/o/token/"
client_id = "cb"
client_secret = "sb"
scope = "read write"

[[credential]]
name = "body"
provider = "oauth2"
token_url = "{mock}/o/token/"
auth = "body"
client_id = "cbody"
client_secret = "sbody"

[[credential]]
name = "json"
provider = "oauth2"
token_url = "{mock}/o/token/"
auth = "json"
client_id = "cj"
client_secret = "sj"
"#,
    );
    for name in ["basic", "body", "json"] {
        w.authorize_and_import(name).await;
        let run = w.tokend(&["refresh", name], None).await;
        assert_eq!(run.code, 0, "{name}: {}", run.stderr);
    }
    let reqs = w.mock.requests();
    let basic = &reqs[0];
    assert_eq!(basic.basic_auth(), Some(("cb".into(), "sb".into())));
    let form = basic.form().unwrap();
    assert_eq!(form_keys(&form), ["grant_type", "refresh_token", "scope"]);
    assert_eq!(form["scope"], "read write");

    let body = &reqs[1];
    assert_eq!(body.header("authorization"), None);
    let form = body.form().unwrap();
    assert_eq!(form_keys(&form), ["client_id", "client_secret", "grant_type", "refresh_token"]);
    assert_eq!((form["client_id"].as_str(), form["client_secret"].as_str()), ("cbody", "sbody"));

    let json = &reqs[2];
    assert_eq!(json.header("content-type"), Some("application/json"));
    only_keys(&json.json().unwrap(), &["grant_type", "refresh_token", "client_id", "client_secret"]);
}
