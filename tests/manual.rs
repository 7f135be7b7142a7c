//! The manual pages and shell completions the package ships (`tokend::manual`): the pages render
//! without a warning, `tokend.toml(5)` documents every key the parser accepts, its EXAMPLE is
//! valid, `tokend completions SHELL` prints the shipped scripts, and each script loads in its shell
//! and completes the subcommands.
//!
//! A shell that is not installed is SKIPPED with the reason, except under CI (`CI` set), where
//! `.ci/run` installs bash, zsh, fish and groff, and a missing one fails.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use tokend::manual;

/// Runs `program args...`; None when the program is not installed (SKIPPED outside CI).
fn run(program: &str, args: &[&str]) -> Option<std::process::Output> {
    match Command::new(program).args(args).stdin(Stdio::null()).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{program} is not installed, and CI needs it (.ci/run installs it)"
            );
            eprintln!("SKIPPED: {program} {}: {program} is not installed", args.join(" "));
            None
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What a terminal shows of man's output: overstrike (`N\bN` bold, `_\bx` underline) and SGR
/// sequences removed.
fn plain(formatted: &str) -> String {
    let mut out: Vec<char> = Vec::new();
    let mut chars = formatted.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{8}' => {
                out.pop();
            }
            '\u{1b}' if chars.peek() == Some(&'[') => {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            c => out.push(c),
        }
    }
    out.into_iter().collect()
}

fn shipped() -> (tempfile::TempDir, BTreeMap<String, std::path::PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let files = manual::write_all(dir.path()).unwrap();
    let by_name = files.into_iter().map(|f| (f.file_name().unwrap().to_string_lossy().into_owned(), f)).collect();
    (dir, by_name)
}

/// groff in warning mode: every warning class on, output discarded. Then `man -l` as a reader
/// would see it.
fn renders_cleanly(page: &Path, must_contain: &[&str]) {
    let path = page.to_str().unwrap();
    let Some(groff) = run("groff", &["-man", "-Tutf8", "-ww", "-z", path]) else { return };
    assert!(groff.status.success() && groff.stderr.is_empty(), "groff on {path}: {}", text(&groff.stderr));
    let Some(man) = run("man", &["-l", "-Tutf8", path]) else { return };
    let shown = plain(&text(&man.stdout));
    assert!(man.status.success(), "man -l {path}: {}", text(&man.stderr));
    for needle in must_contain {
        assert!(shown.contains(needle), "man -l {path} does not show {needle:?}:\n{shown}");
    }
}

#[test]
fn tokend_1_renders_and_lists_every_command() {
    let (_dir, files) = shipped();
    let mut expected =
        vec!["NAME", "SYNOPSIS", "OPTIONS", "COMMANDS", "THE SERVICE", "EXIT STATUS", "SIGNALS", "FILES", "SEE ALSO"];
    let commands: Vec<String> = {
        use clap::CommandFactory;
        tokend::cli::Cli::command().get_subcommands().map(|s| format!("tokend {}", s.get_name())).collect()
    };
    expected.extend(commands.iter().map(String::as_str));
    expected.extend([
        "--config",
        "TOKEND_CONFIG",
        "SIGHUP",
        "tokend.toml(5)",
        "One of: bash, elvish, fish, powershell, zsh",
    ]);
    renders_cleanly(&files["tokend.1"], &expected);
}

#[test]
fn tokend_toml_5_renders_and_documents_every_key_the_parser_accepts() {
    let (_dir, files) = shipped();
    // The parser names the keys it accepts when it meets one it does not: ask each table.
    let probes = [
        ("", "zz_probe = 1\n"),
        ("[daemon]", "[daemon]\nzz_probe = 1\n"),
        ("[provider.NAME]", "[provider.nudge]\nzz_probe = 1\n"),
        ("[[credential]]", "[[credential]]\nzz_probe = 1\n"),
        ("[[credential.sink]]", "[[credential]]\nname = \"a\"\n[[credential.sink]]\nzz_probe = 1\n"),
    ];
    let reference = manual::parse_reference(manual::REFERENCE_CONFIG);
    let mut undocumented = Vec::new();
    let mut keys = 0;
    for (table, probe) in probes {
        let env: BTreeMap<String, String> = BTreeMap::new();
        let error = tokend::config::parse_with(Path::new("/probe.toml"), probe, &env).unwrap_err().to_string();
        // serde: "expected `a` or `b`", "expected one of `a`, `b`, `c`".
        let list = error.split("expected ").nth(1).unwrap_or_else(|| panic!("no list of keys in {error:?}"));
        let accepted: Vec<&str> = list.split('`').skip(1).step_by(2).collect();
        assert!(accepted.len() >= 2, "{table}: {accepted:?} from {error:?}");
        for key in accepted {
            keys += 1;
            let documented = if table.is_empty() {
                // The top-level keys are the tables themselves.
                reference.tables.iter().any(|t| t.name.trim_matches(['[', ']']).split('.').next() == Some(key))
            } else {
                // A key of its own, or one the text of another key lists (the ways to give a
                // secret: client_secret, client_secret_file, ...).
                reference.tables.iter().filter(|t| t.name == table).any(|t| {
                    t.keys.iter().any(|k| k.name == key)
                        || t.keys.iter().flat_map(|k| k.docs.iter().flatten()).any(|line| {
                            line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|w| w == key)
                        })
                })
            };
            if !documented {
                undocumented.push(format!("{table} {key}"));
            }
        }
    }
    assert!(keys > 40, "only {keys} keys found");
    assert!(undocumented.is_empty(), "keys the parser accepts but tokend.toml(5) does not document: {undocumented:?}");
    // Every key the reference shows has a comment that says what it does.
    let silent: Vec<String> = reference
        .tables
        .iter()
        .flat_map(|t| t.keys.iter().filter(|k| k.docs.is_empty()).map(move |k| format!("{} {}", t.name, k.name)))
        .collect();
    assert!(silent.is_empty(), "keys without a comment in config/tokend.toml: {silent:?}");
    renders_cleanly(
        &files["tokend.toml.5"],
        &["[daemon]", "[provider.NAME]", "[[credential]]", "[[credential.sink]]", "metrics_file", "EXAMPLE"],
    );
}

