//! The Debian package, built from this test build's binary and installed the way README "Install"
//! says, with `dpkg -i`, inside a real systemd booted in fresh namespaces (the harness of
//! `tests/systemd_boot.rs`): what the package lays out, how its maintainer scripts behave on
//! install, on an upgrade over a running daemon with refreshes in flight, on removal and on purge,
//! and that `lintian` finds no error and no warning but those the package overrides, with why
//! (`debian/tokend.lintian-overrides`).
//!
//! The package is built by `debian/build-deb --binary` from the debug binary the tests use (a
//! release build would take minutes; the packaging is the same). The example configuration it
//! installs gets its placeholders filled in with values that point at the crate's mock provider,
//! listening inside the container.
//!
//! Every check is soft (PASS/FAIL with what was observed), then the test fails if any did.
//! SKIPPED (with the reason) when not root, without systemd or namespaces, and outside CI when
//! cargo-deb, dpkg-deb or lintian are missing (`.ci/run` installs them; under CI they must be there).

#[path = "systemd_boot/harness.rs"]
mod harness;
mod support;

use harness::*;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokend::dev::mock::MockSettings;

/// The credentials of the example configuration: every one is given a secret and filled in.
const CREDENTIALS: [&str; 5] = ["my-nation", "nudge", "wa-members", "wa-admin", "generic"];
/// The API-key credential: it obtains its tokens itself (client_credentials), no import.
const API_KEY: &str = "wa-admin";
/// Token lifetime at the mock: tokend refreshes at half of it, so rotations are seconds apart.
const LIFETIME: i64 = 6;
/// During the upgrade: a lifetime long enough that nothing else comes due, and an answer delay
/// long enough that the refreshes started just before `dpkg -i` are still in flight when the
/// restart sends SIGTERM (unpacking and postinst take 2-3 s here), yet inside the daemon's 10 s
/// grace once SIGTERM came.
const UPGRADE_LIFETIME: i64 = 600;
const UPGRADE_DELAY: Duration = Duration::from_secs(8);
const DEB_IN_CONTAINER: &str = "/root/tokend.deb";

/// The lintian warnings that stay are overridden, each with why, in the package's own overrides
/// file; any other warning, and any error, fails the test.
const LINTIAN_OVERRIDES: &str = "debian/tokend.lintian-overrides";

fn secret_of(name: &str) -> String {
    format!("{name}-secret-for-the-package-test")
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// A tool the test needs, or why the test cannot run (a failure under CI, a SKIP elsewhere).
fn tool_missing(program: &str, args: &[&str]) -> Option<String> {
    match Command::new(program).args(args).stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Some(format!("{program} is not installed ({e}); .ci/run installs it")),
    }
}

fn skip_or_fail(test: &str, why: &str) {
    assert!(!in_ci(), "{test}: {why} (under CI the tools must be there: .ci/run installs them)");
    eprintln!("SKIPPED: {test}: {why}");
}

