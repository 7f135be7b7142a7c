//! Manual pages and shell completions, generated from what they document, so that they cannot
//! drift from it: `tokend(1)` from the clap definitions in [`crate::cli`], `tokend.toml(5)` from
//! the commented reference configuration `config/tokend.toml` (the file the package installs as
//! `/etc/tokend/tokend.toml`), the completion scripts by clap_complete.
//!
//! [`write_all`] writes the files the Debian package ships (`examples/manual.rs` runs it for
//! `debian/build-deb`); `tokend completions SHELL` prints the same completion scripts.

use crate::cli::{Cli, CliError, exit};
use clap::{Arg, ArgAction, CommandFactory};
use clap_complete::Shell;
use clap_mangen::roff::{Inline, Roff, bold, italic, roman};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The reference configuration: every key, documented by the comment lines above it.
pub const REFERENCE_CONFIG: &str = include_str!("../config/tokend.toml");

/// The EXAMPLE of `tokend.toml(5)`: the least a working service needs. A test parses it.
pub const MINIMAL_CONFIG: &str = r#"[daemon]
database = "/var/lib/tokend/tokend.db"

[[credential]]
name = "my-nation"
provider = "nationbuilder"
slug = "mynation"
client_id = "0a1b2c3d4e5f"
client_secret_credential = "my-nation"

[[credential.sink]]
path = "/run/tokend/my-nation.token"
mode = "0640"
"#;

/// The completion scripts the package ships, and where below `/usr/share` each shell's Debian
/// package looks for them.
pub const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash-completion/completions/tokend"),
    (Shell::Zsh, "zsh/vendor-completions/_tokend"),
    (Shell::Fish, "fish/vendor_completions.d/tokend.fish"),
];

/// The manual pages, below `/usr/share` (the package gzips them).
pub const TOKEND_1: &str = "man/man1/tokend.1";
pub const TOKEND_TOML_5: &str = "man/man5/tokend.toml.5";

/// The full documentation, where the unit's Documentation= points.
const README: &str = "/usr/share/doc/tokend/README.md";

/// Exit codes and what they mean, as README "Exit codes" lists them.
const EXIT_STATUS: [(u8, &str); 10] = [
    (exit::OK, "Success."),
    (exit::FAILURE, "Failure: database, files, I/O; authorization refused (state, access_denied, exchange)."),
    (exit::USAGE, "Bad command line."),
    (exit::CONFIG, "Invalid configuration (every problem is printed, naming the file, credential and field)."),
    (exit::UNKNOWN, "Unknown credential, or no token stored for it yet."),
    (exit::NEEDS_REAUTH, "The credential needs re-authorization (grant rejected, or revoked)."),
    (exit::EXPIRED, "The stored access token has expired."),
    (
        exit::TEMPORARY,
        "Temporary failure (provider down, rate limited, answer rejected, lease busy, authorize timed out): try again later.",
    ),
    (
        exit::KEY,
        "The encryption key is missing, unreadable or wrong, or a stored value does not decrypt: nothing was sent and nothing overwritten (systemd does not restart on it).",
    ),
    (
        exit::STORE,
        "A PostgreSQL store cannot be used: unreachable, login refused, no tokend tables (run `tokend migrate`), a schema this tokend does not know, or a key configured for it (encryption covers SQLite only so far).",
    ),
];

/// What `tokend run` does on each signal (README "Signals").
const SIGNALS: [(&str, &str); 3] = [
    (
        "SIGTERM, SIGINT",
        "Stop scheduling, let in-flight refreshes finish and commit (at most 10 s), exit 0. This is what `systemctl stop` and `systemctl restart` send, and what a package upgrade does.",
    ),
    (
        "SIGHUP",
        "Reload the configuration (what `tokend reload` and `systemctl reload tokend` send); a configuration that is rejected leaves the old one running. Saving the file does the same.",
    ),
    ("SIGUSR1", "Refresh every credential now."),
];

