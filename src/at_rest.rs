//! Encryption at rest as the commands and the daemon use it: the configured key loaded and the
//! store opened with it, the start-up checks, and `tokend key init` / `key rotate` / `backup` /
//! `restore`. The cryptography is in [`crate::seal`], the SQL in the store.

use crate::config::{Config, ProcessEnv};
use crate::seal::{Key, KeyId, KeySource, Keyring, SealError, Sealer};
use crate::store::{Store, StoreError};
use std::path::Path;

/// Credentials re-sealed per transaction by default: a rotation of 100,000 is 100 short
/// transactions, none holding the write lock for long.
pub const DEFAULT_BATCH: usize = 1000;

fn key_error(database: &Path, source: SealError) -> StoreError {
    StoreError::Key { path: database.to_path_buf(), source }
}

/// The sealer of `config`'s key: plaintext when none is configured.
pub fn sealer(config: &Config) -> Result<Sealer, StoreError> {
    match &config.daemon.key {
        None => Ok(Sealer::plaintext()),
        Some(source) => {
            let key = Key::load(source, &ProcessEnv).map_err(|e| key_error(&config.daemon.database, e))?;
            Ok(Sealer::with(Keyring::new(key, vec![])))
        }
    }
}

/// The store, opened with the configured key.
pub fn open(config: &Config) -> Result<Store, StoreError> {
    Store::open_sealed(&config.daemon.database, sealer(config)?)
}

/// The store for commands that show no token (`tokend list`, `tokend remove`): opened without
/// its key, so that they work outside the service, where a `key_credential` is not available.
pub fn open_without_key(config: &Config) -> Result<Store, StoreError> {
    Store::open_sealed(&config.daemon.database, Sealer::locked())
}

/// The committer, opened with the configured key.
pub fn committer(config: &Config) -> Result<crate::committer::Committer, StoreError> {
    crate::committer::Committer::open_sealed(&config.daemon.database, sealer(config)?)
}

/// The daemon's start: the store opened with the key, every key id in use checked against it
/// (a value no configured key opens stops the start, before anything is sent), and a plaintext
/// store encrypted in place when a key is configured for the first time. Without a key, says
/// once that tokens are stored in plaintext.
pub fn open_for_daemon(config: &Config) -> Result<(Store, Sealer), StoreError> {
    let database = &config.daemon.database;
    let sealer = sealer(config)?;
    let mut store = Store::open_sealed(database, sealer.clone())?;
    match sealer.keyring() {
        None => {
            tracing::warn!(
                database = %database.display(),
                "no encryption key configured: tokens are stored in plaintext (README, \"Encryption at rest\")"
            );
        }
        Some(ring) => {
            // One scan of the values' prefixes (no decryption): a key id no configured key
            // opens stops the start here, before any request.
            let using = store.key_use()?;
            if let Some((id, n)) = using.sealed.iter().find(|(id, _)| !ring.ids().any(|k| k == **id)) {
                return Err(key_error(
                    database,
                    SealError::Key {
                        source_name: ring.current().source().to_string(),
                        message: format!(
                            "{n} stored value(s) are sealed with key id {id}, not with this key ({}): a wrong key, or an unfinished `tokend key rotate` — run it again to finish",
                            ring.current().id()
                        ),
                    },
                ));
            }
            if using.plaintext > 0 {
                tracing::info!(plaintext = using.plaintext, "encrypting the plaintext store in place");
                let sealed = reseal_all(&mut store, DEFAULT_BATCH)?;
                store.compact()?;
                tracing::info!(credentials = sealed, key = %ring.current().id(), "store encrypted; old pages removed (VACUUM, WAL truncated)");
            }
        }
    }
    Ok((store, sealer))
}

/// Re-seals every credential under the store's current key, one transaction per `batch`.
fn reseal_all(store: &mut Store, batch: usize) -> Result<u64, StoreError> {
    let mut after = String::new();
    let mut total = 0u64;
    loop {
        let (rewritten, last) = store.reseal_batch(&after, batch.max(1))?;
        total += rewritten as u64;
        match last {
            Some(name) => after = name,
            None => return Ok(total),
        }
    }
}

/// What `tokend check` says about encryption: the key and, if the database exists, the key ids
/// its values use. Reads only: the store is opened without its key and nothing is marked.
pub fn describe(config: &Config) -> Result<Vec<String>, StoreError> {
    let database = &config.daemon.database;
    let sealer = sealer(config)?;
    let mut lines = vec![match sealer.keyring() {
        None => "encryption: none — tokens are stored in plaintext (README, \"Encryption at rest\")".to_string(),
        Some(ring) => format!("encryption: {} (key id {})", ring.current().source(), ring.current().id()),
    }];
    if !database.exists() {
        return Ok(lines);
    }
    let store = Store::open_sealed(database, Sealer::locked())?;
    let recorded = store.store_key_id()?;
    let using = store.key_use()?;
    lines.push(format!("  stored values: {}", using.describe()));
    let problem = match (sealer.keyring(), recorded) {
        (None, Some(id)) => Some(format!(
            "the database is encrypted (key id {id}) but no key is configured: set key_credential, key_file or key_env in [daemon]"
        )),
        (Some(ring), _) => {
            let foreign: Vec<String> = recorded
                .into_iter()
                .chain(using.sealed.keys().copied())
                .filter(|id| !ring.ids().any(|k| k == *id))
                .collect::<std::collections::BTreeSet<_>>()
                .iter()
                .map(ToString::to_string)
                .collect();
            (!foreign.is_empty()).then(|| {
                format!(
                    "the database uses key id(s) {} that this key ({}, id {}) cannot open: a wrong key, or an unfinished `tokend key rotate`",
                    foreign.join(", "),
                    ring.current().source(),
                    ring.current().id()
                )
            })
        }
        (None, None) => None,
    };
    match problem {
        Some(message) => Err(key_error(database, SealError::Store(message))),
        None => Ok(lines),
    }
}

