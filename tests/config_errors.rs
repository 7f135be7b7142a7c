//! `tokend check` names the file, the credential, the field and the problem — exactly.

mod support;

use support::World;
use tokend::dev::mock::MockSettings;

/// Runs `check` on `body` and returns stderr, asserting exit code 3.
async fn check_fails(w: &World, body: &str) -> String {
    std::fs::write(w.config_path(), body).unwrap();
    let run = w.tokend(&["check"], None).await;
    assert_eq!(run.code, 3, "check must fail with 3 for:\n{body}\nstdout: {}", run.stdout);
    run.stderr
}

const NB: &str = "name = \"nb\"\nprovider = \"nationbuilder\"\nslug = \"n\"\nclient_id = \"i\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_config_gets_its_exact_message() {
    let w = World::new(MockSettings::default()).await;
    let f = w.config_path().display().to_string();
    let cases: Vec<(String, String)> = vec![
        (
            format!("[[credential]]\n{NB}client_secret = \"s\"\nclient_secret_fle = \"x\"\n"),
            format!("{f}: line 7, column 1: unknown field `client_secret_fle`, expected one of"),
        ),
        (
            "[[credential]]\nname = \"x\"\nprovider = \"nationbuildr\"\n".into(),
            format!("{f}: credential \"x\": field \"provider\": \"nationbuildr\" is not a provider; expected one of nationbuilder, nudge, wildapricot, oauth2"),
        ),
        (
            format!("[[credential]]\n{NB}"),
            format!("{f}: credential \"nb\": field \"client_secret\": is missing; give one of client_secret, client_secret_file, client_secret_env, client_secret_credential"),
        ),
        (
            "[[credential]]\nname = \"nb\"\nprovider = \"nationbuilder\"\nclient_id = \"i\"\nclient_secret = \"s\"\n".into(),
            format!("{f}: credential \"nb\": field \"slug\": is missing; nationbuilder needs the nation slug (or a token_url)"),
        ),
        (
            "[[credential]]\nname = \"o\"\nprovider = \"oauth2\"\ntoken_url = \"http://auth.example.com/token\"\nclient_id = \"i\"\n".into(),
            format!("{f}: credential \"o\": field \"token_url\": http://auth.example.com/token uses plain http; tokens and secrets would cross the network unencrypted (http is allowed only for 127.0.0.0/8, ::1 and localhost)"),
        ),
        (
            format!("[[credential]]\n{NB}client_secret_file = \"missing.secret\"\n"),
            format!("{f}: credential \"nb\": field \"client_secret_file\": cannot read {}: No such file or directory (os error 2)", w.path("missing.secret").display()),
        ),
        (
            format!("[[credential]]\n{NB}client_secret_env = \"TOKEND_TEST_UNSET_VAR\"\n"),
            format!("{f}: credential \"nb\": field \"client_secret_env\": environment variable TOKEND_TEST_UNSET_VAR is not set"),
        ),
        (
            format!("[[credential]]\n{NB}client_secret = \"s\"\n[[credential.sink]]\npath = \"t\"\nmode = \"0644\"\n"),
            format!("{f}: credential \"nb\": sink #1: field \"mode\": 0644 lets every local user at the token; grant a group instead (e.g. 0640)"),
        ),
        (
            format!("[[credential]]\n{NB}client_secret = \"s\"\n[[credential.sink]]\npath = \"t\"\nformat = \"yaml\"\n"),
            format!("{f}: credential \"nb\": sink #1: field \"format\": \"yaml\" is not a sink format; expected raw, json or env"),
        ),
        (
            format!("[[credential]]\n{NB}client_secret = \"s\"\nrefresh_at = \"5%\"\n"),
            format!("{f}: credential \"nb\": field \"refresh_at\": \"5%\": the percentage of lifetime elapsed must be between 10% and 99%"),
        ),
        (
            format!("[[credential]]\n{NB}client_secret = \"s\"\n[[credential]]\n{NB}client_secret = \"s\"\n"),
            format!("{f}: credential \"nb\": field \"name\": is used by an earlier credential; names must be unique"),
        ),
        (
            "[[credential]]\nname = \"has space\"\nprovider = \"oauth2\"\ntoken_url = \"https://a.example/t\"\nclient_id = \"i\"\n".into(),
            format!("{f}: credential \"has space\": field \"name\": use 1 to 64 letters, digits, '-' or '_' (it becomes part of file and variable names)"),
        ),
        (
            "[daemon]\nconcurrency = 0\n[[credential]]\nname = \"o\"\nprovider = \"oauth2\"\ntoken_url = \"https://a.example/t\"\nclient_id = \"i\"\n".into(),
            format!("{f}: [daemon]: field \"concurrency\": is 0; expected 1 to 10000"),
        ),
        (
            "[[credential]]\nname = \"w\"\nprovider = \"wildapricot\"\napi_key = \"k\"\nclient_secret = \"s\"\n".into(),
            format!("{f}: credential \"w\": field \"client_secret\": an API-key credential authenticates with api_key alone; remove client_secret"),
        ),
        (
            "[[credential]]\nname = \"o\"\nprovider = \"oauth2\"\nclient_id = \"i\"\n".into(),
            format!("{f}: credential \"o\": field \"token_url\": is missing; oauth2 credentials must name their token endpoint"),
        ),
        (
            "[[credential]]\nname = \"n\"\nprovider = \"nudge\"\nauth = \"basic\"\nclient_id = \"i\"\nclient_secret = \"s\"\n".into(),
            format!("{f}: credential \"n\": field \"auth\": nudge always uses \"body\" client authentication, not \"basic\""),
        ),
        ("[[credential]\nname = 1\n".into(), format!("{f}: line 1, column 14: unclosed array table, expected `]`")),
        ("".into(), format!("{f}: configuration: no [[credential]] defined; there is nothing to keep fresh")),
        (
            format!("[[credential]]\n{NB}client_secret = \"s\"\nrefresh_cron = \"every day\"\n"),
            format!("{f}: credential \"nb\": field \"refresh_cron\": \"every day\" is not a cron expression ("),
        ),
        (
            format!("[[credential]]\n{NB}client_secret = \"s\"\non_refresh = []\n"),
            format!("{f}: credential \"nb\": field \"on_refresh\": must be a non-empty list: [\"/path/to/program\", \"arg\", ...]"),
        ),
    ];
    for (body, expected) in cases {
        let stderr = check_fails(&w, &body).await;
        let line = stderr.lines().next().unwrap_or_default();
        assert!(
            line.starts_with(&format!("tokend: {expected}")),
            "config:\n{body}\nwant: tokend: {expected}\ngot:  {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "one problem, one line: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_problem_is_reported_at_once() {
    let w = World::new(MockSettings::default()).await;
    let stderr = check_fails(
        &w,
        "[[credential]]\nname = \"a\"\nprovider = \"nudge\"\nclient_id = \"i\"\n[[credential]]\nname = \"b\"\nprovider = \"oauth2\"\nclient_id = \"i\"\n",
    )
    .await;
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
    assert!(stderr.contains("credential \"a\": field \"client_secret\""), "{stderr}");
    assert!(stderr.contains("credential \"b\": field \"token_url\""), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_credential_secret() {
    let w = World::new(MockSettings::default()).await;
    let creds = w.path("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("nb-secret"), "from-systemd\n").unwrap();
    std::fs::write(w.config_path(), format!("[[credential]]\n{NB}client_secret_credential = \"nb-secret\"\n")).unwrap();
    let run = w.tokend_env(&["check"], None, &[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())]).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = w.tokend(&["check"], None).await;
    assert_eq!(run.code, 3);
    assert!(
        run.stderr
            .contains("$CREDENTIALS_DIRECTORY is not set; \"nb-secret\" needs LoadCredential= in the systemd unit"),
        "{}",
        run.stderr
    );
    // Commands that never talk to the provider work outside the service, without the secret.
    let list = w.tokend(&["list"], None).await;
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert!(list.stdout.contains("nb") && list.stdout.contains("no_token"), "{}", list.stdout);
}