/// THE SERVICE of `tokend(1)`: what the package's postinst points to, README "Install" in short.
/// A paragraph starting with `$ ` is a block of commands.
const SERVICE: [&str; 6] = [
    "The Debian package installs tokend.service enabled, but starts it only once /etc/tokend/tokend.toml is no longer the example (its client_id placeholders left). As root:",
    "$ printf '%s' 'THE-CLIENT-SECRET' > /etc/tokend/secrets/my-nation\nchmod 0600 /etc/tokend/secrets/my-nation\nmkdir -p /etc/systemd/system/tokend.service.d\nprintf '[Service]\\nLoadCredential=my-nation:/etc/tokend/secrets/my-nation\\n' \\\n    > /etc/systemd/system/tokend.service.d/credentials.conf\n${EDITOR:-vi} /etc/tokend/tokend.toml\nsystemctl daemon-reload && systemctl start tokend",
    "One secret file and one LoadCredential= line per `*_credential` the configuration names; in the configuration, keep the credentials you use and fill in their client_id, slug, site or URLs (tokend.toml(5)). A configuration that is invalid makes the start fail, and `journalctl -u tokend` names every problem; `tokend check` run the way the unit runs it checks without starting:",
    "$ systemd-run --pipe --wait -q -p User=tokend \\\n    -p LoadCredential=my-nation:/etc/tokend/secrets/my-nation tokend check",
    "Then the first token of each credential, as the service user: `tokend import` reads a token answer on stdin (`runuser -u tokend -- tokend import my-nation`); the running daemon picks it up at once. `systemctl reload tokend` runs `tokend reload`; an upgrade of the package restarts the daemon (SIGTERM: refreshes in flight commit first).",
    "Removing the package keeps the token store /var/lib/tokend; purging it deletes the store, /run/tokend and /etc/tokend, and says so first.",
];

/// Environment variables tokend reads, besides those clap documents with each option.
const ENVIRONMENT: [(&str, &str); 4] = [
    ("RUST_LOG", "A full tracing filter; overrides --log-level."),
    (
        "CREDENTIALS_DIRECTORY",
        "Where *_credential secrets are read from; systemd sets it for LoadCredential= (see tokend.toml(5)).",
    ),
    (
        "STATE_DIRECTORY",
        "The default directory of the database when the configuration names none; systemd sets it for StateDirectory=.",
    ),
    ("NO_COLOR", "Plain log lines even on a terminal."),
];

const FILES: [(&str, &str); 7] = [
    ("/etc/tokend/tokend.toml", "The configuration (tokend.toml(5)); readable by group tokend, written by root."),
    (
        "/etc/tokend/secrets/",
        "Client secrets and API keys, one file each, readable by root only; the unit hands them over with LoadCredential=.",
    ),
    ("/var/lib/tokend/tokend.db", "The token store (SQLite); its directory belongs to the tokend user, mode 0700."),
    ("/run/tokend/", "The token files (sinks) of the example configuration, kept across restarts."),
    (
        "/usr/lib/systemd/system/tokend.service",
        "The unit; add LoadCredential= lines in a drop-in (systemctl edit tokend).",
    ),
    ("/usr/share/doc/tokend/examples/", "The reference configuration and example units for programs that read tokens."),
    (README, "The full documentation."),
];

/// Prints the completion script for `shell` on stdout: what `tokend completions SHELL` does.
pub fn print_completions(shell: Shell) -> Result<(), CliError> {
    let script = completions(shell);
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&script)
        .and_then(|()| stdout.flush())
        .map_err(|e| CliError { code: exit::FAILURE, message: format!("cannot print the {shell} completions: {e}") })
}

/// The completion script for `shell`.
pub fn completions(shell: Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "tokend", &mut script);
    script
}

/// Writes both manual pages and the bash, zsh and fish completions below `share` (a stand-in for
/// `/usr/share`: `share/man/man1/tokend.1`, ...); returns the files written.
pub fn write_all(share: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<(&str, Vec<u8>)> =
        vec![(TOKEND_1, tokend_1().into_bytes()), (TOKEND_TOML_5, tokend_toml_5().into_bytes())];
    files.extend(COMPLETIONS.iter().map(|(shell, path)| (*path, completions(*shell))));
    let mut written = Vec::new();
    for (relative, content) in files {
        let path = share.join(relative);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        }
        std::fs::write(&path, content)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        written.push(path);
    }
    Ok(written)
}

