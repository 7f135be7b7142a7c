//! Rotation and the lease: the refresh token the store holds is always the provider's live one,
//! a spent token is never sent again, and two processes never double-spend.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use support::World;
use tokend::dev::mock::MockSettings;

const CONFIG: &str = r#"
[[credential]]
name = "nb"
provider = "nationbuilder"
token_url = "{mock}/oauth/token"
client_id = "c"
client_secret = "s"

[[credential.sink]]
path = "out/nb.token"

[[credential.sink]]
path = "out/nb.json"
format = "json"
mode = "0640"

[[credential.sink]]
path = "out/nb.env"
format = "env"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refresh_spends_the_latest_token_and_updates_sinks() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(CONFIG);
    let first = w.authorize_and_import("nb").await;
    let mut previous_refresh = first["refresh_token"].as_str().unwrap().to_string();
    for round in 1..=5 {
        let run = w.tokend(&["refresh", "nb"], None).await;
        assert_eq!(run.code, 0, "round {round}: {}", run.stderr);
        let sent = w.mock.requests().last().unwrap().field("refresh_token").unwrap();
        assert_eq!(sent, previous_refresh, "round {round} spent an old token");
        assert!(w.mock.is_revoked(&previous_refresh));
        previous_refresh = w.mock.live_refresh_token("nb").expect("chain alive");
        let row = w.row("nb").await;
        assert_eq!(row["generation"], 1 + round);
        assert_eq!(row["status"], "active");
    }
    assert_eq!(w.mock.refreshes(), 5);

    let access = w.show("nb").await.stdout.trim().to_string();
    assert_eq!(std::fs::read_to_string(w.path("out/nb.token")).unwrap(), access);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(w.path("out/nb.json")).unwrap()).unwrap();
    assert_eq!(json["access_token"], access.as_str());
    assert_eq!(json["generation"], 6);
    assert_eq!(
        std::fs::read_to_string(w.path("out/nb.env")).unwrap().lines().next().unwrap(),
        format!("TOKEND_NB_ACCESS_TOKEN='{access}'")
    );
    let mode = |p: &str| std::fs::metadata(w.path(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode("out/nb.token"), mode("out/nb.json"), mode("out/nb.env")), (0o600, 0o640, 0o600));
    assert_eq!(mode("tokend.db"), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_refreshing_at_once_send_one_request() {
    // Each answer takes 700 ms, so the second process arrives while the first holds the lease.
    let w = World::new(MockSettings { delay: Duration::from_millis(700), ..MockSettings::default() }).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(CONFIG);
    w.authorize_and_import("nb").await;
    for round in 0..3 {
        let before = w.mock.requests().len();
        let (a, b) = tokio::join!(w.tokend(&["refresh", "nb"], None), async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            w.tokend(&["refresh", "nb"], None).await
        });
        assert_eq!((a.code, b.code), (0, 0), "round {round}: {} / {}", a.stderr, b.stderr);
        assert_eq!(w.mock.requests().len() - before, 1, "round {round}: exactly one request reaches the provider");
        let outputs = format!("{}{}", a.stdout, b.stdout);
        assert!(outputs.contains("refreshed by another process"), "{outputs}");
    }
    assert_eq!(w.row("nb").await["generation"], 4);
}