#[test]
fn the_example_of_tokend_toml_5_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("my-nation"), "the-secret").unwrap();
    let env: BTreeMap<String, String> =
        [("CREDENTIALS_DIRECTORY".to_string(), dir.path().display().to_string())].into();
    let config = tokend::config::parse_with(Path::new("/etc/tokend/tokend.toml"), manual::MINIMAL_CONFIG, &env)
        .unwrap_or_else(|e| panic!("the EXAMPLE of tokend.toml(5) is rejected: {e}"));
    assert_eq!(config.credentials.len(), 1);
    assert_eq!(config.credentials[0].sinks.len(), 1);
}

#[test]
fn tokend_completions_prints_the_shipped_scripts() {
    for (shell, _) in manual::COMPLETIONS {
        let out =
            Command::new(env!("CARGO_BIN_EXE_tokend")).args(["completions", &shell.to_string()]).output().unwrap();
        assert!(out.status.success(), "tokend completions {shell}: {}", text(&out.stderr));
        assert_eq!(
            out.stdout,
            manual::completions(shell),
            "tokend completions {shell} differs from the shipped script"
        );
        assert!(out.stderr.is_empty(), "tokend completions {shell} wrote to stderr: {}", text(&out.stderr));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tokend")).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "an unknown shell is a usage error: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("tcsh"), "{}", text(&out.stderr));
}

/// Each script loads in its shell; bash and fish complete `tokend <TAB>` with the subcommands
/// and an argument's values, zsh registers its function.
#[test]
fn each_completion_script_loads_in_its_shell_and_completes() {
    let (_dir, files) = shipped();
    let bash = files["tokend"].to_str().unwrap();
    let zsh = files["_tokend"].to_str().unwrap();
    let fish = files["tokend.fish"].to_str().unwrap();
    let mut checked = Vec::new();

    // bash: what the completion function puts in COMPREPLY for `tokend ` and `tokend completions `.
    let script = r#"set -e
source "$1"
complete -p tokend
COMP_WORDS=(tokend ""); COMP_CWORD=1; COMP_LINE="tokend "; COMP_POINT=${#COMP_LINE}
_tokend tokend "" tokend
echo "subcommands: ${COMPREPLY[*]}"
COMP_WORDS=(tokend completions ""); COMP_CWORD=2; COMP_LINE="tokend completions "; COMP_POINT=${#COMP_LINE}
_tokend tokend "" completions
echo "shells: ${COMPREPLY[*]}""#;
    if let Some(out) = run("bash", &["--norc", "--noprofile", "-c", script, "bash", bash]) {
        let said = text(&out.stdout);
        assert!(out.status.success() && out.stderr.is_empty(), "bash: {said}{}", text(&out.stderr));
        assert!(said.contains("-F _tokend tokend"), "bash did not register the completion: {said}");
        let subs = said.lines().find(|l| l.starts_with("subcommands:")).unwrap_or_default();
        assert!(["check", "import", "run", "completions"].iter().all(|c| subs.split(' ').any(|w| w == *c)), "{said}");
        let shells = said.lines().find(|l| l.starts_with("shells:")).unwrap_or_default();
        assert!(["bash", "zsh", "fish"].iter().all(|c| shells.split(' ').any(|w| w == *c)), "{said}");
        checked.push("bash");
    }

    // zsh: the function is registered for tokend once compinit ran (as a login shell's does).
    let script = r#"autoload -Uz compinit && compinit -u -D && source "$1" && print -r -- "registered: $_comps[tokend]" && whence -w _tokend"#;
    if let Some(out) = run("zsh", &["-f", "-c", script, "zsh", zsh]) {
        let said = text(&out.stdout);
        assert!(out.status.success() && out.stderr.is_empty(), "zsh: {said}{}", text(&out.stderr));
        assert!(said.contains("registered: _tokend") && said.contains("_tokend: function"), "zsh: {said}");
        checked.push("zsh");
    }

    // fish: `complete -C` prints what fish would offer. (clap_complete's fish script completes the
    // values of options, not of positional arguments: `tokend completions <TAB>` offers files.)
    let script =
        r#"source $argv[1]; and complete -C 'tokend '; and echo ---; and complete -C 'tokend check --log-format '"#;
    if let Some(out) = run("fish", &["--no-config", "-c", script, fish]) {
        let said = text(&out.stdout);
        assert!(out.status.success() && out.stderr.is_empty(), "fish: {said}{}", text(&out.stderr));
        let (subs, formats) = said.split_once("---").unwrap_or_default();
        let first_words = |s: &str| {
            s.lines()
                .filter(|l| !l.is_empty())
                .filter_map(|l| l.split('\t').next())
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let subs = first_words(subs);
        assert!(["check", "import", "run", "completions"].iter().all(|c| subs.iter().any(|w| w == c)), "fish: {said}");
        assert_eq!(first_words(formats), ["json", "text"], "fish: {said}");
        checked.push("fish");
    }
    println!("completion scripts checked in: {checked:?}");
}
