//! tokend keeps OAuth 2.0 access tokens fresh on servers and never loses a rotated refresh token.
//!
//! Data flows one way: `config` → `store` → `schedule` → `refresh` (via `provider`) → `store` → `sink`.
//! Each module has one job:
//!
//! | module | job |
//! | --- | --- |
//! | [`config`] | TOML → typed, validated [`config::Config`]; secrets from inline/file/env/systemd credentials |
//! | [`committer`] | group commit: one thread batches the refresh path's store operations |
//! | [`batcher`] | a thread that takes its work in batches (committer, sink writer) |
//! | [`store`] | SQLite schema, migrations, leases, the atomic rotation commit |
//! | [`provider`] | build each provider's token request, send it, classify the answer |
//! | [`schedule`] | when a credential is due; backoff; jitter (pure, no I/O) |
//! | [`refresh`] | one refresh, the five durable steps — the invariant lives there |
//! | [`sink`] | atomic token files (raw / json / env) |
//! | [`daemon`] | `tokend run`: timers, signals, file watches, config reload — wiring only |
//! | [`hooks`] | `on_refresh` / `on_failure` commands, with a timeout |
//! | [`logging`] | tracing set-up: human text, JSON, or journald priorities |
//! | [`memory`] | allocator settings that keep a large daemon's memory what it uses |
//! | [`metrics`] | Prometheus textfile rendering |
//! | [`timer`] | sleeping until a wall-clock time (survives suspend and clock steps) |
//! | [`authorize`] | `tokend authorize`: code + PKCE + state, password grant, first token |
//! | [`cli`] | subcommands and their output |
//! | [`dev`] | `tokend dev`: the self-contained demo, and its loopback token endpoint ([`dev::mock`], also the tests') |
//! | [`manual`] | man pages and shell completions, generated from the CLI and the reference config |
//! | [`redact`] | secrets wrapped so they print only as fingerprints |
//! | [`seal`] | encryption at rest, backend-neutral: keys, key ids, sealing and opening one value |
//! | [`at_rest`] | encryption as commands and start-up use it: key loading, key init/rotate, backup/restore |
//! | [`clock`] | wall-clock time as unix seconds/milliseconds |
//! | [`untrusted`] | opening files where others can write: no links, no blocking, bounded reads |

pub mod at_rest;
pub mod authorize;
pub mod batcher;
pub mod cli;
pub mod clock;
pub mod committer;
pub mod config;
pub mod daemon;
pub mod dev;
pub mod hooks;
pub mod logging;
pub mod manual;
pub mod memory;
pub mod metrics;
pub mod provider;
pub mod redact;
pub mod refresh;
pub mod schedule;
pub mod seal;
pub mod sink;
pub mod socket;
pub mod store;
pub mod timer;
pub mod untrusted;