fn version() -> String {
    format!("tokend {}", env!("CARGO_PKG_VERSION"))
}

/// `.TP` with a bold term (and the rest of `term` after it), then the text.
fn definition(roff: &mut Roff, term: Vec<Inline>, text: &str) {
    roff.control("TP", []);
    roff.text(term);
    roff.text(prose(text));
}

/// Text whose `code` spans (the README's and the reference's notation) are set in bold.
fn prose(text: &str) -> Vec<Inline> {
    text.split('`')
        .enumerate()
        .filter(|(_, part)| !part.is_empty())
        .map(|(i, part)| if i % 2 == 1 { bold(part) } else { roman(part) })
        .collect()
}

/// A clap help text as a sentence: clap's are written without the final period.
fn sentence(text: &str) -> String {
    let text = text.trim();
    if text.is_empty() || text.ends_with('.') { text.to_string() } else { format!("{text}.") }
}

/// `.TH`, then neither hyphenation nor stretched lines: paths and identifiers (`created_at`,
/// `/usr/share/doc/tokend`) must read as they are typed.
fn title(roff: &mut Roff, name: &str, section: &str, manual: &str) {
    roff.control("TH", [name, section, "", &version(), manual]);
    roff.control("nh", []);
    roff.control("ad", ["l"]);
}

// ------------------------------------------------------------------------------------------------
// tokend(1)

/// `tokend(1)`, in roff.
pub fn tokend_1() -> String {
    let mut cmd = Cli::command();
    cmd.build();
    let mut roff = Roff::new();
    title(&mut roff, "TOKEND", "1", "User Commands");
    roff.control("SH", ["NAME"]);
    roff.text([roman(format!("tokend - {}", cmd.get_about().map(|a| a.to_string()).unwrap_or_default()))]);

    roff.control("SH", ["SYNOPSIS"]);
    for (i, sub) in commands(&cmd).enumerate() {
        if i > 0 {
            roff.control("br", []);
        }
        roff.text(usage(sub));
    }

    roff.control("SH", ["DESCRIPTION"]);
    roff.text([roman(
        "tokend keeps OAuth 2.0 access tokens fresh on servers and never loses a rotated refresh token. \
         It stores every credential in SQLite and refreshes each token ahead of expiry: for every refresh it \
         takes a lease (one refresher per credential, across processes), calls the provider and commits the \
         new refresh token in one durable transaction before anything else happens. Only then does it write \
         the token files (sinks) that other programs read.",
    )]);
    roff.control("PP", []);
    roff.text([
        roman("The configuration is one TOML file, "),
        italic("tokend.toml"),
        roman("(5). "),
        bold("tokend run"),
        roman(
            " is the daemon; the packaged systemd unit tokend.service runs it as the user tokend. The other \
             commands work beside a running daemon: they take the same leases and the daemon picks up what they changed.",
        ),
    ]);

    roff.control("SH", ["OPTIONS"]);
    roff.text([roman("These options are accepted before or after the command.")]);
    for arg in visible(&cmd) {
        option(&mut roff, arg);
    }

    roff.control("SH", ["COMMANDS"]);
    for sub in commands(&cmd) {
        roff.control("TP", []);
        roff.text(usage(sub));
        let help = sub.get_long_about().or_else(|| sub.get_about()).map(|a| a.to_string()).unwrap_or_default();
        roff.text(prose(&sentence(&help)));
        let args: Vec<&Arg> = own(sub).filter(|a| has_help(a) || !a.get_possible_values().is_empty()).collect();
        if !args.is_empty() {
            roff.control("RS", []);
            for arg in args {
                option(&mut roff, arg);
            }
            roff.control("RE", []);
        }
    }

    roff.control("SH", ["THE SERVICE"]);
    for (i, paragraph) in SERVICE.iter().enumerate() {
        if i > 0 {
            roff.control("PP", []);
        }
        if let Some(command) = paragraph.strip_prefix("$ ") {
            roff.control("RS", ["4"]);
            roff.control("nf", []);
            for line in command.lines() {
                roff.text([roman(line)]);
            }
            roff.control("fi", []);
            roff.control("RE", []);
        } else {
            roff.text(prose(paragraph));
        }
    }

    roff.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in EXIT_STATUS {
        definition(&mut roff, vec![bold(code.to_string())], meaning);
    }

    roff.control("SH", ["SIGNALS"]);
    roff.text([bold("tokend run"), roman(" handles:")]);
    for (signal, effect) in SIGNALS {
        definition(&mut roff, vec![bold(signal)], effect);
    }

    roff.control("SH", ["ENVIRONMENT"]);
    for arg in visible(&cmd) {
        if let Some(var) = arg.get_env() {
            let text = format!("Default of --{}.", arg.get_long().unwrap_or_default());
            definition(&mut roff, vec![bold(var.to_string_lossy())], &text);
        }
    }
    for (var, meaning) in ENVIRONMENT {
        definition(&mut roff, vec![bold(var)], meaning);
    }

    roff.control("SH", ["FILES"]);
    for (path, what) in FILES {
        definition(&mut roff, vec![italic(path)], what);
    }

    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        italic("tokend.toml"),
        roman("(5), "),
        italic("systemctl"),
        roman("(1), "),
        italic("journalctl"),
        roman("(1), "),
        italic("systemd.exec"),
        roman(format!("(5), {README}")),
    ]);
    roff.render()
}

