//! File modes and link tricks, checked on the real files the binary writes.

mod support;

use std::os::unix::fs::PermissionsExt;
use support::World;
use tokend::mock_provider::MockSettings;

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_wal_and_sinks_are_private() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(
        "[[credential]]\nname = \"c\"\nprovider = \"oauth2\"\ntoken_url = \"{mock}/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n[[credential.sink]]\npath = \"out/c.json\"\nformat = \"json\"\n",
    );
    w.authorize_and_import("c").await;
    assert_eq!(w.tokend(&["refresh", "c"], None).await.code, 0);
    let _reader = w.store(); // keeps the WAL and shm files in place while we look
    for file in ["tokend.db", "tokend.db-wal", "tokend.db-shm", "out/c.json"] {
        let path = w.path(file);
        assert!(path.exists(), "{file}");
        assert_eq!(mode(&path), 0o600, "{file} must be readable by its owner only");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_link_at_a_sink_path_is_refused_and_the_other_name_keeps_nothing_new() {
    let w = World::new(MockSettings::default()).await;
    std::fs::create_dir(w.path("out")).unwrap();
    w.write_config(
        "[[credential]]\nname = \"c\"\nprovider = \"oauth2\"\ntoken_url = \"{mock}/token\"\nclient_id = \"id\"\nclient_secret = \"s\"\n[[credential.sink]]\npath = \"out/c.token\"\n",
    );
    // Someone links a file they can read to where the token will go.
    std::fs::write(w.path("theirs"), "old").unwrap();
    std::fs::hard_link(w.path("theirs"), w.path("out/c.token")).unwrap();
    let answer = w.mock.authorize("c");
    let run = w.tokend(&["import", "c"], Some(&answer.to_string())).await;
    assert_eq!(run.code, 0, "the token is stored even when a sink is refused: {}", run.stderr);
    assert!(
        run.stderr.contains("has 2 hard links; another name for this file would keep old tokens, refusing"),
        "{}",
        run.stderr
    );
    assert_eq!(std::fs::read_to_string(w.path("theirs")).unwrap(), "old");
    assert_eq!(w.show("c").await.code, 0);
}