/// The two tests take turns: lintian's CPU would slow `dpkg -i` down while the upgrade check
/// counts on it finishing before the mock answers.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Builds the package once per test binary: `debian/build-deb --binary <test build's tokend>`.
fn package() -> &'static Result<(PathBuf, Duration), String> {
    static PACKAGE: OnceLock<Result<(PathBuf, Duration), String>> = OnceLock::new();
    PACKAGE.get_or_init(|| {
        if let Some(why) =
            tool_missing("cargo-deb", &["--version"]).or_else(|| tool_missing("dpkg-deb", &["--version"]))
        {
            return Err(why);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let output = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deb");
        let _ = std::fs::remove_dir_all(&output);
        let started = Instant::now();
        let out = Command::new(root.join("debian/build-deb"))
            .arg("--binary")
            .arg(env!("CARGO_BIN_EXE_tokend"))
            .arg("--output")
            .arg(&output)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run debian/build-deb: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            panic!("debian/build-deb exited {}:\n{stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        let deb = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        let version = env!("CARGO_PKG_VERSION");
        let expected = format!("tokend_{version}-1_amd64.deb");
        assert!(
            deb.is_file() && deb.file_name().is_some_and(|n| n.to_string_lossy() == expected),
            "debian/build-deb printed {deb:?}, not the path of {expected}"
        );
        Ok((deb, started.elapsed()))
    })
}

#[test]
fn lintian_finds_no_errors_and_no_warnings_but_the_overridden_ones() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let (deb, _) = match package() {
        Ok(p) => p,
        Err(why) => return skip_or_fail("lintian", why),
    };
    if let Some(why) = tool_missing("lintian", &["--version"]) {
        return skip_or_fail("lintian", &why);
    }
    // The changelog's version is the package's: dpkg and lintian read it from there.
    let changelog = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("debian/changelog")).unwrap();
    let version = format!("tokend ({}-1)", env!("CARGO_PKG_VERSION"));
    assert!(changelog.starts_with(&version), "debian/changelog must start with {version:?} (the Cargo.toml version)");

    // Every tag, down to pedantic and informational ones and the overridden ones ("O:"), so that
    // the figures list them all. (`--fail-on warning` would count the overridden ones too: the
    // E: and W: lines are read instead.)
    let out = Command::new("lintian")
        .args(["--pedantic", "--display-info", "--show-overrides"])
        .arg(deb)
        .output()
        .expect("lintian");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let tags: Vec<&str> =
        said.lines().filter(|l| ["E:", "W:", "I:", "P:", "O:"].iter().any(|p| l.starts_with(p))).collect();
    println!("lintian --pedantic --display-info --show-overrides {}:\n{}", deb.display(), tags.join("\n"));
    let failing: Vec<&&str> = tags.iter().filter(|l| l.starts_with("E:") || l.starts_with("W:")).collect();
    assert!(
        failing.is_empty() && out.status.success(),
        "lintian exited {} with errors or warnings (fix them, or override them with why in {LINTIAN_OVERRIDES}): {failing:#?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Each override is still needed: lintian reports one that overrides nothing.
    assert!(
        !said.contains("unused-override"),
        "{LINTIAN_OVERRIDES} overrides a tag lintian no longer reports:\n{said}"
    );
    let overridden = tags.iter().filter(|l| l.starts_with("O:")).count();
    let summary = format!(
        "lintian --pedantic --display-info --show-overrides: {} tag(s), 0 errors, 0 warnings, {overridden} overridden ({LINTIAN_OVERRIDES} says why)\n{}",
        tags.len(),
        tags.join("\n")
    );
    support::record_figures("deb_lintian", &summary);
}

// ------------------------------------------------------------------------------------------------
// The configuration as an operator fills it in.

/// The installed conffile with its placeholders filled: each credential's client id, a token
/// endpoint at the mock (NationBuilder, Nudge and Wild Apricot have fixed https endpoints; the
/// `token_url` override of the reference points them here), and hooks that exist. The example's
/// `refresh_at = "18h"` (for NationBuilder's 24 h tokens) goes too: against the mock's 6 s tokens
/// it puts the next refresh before the answer arrives, and the credential refreshes back to back.
fn fill_placeholders(conffile: &str, mock_url: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut name: Option<String> = None;
    for line in conffile.lines() {
        let trimmed = line.trim_start_matches("# ");
        if trimmed.starts_with("token_url =") || line == "refresh_at = \"18h\"" {
            continue;
        }
        if let Some(n) = line.strip_prefix("name = ") {
            let n = n.trim_matches('"').to_string();
            let _ = writeln!(out, "{line}\ntoken_url = \"{mock_url}/token\"");
            name = Some(n);
            continue;
        }
        let line = line
            .replace("/usr/local/bin/reload-consumer", "/bin/true")
            .replace("/usr/local/bin/page-oncall", "/bin/true");
        if line == "client_id = \"your-client-id\"" {
            let n = name.as_deref().ok_or("client_id before any credential name")?;
            let _ = writeln!(out, "client_id = \"{n}-client\"");
        } else {
            out.push_str(&line);
            out.push('\n');
        }
    }
    if out.contains("client_id = \"your-client-id\"") {
        return Err("a \"your-client-id\" placeholder is left".into());
    }
    let endpoints = out.matches(&format!("token_url = \"{mock_url}/token\"")).count();
    if endpoints != CREDENTIALS.len() {
        return Err(format!("{endpoints} token_url lines for {} credentials", CREDENTIALS.len()));
    }
    Ok(out)
}