/// The subcommands a user can type (not clap's own `help`, which the OPTIONS cover).
fn commands(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

fn visible(cmd: &clap::Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments().filter(|a| !a.is_hide_set())
}

/// A subcommand's own arguments: not the global options, not its `--help`.
fn own(sub: &clap::Command) -> impl Iterator<Item = &Arg> {
    visible(sub).filter(|a| !a.is_global_set() && a.get_id() != "help")
}

fn has_help(arg: &Arg) -> bool {
    arg.get_long_help().or_else(|| arg.get_help()).is_some()
}

/// `tokend import NAME [--issued-at ISSUED_AT]`
fn usage(sub: &clap::Command) -> Vec<Inline> {
    let mut line = vec![bold(format!("tokend {}", sub.get_name()))];
    for arg in own(sub) {
        line.push(roman(" "));
        if arg.is_positional() {
            let name = value_name(arg);
            line.push(if arg.is_required_set() { italic(name) } else { italic(format!("[{name}]")) });
        } else {
            line.push(roman("["));
            line.extend(flag(arg));
            line.push(roman("]"));
        }
    }
    line
}

fn value_name(arg: &Arg) -> String {
    arg.get_value_names().map_or_else(|| arg.get_id().as_str().to_uppercase(), |v| v.join(" "))
}

/// `-c, --config CONFIG` (bold flags, italic value).
fn flag(arg: &Arg) -> Vec<Inline> {
    let names: Vec<String> =
        arg.get_short().map(|s| format!("-{s}")).into_iter().chain(arg.get_long().map(|l| format!("--{l}"))).collect();
    let mut out = vec![bold(names.join(", "))];
    if matches!(arg.get_action(), ArgAction::Set | ArgAction::Append) {
        out.push(roman(" "));
        out.push(italic(value_name(arg)));
    }
    out
}

/// One option or argument as a `.TP` entry: help, possible values, default.
fn option(roff: &mut Roff, arg: &Arg) {
    roff.control("TP", []);
    roff.text(if arg.is_positional() { vec![italic(value_name(arg))] } else { flag(arg) });
    let mut text = sentence(&arg.get_long_help().or_else(|| arg.get_help()).map(|h| h.to_string()).unwrap_or_default());
    let values: Vec<String> =
        arg.get_possible_values().iter().filter(|v| !v.is_hide_set()).map(|v| v.get_name().to_string()).collect();
    if !values.is_empty() && !matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        text.push_str(&format!(" One of: {}.", values.join(", ")));
    }
    let defaults: Vec<String> = arg.get_default_values().iter().map(|d| d.to_string_lossy().into_owned()).collect();
    if !defaults.is_empty() && !matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        text.push_str(&format!(" Default: {}.", defaults.join(", ")));
    }
    roff.text(prose(text.trim()));
}

