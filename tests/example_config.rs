//! The documented example configuration is valid as the unit runs it: every secret a systemd
//! credential in $CREDENTIALS_DIRECTORY, nothing else supplied.

use std::collections::BTreeMap;
use std::path::Path;

#[test]
fn example_config_validates() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    for f in ["my-nation", "nudge", "wa-admin", "generic", "wa-members"] {
        std::fs::write(secrets.join(f), format!("{f}-secret\n")).unwrap();
    }
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tokend.toml")).unwrap();
    let env: BTreeMap<String, String> = [("CREDENTIALS_DIRECTORY".to_string(), secrets.display().to_string())].into();
    let config = tokend::config::parse_with(Path::new("/etc/tokend/tokend.toml"), &text, &env).unwrap();
    let names: Vec<&str> = config.credentials.iter().map(|c| &*c.name).collect();
    assert_eq!(names, ["my-nation", "nudge", "wa-members", "wa-admin", "generic"]);
    assert_eq!(config.credentials[0].endpoint.client_secret.as_ref().unwrap().expose(), "my-nation-secret");
    assert_eq!(config.credentials[1].endpoint.provider_concurrency, 4);
    assert_eq!(config.credentials[4].endpoint.scope.as_deref(), Some("read write"));
}