/// `tokend check` with the service's user and secrets (README: the systemd-run line).
fn check_as_the_service(c: &Container) -> Out {
    let credentials: String =
        CREDENTIALS.iter().map(|n| format!(" -p LoadCredential={n}:/etc/tokend/secrets/{n}")).collect();
    c.sh(&format!("systemd-run --pipe --wait -q -p User=tokend{credentials} tokend check"))
}

fn stat(c: &Container, paths: &str) -> String {
    c.sh(&format!("stat -c '%U:%G %a %n' {paths} 2>&1")).stdout
}

// ------------------------------------------------------------------------------------------------
// The test.

#[test]
fn the_package_installs_upgrades_and_purges_under_a_real_systemd() {
    const TEST: &str = "the_package_installs_upgrades_and_purges_under_a_real_systemd";
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {TEST}: {why}");
        return;
    }
    let (deb, build_time) = match package() {
        Ok(p) => p.clone(),
        Err(why) => return skip_or_fail(TEST, why),
    };
    let test_started = Instant::now();
    let mut report = Report::default();

    let c = Container::boot().expect("boot");
    println!(
        "systemd up as PID 1 (host pid {}); package {} built in {:.1} s",
        c.init_pid,
        deb.display(),
        build_time.as_secs_f64()
    );
    let mock = InsideMock::start(c.init_pid, MockSettings { expires_in: LIFETIME, ..MockSettings::default() })
        .expect("mock provider");
    let mock_url = mock.provider.url("");
    // The machine image this runs on forbids service starts from maintainer scripts (Docker's
    // /usr/sbin/policy-rc.d, exit 101, which deb-systemd-invoke obeys); a Debian machine has none.
    c.must("rm -f /usr/sbin/policy-rc.d");

    // ---- Install (README: `apt install ./tokend_….deb`, or `dpkg -i`).
    c.install_from(DEB_IN_CONTAINER, File::open(&deb).expect("the .deb"), "-m 0644");
    let install_started = Instant::now();
    let install = c.sh(&format!("dpkg -i {DEB_IN_CONTAINER}"));
    let install_time = install_started.elapsed();
    report.record(
        "`dpkg -i` installs: exit 0, and says the service is enabled but not started, and what comes next",
        ensure(
            install.ok()
                && install.stdout.contains("installed and enabled, not started")
                && install.stdout.contains("LoadCredential=NAME:/etc/tokend/secrets/NAME")
                && install.stdout.contains("systemctl start tokend"),
            format!("exit {} in {:.1} s:\n{}", install.code, install_time.as_secs_f64(), install.text()),
        ),
    );
    assert!(install.ok(), "dpkg -i failed: {}", install.text());

    let passwd = c.sh("getent passwd tokend").stdout;
    let group = c.sh("getent group tokend").stdout;
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    report.record(
        "sysusers.d: system user tokend (uid < 1000, home /var/lib/tokend, no login shell) and its group",
        ensure(
            fields.len() == 7
                && fields[2].parse::<u32>().is_ok_and(|u| u < 1000)
                && fields[3] == group.trim().split(':').nth(2).unwrap_or("?")
                && fields[5] == "/var/lib/tokend"
                && fields[6].ends_with("nologin"),
            format!("{} | {}", passwd.trim(), group.trim()),
        ),
    );

    let expected_modes = [
        ("root:tokend 750", "/etc/tokend"),
        ("root:tokend 640", "/etc/tokend/tokend.toml"),
        ("root:root 700", "/etc/tokend/secrets"),
        ("tokend:tokend 700", "/var/lib/tokend"),
        ("root:root 755", "/usr/bin/tokend"),
        ("root:root 644", "/usr/lib/systemd/system/tokend.service"),
        ("root:root 644", "/usr/lib/sysusers.d/tokend.conf"),
        ("root:root 644", "/usr/lib/tmpfiles.d/tokend.conf"),
        ("root:root 644", "/usr/share/doc/tokend/README.md"),
        ("root:root 644", "/usr/share/lintian/overrides/tokend"),
        ("root:root 644", "/usr/share/doc/tokend/examples/tokend.toml"),
        ("root:root 644", "/usr/share/doc/tokend/examples/report-job.service"),
        ("root:root 644", "/usr/share/doc/tokend/examples/tokend-watch@.path"),
        ("root:root 644", "/usr/share/doc/tokend/examples/tokend-watch@.service"),
        ("root:root 644", "/usr/share/man/man1/tokend.1.gz"),
        ("root:root 644", "/usr/share/man/man5/tokend.toml.5.gz"),
        ("root:root 644", "/usr/share/bash-completion/completions/tokend"),
        ("root:root 644", "/usr/share/zsh/vendor-completions/_tokend"),
        ("root:root 644", "/usr/share/fish/vendor_completions.d/tokend.fish"),
    ];
    let paths: Vec<&str> = expected_modes.iter().map(|(_, p)| *p).collect();
    let seen = stat(&c, &paths.join(" "));
    let wrong: Vec<String> = expected_modes
        .iter()
        .filter(|(mode, path)| !seen.lines().any(|l| l == format!("{mode} {path}")))
        .map(|(mode, path)| format!("{path}: want {mode}"))
        .collect();
    report.record(
        "files, directories, owners and modes (tmpfiles.d gives /etc/tokend and the conffile the group tokend)",
        ensure(wrong.is_empty(), format!("wrong or missing: {wrong:?}\n{}", seen.trim_end())),
    );
    let conffiles = c.sh("dpkg-query -W -f='${Conffiles}' tokend").stdout;
    let pristine = c.sh("cmp /etc/tokend/tokend.toml /usr/share/doc/tokend/examples/tokend.toml").ok();
    report.record(
        "/etc/tokend/tokend.toml is a conffile, the example as shipped",
        ensure(
            conffiles.contains("/etc/tokend/tokend.toml") && pristine,
            format!("Conffiles:{}; same as the example: {pristine}", conffiles.trim_end()),
        ),
    );

    let status = c.sh("systemctl status tokend --no-pager");
    let enabled = c.sh("systemctl is-enabled tokend").stdout.trim().to_string();
    report.record(
        "`systemctl status tokend` after install: enabled, inactive (dead), exit 3: not started while the config is the example",
        ensure(
            status.code == 3 && enabled == "enabled" && status.stdout.contains("inactive (dead)"),
            format!("is-enabled: {enabled}; status exit {}:\n{}", status.code, status.text()),
        ),
    );
    let docs = c.prop("tokend", "Documentation");
    let man1 = c.sh("man -P cat tokend");
    let man5 = c.sh("man -P cat 5 tokend.toml");
    report.record(
        "Documentation= (man:tokend(1), man:tokend.toml(5), the README) opens: `man tokend`, `man 5 tokend.toml`",
        ensure(
            man1.ok()
                && man1.stderr.is_empty()
                && man5.stderr.is_empty()
                && man1.stdout.contains("COMMANDS")
                && man1.stdout.contains("tokend completions")
                && man5.ok()
                && man5.stdout.contains("[[credential.sink]]")
                && docs.contains("man:tokend(1)")
                && c.sh("test -f /usr/share/doc/tokend/README.md").ok(),
            format!(
                "Documentation={docs}; man tokend exit {} ({} lines); man 5 tokend.toml exit {} ({} lines); stderr: {:?} {:?}",
                man1.code,
                man1.stdout.lines().count(),
                man5.code,
                man5.stdout.lines().count(),
                man1.stderr.trim(),
                man5.stderr.trim()
            ),
        ),
    );
    let bash = c.sh(
        "bash --norc -c 'source /usr/share/bash-completion/completions/tokend && COMP_WORDS=(tokend \"\"); COMP_CWORD=1; \
         _tokend tokend \"\" tokend; echo \"${COMPREPLY[*]}\"'",
    );
    let zsh = c.sh(
        "if command -v zsh >/dev/null; then zsh -f -c 'autoload -Uz compinit && compinit -u -D && print -r -- $_comps[tokend]'; \
         else echo no zsh; fi",
    );
    let fish = c.sh("if command -v fish >/dev/null; then fish -c 'complete -C \"tokend \"' | cut -f1 | tr '\\n' ' '; else echo no fish; fi");
    let zsh_ok = zsh.stdout.trim() == "_tokend" || (!in_ci() && zsh.stdout.trim() == "no zsh");
    let fish_ok = fish.stdout.contains("completions") || (!in_ci() && fish.stdout.trim() == "no fish");
    report.record(
        "completions load from where the package put them: bash completes the subcommands, zsh's compinit and fish find theirs",
        ensure(
            bash.ok() && bash.stdout.split_whitespace().any(|w| w == "completions") && zsh_ok && fish_ok,
            format!("bash: {} | zsh: {} | fish: {}", bash.text(), zsh.text(), fish.text()),
        ),
    );

    // ---- README "Install", the three steps. 1: secrets, one LoadCredential= line each.
    let mut dropin = String::from("[Service]\n");
    for name in CREDENTIALS {
        c.must(&format!(
            "printf '%s' '{}' > /etc/tokend/secrets/{name} && chmod 0600 /etc/tokend/secrets/{name}",
            secret_of(name)
        ));
        let _ = writeln!(dropin, "LoadCredential={name}:/etc/tokend/secrets/{name}");
    }
    c.must("mkdir -p /etc/systemd/system/tokend.service.d");
    c.install("/etc/systemd/system/tokend.service.d/credentials.conf", dropin.as_bytes(), "-m 0644");
    // 2: the configuration, edited in place (the conffile keeps its owner and mode).
    let shipped = c.must("cat /etc/tokend/tokend.toml");
    let filled = fill_placeholders(&shipped, &mock_url).expect("fill in the placeholders");
    let write = c.sh_input("cat > /etc/tokend/tokend.toml", &[], filled.as_bytes());
    assert!(write.ok(), "editing the config: {}", write.text());
    let check = check_as_the_service(&c);
    report.record(
        "the conffile, placeholders filled (client ids, token_url at the mock, hooks), passes `tokend check` with the service's user and secrets",
        ensure(
            check.ok() && check.stdout.contains("ok, 5 credential(s)"),
            format!("exit {}: {}\nconfig mode now: {}", check.code, check.text(), stat(&c, "/etc/tokend/tokend.toml").trim()),
        ),
    );
    // 3: start.
    let start = c.sh("systemctl daemon-reload && systemctl start tokend");
    let active = wait_until(Duration::from_secs(10), || (c.prop("tokend", "ActiveState") == "active").then_some(()));
    report.record(
        "`systemctl daemon-reload && systemctl start tokend`: active, before any token is imported",
        ensure(
            start.ok() && active.is_some(),
            format!(
                "start exit {} {}; {:?}; STATUS={:?}",
                start.code,
                start.stderr.trim(),
                c.systemctl_show("tokend", &["ActiveState", "SubState", "MainPID", "NRestarts"]),
                c.prop("tokend", "StatusText")
            ),
        ),
    );
    if active.is_none() {
        println!("journal:\n{}", journal(&c, "-u tokend -n 40"));
    }

    // ---- First tokens (README: `runuser -u tokend -- tokend import NAME`), then rotations.
    let imports: Vec<(&str, Out)> = CREDENTIALS
        .iter()
        .filter(|n| **n != API_KEY)
        .map(|n| (*n, import(&c, n, &mock.provider.authorize(n))))
        .collect();
    report.record(
        "first tokens imported as the service user while it runs (exit 0); the API-key credential gets its own",
        ensure(
            imports.iter().all(|(_, o)| o.ok()),
            imports.iter().map(|(n, o)| format!("{n}: exit {} {}", o.code, o.text())).collect::<Vec<_>>().join("\n"),
        ),
    );
    let zero: BTreeMap<String, i64> = CREDENTIALS.iter().map(|n| (n.to_string(), 0)).collect();
    let rotating = wait_generations(&c, &zero, 3, Duration::from_secs(30));
    report.record(
        "tokens rotate: every credential reaches generation 3 or more",
        rotating.map(|e| {
            format!(
                "{e}; mock answered {} refreshes; STATUS={:?}",
                mock.provider.refreshes(),
                c.prop("tokend", "StatusText")
            )
        }),
    );
    let sinks = stat(
        &c,
        "/run/tokend /run/tokend/my-nation.token /run/tokend/my-nation.env /run/tokend/nudge.json /run/tokend/wa-admin.token",
    );
    report.record(
        "the example's sinks are written: /run/tokend 0750 tokend, my-nation.token 0640, the others 0600",
        ensure(
            sinks.contains("tokend:tokend 750 /run/tokend\n")
                && sinks.contains("tokend:tokend 640 /run/tokend/my-nation.token\n")
                && sinks.contains("tokend:tokend 600 /run/tokend/my-nation.env\n")
                && sinks.contains("tokend:tokend 600 /run/tokend/nudge.json\n")
                && sinks.contains("tokend:tokend 600 /run/tokend/wa-admin.token\n"),
            sinks.trim_end().to_string(),
        ),
    );

    // ---- Upgrade: `dpkg -i` of the same package over the running daemon, refreshes in flight.
    report.record(
        "`dpkg -i` again over the running daemon, five refreshes in flight",
        upgrade_with_refreshes_in_flight(&c, &mock),
    );
    // Short tokens again (one refresh now), then rotations on their own.
    let before = generations(&c);
    c.sh("systemctl kill -s SIGUSR1 --kill-whom=main tokend");
    let after_upgrade = wait_generations(&c, &before, 3, Duration::from_secs(30));
    report.record(
        "after the upgrade the generations go on (+3 each: one asked for, two on their own), no refresh token was presented twice, none needs re-authorization",
        match after_upgrade {
            Ok(e) => {
                let listed = list(&c).unwrap_or_default();
                let statuses: BTreeMap<&String, String> =
                    listed.iter().map(|(n, r)| (n, r["status"].as_str().unwrap_or("?").to_string())).collect();
                ensure(
                    mock.provider.reuses() == 0 && statuses.values().all(|s| s != "needs_reauth"),
                    format!("{e}; reuses at the mock: {}; statuses {statuses:?}", mock.provider.reuses()),
                )
            }
            Err(e) => Err(format!("{e}; reuses at the mock: {}", mock.provider.reuses())),
        },
    );

    // ---- Remove: stopped, the store kept.
    let db_before = c.sh("stat -c '%s %i' /var/lib/tokend/tokend.db").stdout;
    let remove = c.sh("dpkg -r tokend");
    let kept =
        stat(&c, "/var/lib/tokend /var/lib/tokend/tokend.db /etc/tokend/tokend.toml /etc/tokend/secrets/my-nation");
    let state = c.sh("dpkg-query -W -f='${Status}' tokend").stdout;
    let unit_state = c.prop("tokend", "ActiveState");
    let binary_gone = c.sh("test ! -e /usr/bin/tokend && test ! -e /usr/lib/systemd/system/tokend.service").ok();
    report.record(
        "`dpkg -r tokend`: service stopped, binary and unit gone, /var/lib/tokend/tokend.db and /etc/tokend kept, says so",
        ensure(
            remove.ok()
                && remove.stdout.contains("kept the token store /var/lib/tokend")
                && unit_state != "active"
                && binary_gone
                && kept.contains("tokend:tokend 600 /var/lib/tokend/tokend.db\n")
                && kept.contains("root:tokend 640 /etc/tokend/tokend.toml\n")
                && kept.contains("/etc/tokend/secrets/my-nation\n")
                && state.trim() == "deinstall ok config-files",
            format!(
                "exit {}: {}\nunit {unit_state}; binary and unit gone: {binary_gone}; dpkg: {}; db size/inode before {}\n{}",
                remove.code,
                remove.text(),
                state.trim(),
                db_before.trim(),
                kept.trim_end()
            ),
        ),
    );

    // ---- Purge: says what it deletes, then deletes it.
    let purge = c.sh("dpkg -P tokend");
    let left = c.sh("ls -d /var/lib/tokend /run/tokend /etc/tokend 2>/dev/null; true").stdout;
    let said = purge.stdout.contains("deleting /var/lib/tokend (the token store");
    report.record(
        "`dpkg -P tokend`: says it deletes /var/lib/tokend (and what that means), then /var/lib/tokend, /run/tokend and /etc/tokend are gone",
        ensure(
            purge.ok() && said && left.trim().is_empty() && c.sh("dpkg-query -W tokend 2>/dev/null").code != 0,
            format!("exit {}: {}\nleft: {:?}", purge.code, purge.text(), left.trim()),
        ),
    );

    // ---- Teardown, checked.
    report.record_teardown(c, mock);

    let summary = format!(
        "{}\npackage built in {:.1} s (debian/build-deb --binary, debug binary), dpkg -i {:.1} s, whole test {:.1} s",
        report.summary(),
        build_time.as_secs_f64(),
        install_time.as_secs_f64(),
        test_started.elapsed().as_secs_f64()
    );
    println!("\n==== the Debian package under systemd\n{summary}");
    support::record_figures("deb_package", &summary);
    let failed: Vec<&str> = report.rows.iter().filter(|r| !r.1).map(|r| r.0.as_str()).collect();
    assert!(failed.is_empty(), "{} check(s) failed:\n  {}", failed.len(), failed.join("\n  "));
}