// ------------------------------------------------------------------------------------------------
// tokend.toml(5)

/// A table of the configuration and its keys, in the order the reference first names them.
#[derive(Debug, Default)]
pub struct Table {
    /// `[daemon]`, `[provider.NAME]`, `[[credential]]`, `[[credential.sink]]`.
    pub name: String,
    pub doc: Vec<String>,
    pub keys: Vec<Key>,
}

/// One key: the value the reference gives it, and each distinct comment that documents it (a key
/// that several credentials use may say something for each provider).
#[derive(Debug, Default)]
pub struct Key {
    pub name: String,
    pub example: String,
    /// Shown commented out in the reference: optional, off unless set.
    pub commented: bool,
    pub docs: Vec<Vec<String>>,
}

/// The reference's comment blocks, and its tables with their keys.
#[derive(Debug, Default)]
pub struct Reference {
    /// The comment at the top of the file.
    pub intro: Vec<String>,
    pub tables: Vec<Table>,
}

/// Reads a commented configuration laid out like `config/tokend.toml`: a comment block right
/// above a key (or above a table header) documents it; `# key = value` is a key shown commented
/// out; `# ----` lines are banners that document nothing; comment lines indented further are kept
/// as lines (lists), the others are joined into paragraphs.
pub fn parse_reference(text: &str) -> Reference {
    let mut reference = Reference::default();
    let mut comment: Vec<String> = Vec::new();
    let mut current: Option<usize> = None;
    for line in text.lines().map(str::trim_end) {
        if line.is_empty() {
            if current.is_none() && reference.intro.is_empty() {
                reference.intro = std::mem::take(&mut comment);
            }
            comment.clear();
        } else if let Some(c) = line.strip_prefix('#') {
            let c = c.strip_prefix(' ').unwrap_or(c);
            if c.starts_with("----") {
                comment.clear();
            } else if let (Some(i), Some((key, value))) = (current, key_line(c)) {
                add_key(&mut reference.tables[i], key, value, true, std::mem::take(&mut comment));
            } else {
                comment.push(c.to_string());
            }
        } else if line.starts_with('[') {
            let raw = line.trim_matches(|c| c == '[' || c == ']');
            let name = match raw.split_once('.') {
                Some(("provider", _)) => "[provider.NAME]".to_string(),
                _ => line.to_string(),
            };
            let doc = std::mem::take(&mut comment);
            let i = match reference.tables.iter().position(|t| t.name == name) {
                Some(i) => i,
                None => {
                    reference.tables.push(Table { name, ..Table::default() });
                    reference.tables.len() - 1
                }
            };
            if reference.tables[i].doc.is_empty() {
                reference.tables[i].doc = doc;
            }
            current = Some(i);
        } else if let (Some(i), Some((key, value))) = (current, key_line(line)) {
            add_key(&mut reference.tables[i], key, value, false, std::mem::take(&mut comment));
        }
    }
    reference
}

/// `key = value` with a bare lower-case key and a TOML scalar or array as value.
fn key_line(line: &str) -> Option<(&str, &str)> {
    let (key, value) = line.split_once(" = ")?;
    let bare = !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    let value_like = value.starts_with(['"', '[']) || value.starts_with(|c: char| c.is_ascii_digit()) || {
        let v = value.split_whitespace().next().unwrap_or_default();
        v == "true" || v == "false"
    };
    (bare && value_like).then_some((key, value))
}

fn add_key(table: &mut Table, name: &str, example: &str, commented: bool, doc: Vec<String>) {
    let i = match table.keys.iter().position(|k| k.name == name) {
        Some(i) => i,
        None => {
            table.keys.push(Key { name: name.to_string(), example: example.to_string(), commented, docs: Vec::new() });
            table.keys.len() - 1
        }
    };
    let key = &mut table.keys[i];
    if !doc.is_empty() && !key.docs.contains(&doc) {
        key.docs.push(doc);
    }
}