/// Refuses to change the store under a running daemon, which holds its own key.
pub fn refuse_if_running(database: &Path) -> Result<(), StoreError> {
    match crate::daemon::running_daemon(database) {
        Some(pid) => Err(StoreError::Other {
            path: database.to_path_buf(),
            message: format!("tokend is running on it (pid {pid}); stop it first (systemctl stop tokend)"),
        }),
        None => Ok(()),
    }
}

/// `tokend key init FILE`: a new random key, mode 0600, never overwriting a file.
pub fn write_new_key(file: &Path) -> Result<Key, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = Key::generate_text();
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(file)
        .map_err(|e| format!("cannot create {}: {e} (an existing key is never overwritten)", file.display()))?;
    out.write_all(text.as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    Key::from_text(&text, format!("key_file {}", file.display())).map_err(|e| e.to_string())
}

/// Seals every value of a plaintext store with `key` (`tokend key init --encrypt-existing`), then
/// removes the old pages. Resumable: values already sealed with `key` are left as they are.
pub fn encrypt_existing(config: &Config, key: Key) -> Result<u64, StoreError> {
    let database = &config.daemon.database;
    refuse_if_running(database)?;
    let mut store = Store::open_sealed(database, Sealer::with(Keyring::new(key, vec![])))?;
    let sealed = reseal_all(&mut store, DEFAULT_BATCH)?;
    store.compact()?;
    Ok(sealed)
}

/// `tokend key rotate --new SOURCE`: the store's values re-sealed from the configured key to the
/// new one, one transaction per `batch` credentials. Both keys open values until it is done, and
/// the store records the new key first: killed at any point, the same command finishes the job.
pub fn rotate(config: &Config, new: &KeySource, batch: usize) -> Result<(KeyId, u64), StoreError> {
    let database = &config.daemon.database;
    refuse_if_running(database)?;
    let new_key = Key::load(new, &ProcessEnv).map_err(|e| key_error(database, e))?;
    let new_id = new_key.id();
    let old = match &config.daemon.key {
        Some(source) => vec![Key::load(source, &ProcessEnv).map_err(|e| key_error(database, e))?],
        None => vec![],
    };
    let mut store = Store::open_sealed(database, Sealer::with(Keyring::new(new_key, old)))?;
    store.set_store_key_id(new_id)?;
    let resealed = reseal_all(&mut store, batch)?;
    store.compact()?;
    Ok((new_id, resealed))
}

/// `tokend backup FILE`: a consistent copy beside a running daemon; needs no key, since the
/// values are copied as stored.
pub fn backup(config: &Config, target: &Path) -> Result<(Option<KeyId>, u64), StoreError> {
    let database = &config.daemon.database;
    if !database.exists() {
        return Err(StoreError::Other {
            path: database.to_path_buf(),
            message: "does not exist: nothing to back up".into(),
        });
    }
    crate::store::backup(database, target)
}

/// `tokend restore FILE`: the backup copied into place after checking that the configured key
/// opens every value in it. Refuses while tokend runs and over a store that holds credentials.
pub fn restore(config: &Config, backup: &Path) -> Result<u64, StoreError> {
    let database = &config.daemon.database;
    refuse_if_running(database)?;
    if database.exists() && !matches!(crate::store::count_credentials(database), Ok(0)) {
        return Err(StoreError::Other {
            path: database.to_path_buf(),
            message: "already holds a store; move it away first (restore never overwrites credentials)".into(),
        });
    }
    let staging = database.with_extension("restoring");
    crate::store::remove_with_side_files(&staging);
    crate::store::backup(backup, &staging)?;
    let checked = Store::open_sealed(&staging, sealer(config)?).and_then(|store| {
        let n = store.count()?;
        // Opens every value: a key that does not fit, or a damaged value, fails here.
        store.list()?;
        Ok(n)
    });
    let n = match checked {
        Ok(n) => n,
        Err(e) => {
            crate::store::remove_with_side_files(&staging);
            return Err(e);
        }
    };
    give_to_directory_owner(&staging);
    crate::store::remove_with_side_files(database);
    std::fs::rename(&staging, database).map_err(|source| StoreError::Io {
        path: database.to_path_buf(),
        context: format!("cannot move {} into place", staging.display()),
        source,
    })?;
    Ok(n)
}

/// Root restoring into the service's state directory: the database must stay the service
/// user's, as the directory is, or the daemon could not write it.
fn give_to_directory_owner(file: &Path) {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(meta) = std::fs::metadata(dir)
        && let Err(e) = std::os::unix::fs::chown(file, Some(meta.uid()), Some(meta.gid()))
    {
        tracing::warn!(file = %file.display(), "cannot give the restored database to its directory's owner: {e}");
    }
}