/// Slows the mock down, asks the daemon to refresh everything (SIGUSR1), and once the five
/// requests have reached the mock, installs the same package again. postinst restarts the
/// daemon: SIGTERM must let the five refreshes commit before it exits 0, and the new daemon
/// must come up with every credential one generation further.
fn upgrade_with_refreshes_in_flight(c: &Container, mock: &InsideMock) -> Check {
    let result = upgrade_with_mock_slowed(c, mock);
    mock.provider.set_settings(MockSettings { expires_in: LIFETIME, ..MockSettings::default() });
    result
}

fn upgrade_with_mock_slowed(c: &Container, mock: &InsideMock) -> Check {
    mock.provider.set_settings(MockSettings { expires_in: UPGRADE_LIFETIME, ..MockSettings::default() });
    // Quiet first: every token long-lived, so that only the refreshes asked for below happen.
    let before = generations(c);
    c.sh("systemctl kill -s SIGUSR1 --kill-whom=main tokend");
    wait_generations(c, &before, 1, Duration::from_secs(15))?;
    let old = c.systemctl_show("tokend", &["MainPID", "InvocationID", "NRestarts"]);
    let settled = generations(c);

    mock.provider.set_settings(MockSettings {
        expires_in: UPGRADE_LIFETIME,
        delay: UPGRADE_DELAY,
        ..MockSettings::default()
    });
    let requests_before = mock.provider.requests().len();
    let since = c.must("date +%s").trim().to_string();
    c.sh("systemctl kill -s SIGUSR1 --kill-whom=main tokend");
    let arrived = wait_until(Duration::from_secs(5), || {
        (mock.provider.requests().len() >= requests_before + CREDENTIALS.len()).then_some(())
    });
    if arrived.is_none() {
        return Err(format!(
            "the refreshes did not reach the mock: {} new requests",
            mock.provider.requests().len() - requests_before
        ));
    }
    let upgrade_started = Instant::now();
    let upgrade = c.sh(&format!("dpkg -i {DEB_IN_CONTAINER}"));
    let upgrade_time = upgrade_started.elapsed();
    let new = c.systemctl_show("tokend", &["MainPID", "InvocationID", "NRestarts", "ActiveState"]);
    let after = generations(c);
    let old_pid = old.get("MainPID").cloned().unwrap_or_default();
    let stopping = journal(c, &format!("_PID={old_pid} --since @{since} | grep -m1 'shutting down'"));
    let stopped = journal(c, &format!("_PID={old_pid} --since @{since} | tail -1"));
    let one_further = settled.iter().all(|(n, g)| after.get(n) == Some(&(g + 1)));
    let evidence = format!(
        "dpkg -i exit {} in {:.1} s; old {old:?} -> new {new:?}\nold daemon: {} | {}\ngenerations before the upgrade {settled:?}, right after {after:?}\n{}",
        upgrade.code,
        upgrade_time.as_secs_f64(),
        stopping.trim(),
        stopped.trim(),
        upgrade
            .text()
            .lines()
            .filter(|l| l.starts_with("tokend") || l.contains("rror"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    ensure(
        upgrade.ok()
            && new.get("ActiveState").map(String::as_str) == Some("active")
            && new.get("MainPID") != old.get("MainPID")
            && new.get("InvocationID") != old.get("InvocationID")
            && new.get("NRestarts") == old.get("NRestarts")
            && stopping.contains(&format!("in_flight={}", CREDENTIALS.len()))
            && one_further,
        evidence,
    )
}