/// Comment lines as roff: lines joined into paragraphs, an empty comment line between
/// paragraphs, indented lines (lists, commands) kept as they are.
fn comment_text(roff: &mut Roff, lines: &[String]) {
    let mut paragraph: Vec<&str> = Vec::new();
    let flush = |roff: &mut Roff, paragraph: &mut Vec<&str>| {
        if !paragraph.is_empty() {
            roff.text(prose(&paragraph.join(" ")));
            paragraph.clear();
        }
    };
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim().is_empty() {
            flush(roff, &mut paragraph);
            roff.control("sp", []);
            i += 1;
        } else if lines[i].starts_with(' ') {
            flush(roff, &mut paragraph);
            roff.control("nf", []);
            while i < lines.len() && lines[i].starts_with(' ') && !lines[i].trim().is_empty() {
                roff.text([roman(lines[i].as_str())]);
                i += 1;
            }
            roff.control("fi", []);
        } else {
            paragraph.push(lines[i].trim());
            i += 1;
        }
    }
    flush(roff, &mut paragraph);
}

/// `tokend.toml(5)`, in roff.
pub fn tokend_toml_5() -> String {
    let reference = parse_reference(REFERENCE_CONFIG);
    let mut roff = Roff::new();
    title(&mut roff, "TOKEND.TOML", "5", "File Formats");
    roff.control("SH", ["NAME"]);
    roff.text([roman("tokend.toml - configuration of tokend, the OAuth 2.0 token refresher")]);
    roff.control("SH", ["SYNOPSIS"]);
    roff.text([italic("/etc/tokend/tokend.toml")]);
    roff.control("SH", ["DESCRIPTION"]);
    // The first line of the reference is its title, then an empty comment line; the rest says
    // how the file works.
    let intro: Vec<String> = reference.intro.iter().skip(1).skip_while(|l| l.trim().is_empty()).cloned().collect();
    comment_text(&mut roff, &intro);
    roff.control("PP", []);
    roff.text([
        roman("Every key below is shown with the value the reference configuration gives it; keys shown "),
        italic("(optional, off unless set)"),
        roman(" are commented out there. "),
        bold("tokend check"),
        roman(" validates a file and names every problem (file, credential, field), exit status 3."),
    ]);
    for table in &reference.tables {
        roff.control("SH", [table.name.as_str()]);
        comment_text(&mut roff, &table.doc);
        for key in &table.keys {
            roff.control("TP", []);
            let mut term = vec![bold(key.name.as_str()), roman(format!(" = {}", key.example))];
            if key.commented {
                term.push(roman(" "));
                term.push(italic("(optional, off unless set)"));
            }
            roff.text(term);
            for (i, doc) in key.docs.iter().enumerate() {
                if i > 0 {
                    roff.control("sp", []);
                }
                comment_text(&mut roff, doc);
            }
        }
    }
    roff.control("SH", ["EXAMPLE"]);
    roff.text([roman(
        "One NationBuilder credential whose client secret the unit hands over as a systemd credential \
         (a drop-in with LoadCredential=my-nation:/etc/tokend/secrets/my-nation), and one token file that \
         members of the group tokend can read:",
    )]);
    roff.control("PP", []);
    roff.control("RS", ["4"]);
    roff.control("nf", []);
    for line in MINIMAL_CONFIG.lines() {
        roff.text([roman(line)]);
    }
    roff.control("fi", []);
    roff.control("RE", []);
    roff.control("SH", ["FILES"]);
    definition(&mut roff, vec![italic("/etc/tokend/tokend.toml")], "The configuration the unit and the commands use.");
    definition(
        &mut roff,
        vec![italic("/usr/share/doc/tokend/examples/tokend.toml")],
        "The reference this page is generated from, as shipped.",
    );
    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        italic("tokend"),
        roman("(1), "),
        italic("systemd.exec"),
        roman("(5) (LoadCredential=), "),
        italic("systemd-analyze"),
        roman(format!("(1), {README}")),
    ]);
    roff.render()
}
