//! Token files for programs in any language. A reader must never see a partial file or a
//! stale-but-valid-looking token, so every write is: temp file in the same directory (created
//! exclusively, never following links) → write → fsync → rename over the target → fsync the
//! directory. A watcher sees exactly one rename per new token. Whatever someone planted at the
//! target — a symlink, a hard link, a FIFO — is replaced by the rename, which swaps the directory
//! entry and follows nothing: readers get tokend's token, never the planter's. Nothing is ever
//! read, written or opened through it (see [`crate::untrusted`]).

use crate::clock::rfc3339;
use crate::config::{Credential, SinkConfig, SinkFormat};
use crate::store::TokenState;
use crate::untrusted::{self, Found};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Entries found at a sink path that tokend did not put there (links, FIFOs, other files) and
/// replaced, since start; for `tokend_sink_replaced_total`.
static REPLACED: AtomicU64 = AtomicU64::new(0);

/// How many planted entries sink writes have replaced since the process started.
pub fn replaced_total() -> u64 {
    REPLACED.load(Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
#[error("sink {path}: {message}")]
pub struct SinkError {
    pub path: PathBuf,
    pub message: String,
}

fn sink_error(path: &Path, message: impl Into<String>) -> SinkError {
    SinkError { path: path.to_path_buf(), message: message.into() }
}

/// `TOKEND_<NAME>_` with the name upper-cased and '-' turned into '_', for env sinks.
pub fn env_prefix(credential: &str) -> String {
    format!("TOKEND_{}_", credential.to_ascii_uppercase().replace('-', "_"))
}

/// The bytes a sink of `format` holds for `state`.
pub fn render(format: SinkFormat, state: &TokenState) -> Result<Vec<u8>, String> {
    let token = state.access_token.expose();
    Ok(match format {
        // No trailing newline: `$(cat file)` and `-H "Authorization: Bearer $(cat file)"` need none,
        // and a reader comparing bytes gets exactly the token.
        SinkFormat::Raw => token.as_bytes().to_vec(),
        SinkFormat::Json => {
            let mut value = serde_json::json!({
                "access_token": token,
                "token_type": state.token_type,
                "expires_at": state.expires_at.map(rfc3339),
                "scope": state.scope,
                "generation": state.generation,
            });
            if let Some(extra) = extra_value(state) {
                value["extra"] = extra;
            }
            let mut bytes = serde_json::to_vec_pretty(&value).map_err(|e| e.to_string())?;
            bytes.push(b'\n');
            bytes
        }
        SinkFormat::Env => {
            // Single quotes keep `$` and friends literal for both `source` and systemd's
            // EnvironmentFile=; the answer parser already guarantees no whitespace or controls.
            if token.contains('\'') {
                return Err("the access token contains a single quote, which an env file cannot carry safely".into());
            }
            let prefix = env_prefix(&state.name);
            let expires = state.expires_at.map(rfc3339).unwrap_or_default();
            let mut text = format!("{prefix}ACCESS_TOKEN='{token}'\n{prefix}EXPIRES_AT='{expires}'\n");
            for (name, value) in extra_env(state) {
                text.push_str(&format!("{prefix}{name}='{value}'\n"));
            }
            text.into_bytes()
        }
    })
}

/// The kept answer extras as JSON, if any.
pub fn extra_value(state: &TokenState) -> Option<serde_json::Value> {
    serde_json::from_str(state.extra.as_deref()?).ok()
}

/// The variables (without prefix) the extras become by the provider's rules. A value that an env
/// file cannot carry inside single quotes is left out (the json sink has it); the names come
/// from tokend, the values from the provider, already cleaned of control characters.
pub fn extra_env(state: &TokenState) -> Vec<(String, String)> {
    let Some(extra) = state.extra.as_deref() else { return Vec::new() };
    let Ok(map) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(extra) else { return Vec::new() };
    let Ok(kind) = state.provider.parse::<crate::provider::ProviderKind>() else { return Vec::new() };
    (kind.preset().extra_env)(&map)
        .into_iter()
        .filter(|(name, value)| {
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !matches!(name.as_str(), "ACCESS_TOKEN" | "EXPIRES_AT")
                && !value.contains(['\'', '\n', '\r', '\0'])
        })
        .collect()
}

/// Writes `state` into the sink atomically. Called only after the store commit.
pub fn write(sink: &SinkConfig, state: &TokenState) -> Result<(), SinkError> {
    let bytes = render(sink.format, state).map_err(|m| sink_error(&sink.path, m))?;
    write_atomic(&sink.path, &bytes, sink.mode, sink.group.as_ref().map(|g| g.1))
}

/// Replaces `path` with `bytes` so that readers see the old file or the new one, never a mix:
/// temp file → fsync → rename → fsync directory. Whatever else is at `path` is replaced.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32, gid: Option<u32>) -> Result<(), SinkError> {
    let dir = parent_dir(path);
    let tmp = temp_path(path)?;
    let result = write_new_file(&tmp, bytes, mode, gid)
        .and_then(|()| rename_into_place(&tmp, path))
        .and_then(|()| sync_dir(&dir));
    if let Err(message) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(sink_error(path, message));
    }
    Ok(())
}

/// Writes many sinks at once with the guarantees of [`write`] for each file (its content is on
/// disk before the rename; a reader sees the old file or the new), in phases: every temp file is
/// created and written, the kernel is asked to start writing all of them back, then all are
/// fsync'd at once (see [`FSYNC_THREADS`]), then renamed; every touched directory is fsync'd once
/// for the whole batch. (An earlier version used one `syncfs(2)` per batch: it flushes everything
/// on the file system, the store's own commits included, which then wait behind unrelated data.)
pub fn write_many(items: &[(&SinkConfig, &TokenState)], placements: &Placements) -> Vec<Result<(), SinkError>> {
    let mut results: Vec<Result<(), SinkError>> = Vec::with_capacity(items.len());
    let mut dirs = std::collections::BTreeSet::new();
    // Bounded so that a start-up with 100,000 sinks does not hold 100,000 descriptors open.
    for chunk_start in (0..items.len()).step_by(WRITE_MANY_OPEN_FILES) {
        let chunk = &items[chunk_start..items.len().min(chunk_start + WRITE_MANY_OPEN_FILES)];
        place_chunk(chunk, chunk_start, &mut results, &mut dirs, placements);
    }
    for dir in dirs {
        if let Err(m) = sync_dir(&dir) {
            for (i, (sink, _)) in items.iter().enumerate() {
                if parent_dir(&sink.path) == dir && results[i].is_ok() {
                    results[i] = Err(sink_error(&sink.path, m.clone()));
                }
            }
        }
    }
    results
}

const WRITE_MANY_OPEN_FILES: usize = 256;

/// Phases 1–3 of [`write_many`] for `chunk`, whose first item is `items[offset]`: results are
/// pushed in order; directories of placed files are collected for the final fsync.
fn place_chunk(
    chunk: &[(&SinkConfig, &TokenState)],
    offset: usize,
    results: &mut Vec<Result<(), SinkError>>,
    dirs: &mut std::collections::BTreeSet<PathBuf>,
    placements: &Placements,
) {
    let mut staged: Vec<(usize, PathBuf, Arc<File>)> = Vec::with_capacity(chunk.len());
    for (i, (sink, state)) in chunk.iter().enumerate().map(|(i, item)| (offset + i, item)) {
        let created = render(sink.format, state).map_err(|m| sink_error(&sink.path, m)).and_then(|bytes| {
            let tmp = temp_path(&sink.path)?;
            let file = create_temp(&tmp, &bytes, sink.mode, sink.group.as_ref().map(|g| g.1))
                .map_err(|m| sink_error(&sink.path, m))?;
            Ok((tmp, file))
        });
        match created {
            Ok((tmp, file)) => {
                staged.push((i, tmp, Arc::new(file)));
                results.push(Ok(()));
            }
            Err(e) => results.push(Err(e)),
        }
    }
    for (_, _, file) in &staged {
        // Only a hint (Linux starts writeback of the dirty pages); the fsync below is the guarantee.
        let _ = nix::fcntl::posix_fadvise(&**file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
    let synced = fsync_in_parallel(&staged);
    for ((i, tmp, file), synced) in staged.into_iter().zip(synced) {
        let sink = chunk[i - offset].0;
        // Before the rename, so that its event can never arrive first. A file that then fails
        // to land is never at the path, so its record never matches anything.
        if let Ok(meta) = file.metadata() {
            placements.record(&sink.path, &meta);
        }
        let placed = synced.and_then(|()| rename_into_place(&tmp, &sink.path));
        match placed {
            Ok(()) => {
                dirs.insert(parent_dir(&sink.path));
            }
            Err(m) => {
                let _ = std::fs::remove_file(&tmp);
                results[i] = Err(sink_error(&sink.path, m));
            }
        }
    }
}

/// Threads that fsync a batch's files at the same time, so the disk gets many files' writes and
/// flushes at once instead of one round trip each: on this project's VM, `benches/fsync_probe.py`
/// measured about 3,000 files/s fsync'd one after another and 6,600–8,200/s with the writeback hint
/// and 16 threads (BENCHMARKS.md). The threads only wait on the disk. They are started once, on the
/// first batch, and then wait on their queue: starting them for every batch (a fleet node writes
/// many small batches) cost more CPU than the fsyncs' own system calls.
const FSYNC_THREADS: usize = 16;

/// One thread's share of a batch: the files (with their place in the batch) and where to report.
type FsyncTask = (Vec<(usize, Arc<File>)>, std::sync::mpsc::Sender<Vec<(usize, Result<(), String>)>>);

fn fsync(file: &File) -> Result<(), String> {
    file.sync_all().map_err(|e| format!("cannot fsync: {e}"))
}

/// The fsync threads' queue; `None` if not one of them could be started.
fn fsync_threads() -> Option<&'static std::sync::Mutex<std::sync::mpsc::Sender<FsyncTask>>> {
    static QUEUE: std::sync::OnceLock<Option<std::sync::Mutex<std::sync::mpsc::Sender<FsyncTask>>>> =
        std::sync::OnceLock::new();
    QUEUE
        .get_or_init(|| {
            let (queue, tasks) = std::sync::mpsc::channel::<FsyncTask>();
            let tasks = Arc::new(std::sync::Mutex::new(tasks));
            let started = (0..FSYNC_THREADS)
                .filter(|_| {
                    let tasks = tasks.clone();
                    std::thread::Builder::new()
                        .name("tokend-fsync".into())
                        .stack_size(64 * 1024)
                        .spawn(move || {
                            loop {
                                let next = tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
                                let Ok((files, done)) = next else { return };
                                let _ = done.send(files.iter().map(|(index, file)| (*index, fsync(file))).collect());
                            }
                        })
                        .is_ok()
                })
                .count();
            (started > 0).then(|| std::sync::Mutex::new(queue))
        })
        .as_ref()
}

/// Each fsync thread gets one contiguous share of the batch (one hand-off per thread, not per
/// file).
fn fsync_in_parallel(staged: &[(usize, PathBuf, Arc<File>)]) -> Vec<Result<(), String>> {
    let inline = || staged.iter().map(|(_, _, f)| fsync(f)).collect();
    if staged.len() < 2 {
        return inline();
    }
    let Some(queue) = fsync_threads() else { return inline() };
    let per_thread = staged.len().div_ceil(FSYNC_THREADS).max(1);
    let (done, results) = std::sync::mpsc::channel();
    let mut shares = 0;
    {
        let queue = queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (first, share) in staged.chunks(per_thread).enumerate().map(|(n, share)| (n * per_thread, share)) {
            let files = share.iter().enumerate().map(|(i, (_, _, file))| (first + i, file.clone())).collect();
            if queue.send((files, done.clone())).is_err() {
                return inline();
            }
            shares += 1;
        }
    }
    drop(done);
    let mut synced: Vec<Result<(), String>> = vec![Err("the fsync thread failed".into()); staged.len()];
    for (index, result) in results.iter().take(shares).flatten() {
        synced[index] = result;
    }
    synced
}

/// Work for the sink thread. Writes and repairs share one queue, so they happen in the order they
/// were asked for: a repair planned from an older state can never land after a newer write.
enum Job {
    /// A refresh's new token: write every sink.
    Write {
        sinks: Vec<SinkConfig>,
        state: Box<TokenState>,
        reply: tokio::sync::oneshot::Sender<Vec<Result<(), SinkError>>>,
    },
    /// Sinks that may have been altered: each is read (as [`crate::untrusted`] allows) and
    /// rewritten only if it does not hold its token; a token that expired meanwhile is left
    /// alone (the daemon removes those files).
    Repair { items: Vec<(Arc<str>, SinkConfig, TokenState)>, reply: tokio::sync::oneshot::Sender<Vec<Repaired>> },
}

/// One sink a repair rewrote (or failed to).
pub struct Repaired {
    pub credential: Arc<str>,
    pub path: PathBuf,
    pub result: Result<(), SinkError>,
}

/// Jobs the sink thread takes at once; more wait for the next batch.
const MAX_SINK_JOBS: usize = 512;

/// A handle to the sink thread: every read and write of a sink file by the daemon happens there,
/// off its loop, and concurrent refreshes' files are written as one batch ([`write_many`]). The
/// thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct SinkWriter {
    jobs: std::sync::mpsc::Sender<Job>,
    placements: Placements,
}

impl SinkWriter {
    pub fn start() -> std::io::Result<SinkWriter> {
        let placements = Placements::default();
        let placed = placements.clone();
        let jobs = crate::batcher::spawn("tokend-sinks", MAX_SINK_JOBS, move |batch: Vec<Job>| {
            let mut writes = Vec::new();
            for job in batch {
                match job {
                    Job::Write { sinks, state, reply } => writes.push((sinks, *state, reply)),
                    Job::Repair { items, reply } => {
                        flush_writes(std::mem::take(&mut writes), &placed);
                        let _ = reply.send(repair(&items, &placed));
                    }
                }
            }
            flush_writes(writes, &placed);
        })?;
        Ok(SinkWriter { jobs, placements })
    }

    /// Whether `sink`'s path still holds the file this writer last placed there, untouched (see
    /// [`Placements`]).
    pub fn holds_placed(&self, sink: &SinkConfig) -> bool {
        self.placements.holds_placed(sink)
    }

    /// Writes a refresh's sinks, batched with concurrent refreshes'; returns once the caller's
    /// files are in place.
    pub async fn write(&self, sinks: &[SinkConfig], state: &TokenState) -> Vec<Result<(), SinkError>> {
        self.queue_write(sinks, state).await
    }

    /// [`Self::write`], queued before this returns: behind every write and repair asked for
    /// earlier, ahead of every later one, whenever the caller gets round to awaiting it.
    pub fn queue_write(
        &self,
        sinks: &[SinkConfig],
        state: &TokenState,
    ) -> impl std::future::Future<Output = Vec<Result<(), SinkError>>> + Send + 'static {
        fn gone(paths: Vec<PathBuf>) -> Vec<Result<(), SinkError>> {
            paths.iter().map(|p| Err(sink_error(p, "the sink writer thread is gone"))).collect()
        }
        let paths: Vec<PathBuf> = sinks.iter().map(|s| s.path.clone()).collect();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queued = !sinks.is_empty()
            && self.jobs.send(Job::Write { sinks: sinks.to_vec(), state: Box::new(state.clone()), reply }).is_ok();
        async move {
            match queued {
                true => answer.await.unwrap_or_else(|_| gone(paths)),
                false => gone(paths),
            }
        }
    }

    /// Checks `items` and rewrites those that do not hold their token; returns what was
    /// rewritten.
    pub async fn repair(&self, items: Vec<(Arc<str>, SinkConfig, TokenState)>) -> Vec<Repaired> {
        if items.is_empty() {
            return Vec::new();
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.jobs.send(Job::Repair { items, reply }).is_err() {
            tracing::error!("the sink writer thread is gone; sinks are not checked");
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }
}

type WriteJob = (Vec<SinkConfig>, TokenState, tokio::sync::oneshot::Sender<Vec<Result<(), SinkError>>>);

fn flush_writes(jobs: Vec<WriteJob>, placements: &Placements) {
    if jobs.is_empty() {
        return;
    }
    let items: Vec<(&SinkConfig, &TokenState)> =
        jobs.iter().flat_map(|(sinks, state, _)| sinks.iter().map(move |s| (s, state))).collect();
    let mut results = write_many(&items, placements).into_iter();
    for (sinks, _, reply) in jobs {
        let mine: Vec<_> = results.by_ref().take(sinks.len()).collect();
        let _ = reply.send(mine);
    }
}

fn repair(items: &[(Arc<str>, SinkConfig, TokenState)], placements: &Placements) -> Vec<Repaired> {
    let now = crate::clock::now_secs();
    let stale: Vec<&(Arc<str>, SinkConfig, TokenState)> = items
        .iter()
        .filter(|(_, sink, state)| state.expires_at.is_none_or(|t| t > now) && !is_current(sink, state))
        .collect();
    let batch: Vec<(&SinkConfig, &TokenState)> = stale.iter().map(|(_, sink, state)| (sink, state)).collect();
    stale
        .iter()
        .zip(write_many(&batch, placements))
        .map(|((credential, sink, _), result)| Repaired {
            credential: credential.clone(),
            path: sink.path.clone(),
            result,
        })
        .collect()
}

/// Writes every sink of `credential` now, in the calling thread (`tokend import`, `authorize`,
/// a rescued commit); a failing sink is logged and does not stop the others. A sink directory
/// that does not exist yet (`/run/tokend` before the service first ran) is mentioned, not an
/// error: the daemon writes every sink when it starts.
pub fn write_all(credential: &Credential, state: &TokenState) {
    for s in &credential.sinks {
        if let Some(dir) = s.path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            tracing::info!(credential = %credential.name, sink = %s.path.display(), "sink not written: {} does not exist (yet); the daemon writes every sink when it starts", dir.display());
            continue;
        }
        if let Err(e) = write(s, state) {
            tracing::error!(credential = %credential.name, "{e}");
        }
    }
}

/// The file tokend last placed at each sink path, by the path's hash: its inode, modification
/// time and size, taken from the temp file just before it was renamed into place. The file watch reports
/// tokend's own renames like anyone else's; a path whose entry is still that inode — unmodified,
/// one link, tokend's owner, the sink's group and mode — holds what tokend wrote, and the event
/// needs no store read and no file read. Anything else (another inode, a link, a FIFO, a file
/// changed in place or re-moded) is checked in full. About 40 bytes per sink written.
#[derive(Clone, Default)]
pub struct Placements(Arc<std::sync::Mutex<rustc_hash::FxHashMap<u64, FileIdentity>>>);

/// Inode, modification time (ns), size.
type FileIdentity = (u64, i64, u64);

impl Placements {
    fn key(path: &Path) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = rustc_hash::FxHasher::default();
        path.hash(&mut hasher);
        hasher.finish()
    }

    fn identity(meta: &std::fs::Metadata) -> FileIdentity {
        (meta.ino(), meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()), meta.size())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, rustc_hash::FxHashMap<u64, FileIdentity>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, path: &Path, meta: &std::fs::Metadata) {
        self.map().insert(Self::key(path), Self::identity(meta));
    }

    /// One `lstat` of the path: never follows a link, never opens the file.
    pub fn holds_placed(&self, sink: &SinkConfig) -> bool {
        let Ok(meta) = std::fs::symlink_metadata(&sink.path) else { return false };
        meta.file_type().is_file()
            && as_tokend_writes_it(&meta, sink)
            && self.map().get(&Self::key(&sink.path)) == Some(&Self::identity(&meta))
    }
}

/// Removes every sink file of `credential` (token expired, credential dropped or forgotten),
/// logging each with `why`. Returns the paths removed and the sinks that could not be.
pub fn remove_all(credential: &Credential, why: &str) -> (Vec<PathBuf>, Vec<SinkError>) {
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    for s in &credential.sinks {
        match remove(s) {
            Ok(true) => {
                tracing::info!(credential = %credential.name, sink = %s.path.display(), "sink removed: {why}");
                removed.push(s.path.clone());
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(credential = %credential.name, "{e}");
                failed.push(e);
            }
        }
    }
    (removed, failed)
}

/// Whether the sink already holds exactly what [`write`] would put there — content, mode, owner,
/// group, one link — so that a watcher can tell our own writes from someone else's changes. The
/// file is read as [`crate::untrusted`] says: a FIFO or a link to `/dev/zero` is "not current",
/// never a hang or a huge read.
pub fn is_current(sink: &SinkConfig, state: &TokenState) -> bool {
    let Ok(want) = render(sink.format, state) else { return false };
    let Ok(Found::Regular { meta, bytes }) = untrusted::read_regular(&sink.path, want.len()) else { return false };
    as_tokend_writes_it(&meta, sink) && bytes == want
}

/// Owner, group, mode and link count as [`write`] leaves a sink file.
fn as_tokend_writes_it(meta: &std::fs::Metadata, sink: &SinkConfig) -> bool {
    meta.uid() == nix::unistd::geteuid().as_raw()
        && meta.gid() == target_gid(sink.group.as_ref().map(|g| g.1))
        && meta.nlink() == 1
        && meta.permissions().mode() & 0o7777 == sink.mode
}

/// The group a sink file is given: the configured one, else tokend's own (set explicitly: in a
/// set-group-ID directory the file would otherwise take the directory's group).
fn target_gid(configured: Option<u32>) -> u32 {
    configured.unwrap_or_else(|| nix::unistd::getegid().as_raw())
}

/// Removes a sink file (token expired, credential removed). A missing file is fine; a symlink is
/// removed itself, never its target.
pub fn remove(sink: &SinkConfig) -> Result<bool, SinkError> {
    match std::fs::remove_file(&sink.path) {
        Ok(()) => {
            sync_dir(&parent_dir(&sink.path)).map_err(|m| sink_error(&sink.path, m))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(sink_error(&sink.path, format!("cannot remove: {e}"))),
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

const TEMP_MARK: &str = ".tokend-";

/// A fresh name next to `path` (same directory, so the rename is atomic), hidden from globs.
fn temp_path(path: &Path) -> Result<PathBuf, SinkError> {
    let file_name = path.file_name().ok_or_else(|| sink_error(path, "does not name a file"))?;
    Ok(parent_dir(path).join(format!(".{}{TEMP_MARK}{:08x}", file_name.to_string_lossy(), rand::random::<u32>())))
}

/// Whether `path` is one of our temp files, whose comings and goings a watcher can ignore.
pub fn is_temp_file(path: &Path) -> bool {
    path.file_name().map(|n| n.to_string_lossy()).is_some_and(|n| n.starts_with('.') && n.contains(TEMP_MARK))
}

/// Renames `tmp` over `target`. Something tokend did not write there (a symlink, a FIFO, a file
/// with other links) is replaced all the same — `rename` swaps the directory entry and follows
/// nothing — and reported, because someone with write access to the directory put it there.
fn rename_into_place(tmp: &Path, target: &Path) -> Result<(), String> {
    let planted = match std::fs::symlink_metadata(target) {
        Ok(meta) if !meta.file_type().is_file() || meta.nlink() > 1 => Some(untrusted::kind_of(&meta)),
        Ok(meta) if meta.uid() != nix::unistd::geteuid().as_raw() => Some("a file owned by another user"),
        _ => None,
    };
    std::fs::rename(tmp, target).map_err(|e| format!("cannot rename into place: {e}"))?;
    if let Some(what) = planted {
        REPLACED.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(sink = %target.display(), "replaced {what} that someone else put at the sink path");
    }
    Ok(())
}

fn write_new_file(tmp: &Path, bytes: &[u8], mode: u32, gid: Option<u32>) -> Result<(), String> {
    let file = create_temp(tmp, bytes, mode, gid)?;
    file.sync_all().map_err(|e| format!("cannot fsync: {e}"))
}

/// Creates `tmp` exclusively (never through a link) with `bytes`, `mode` and group; not synced.
/// On any failure the temp file is removed again.
fn create_temp(tmp: &Path, bytes: &[u8], mode: u32, gid: Option<u32>) -> Result<File, String> {
    let mut file: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(untrusted::HOSTILE_OPEN_FLAGS)
        .open(tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let filled = fill_temp(&mut file, bytes, mode, gid);
    if filled.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    filled.map(|()| file)
}

fn fill_temp(file: &mut File, bytes: &[u8], mode: u32, gid: Option<u32>) -> Result<(), String> {
    let gid = target_gid(gid);
    // Changed only where they differ: each change is a metadata write the journal carries, and
    // a catch-up writes thousands of files.
    let created = file.metadata().map_err(|e| format!("cannot stat the new file: {e}"))?;
    if created.gid() != gid {
        nix::unistd::fchown(&*file, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| format!("cannot give the file to group {gid}: {e}"))?;
    }
    // The umask may have taken bits away from `mode`; set it exactly (after chown, which may
    // clear set-id bits).
    if created.gid() != gid || created.permissions().mode() & 0o7777 != mode {
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot set mode {mode:04o}: {e}"))?;
    }
    file.write_all(bytes).map_err(|e| format!("cannot write: {e}"))
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("cannot fsync directory {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::Secret;
    use crate::store::Status;

    fn state() -> TokenState {
        TokenState {
            name: "my-nation".into(),
            provider: "nationbuilder".into(),
            access_token: Secret::new("AT$1"),
            refresh_token: None,
            token_type: "Bearer".into(),
            scope: Some("default".into()),
            expires_in: Some(86400),
            created_at: 1_632_773_996,
            expires_at: Some(1_632_860_396),
            generation: 7,
            status: Status::Active,
            last_error: None,
            last_refresh_at: None,
            attempts_in_flight: 0,
            extra: None,
            refresh_token_expires_at: None,
            refresh_token_issued_at: None,
            dead_since: None,
        }
    }

    #[test]
    fn extras_reach_json_and_env_sinks() {
        let wild = TokenState {
            provider: "wildapricot".into(),
            extra: Some(r#"{"permissions":[{"accountId":123,"availableScopes":["contacts_view"]}]}"#.into()),
            ..state()
        };
        let env = String::from_utf8(render(SinkFormat::Env, &wild).unwrap()).unwrap();
        assert!(env.ends_with("TOKEND_MY_NATION_ACCOUNT_IDS='123'\nTOKEND_MY_NATION_ACCOUNT_ID='123'\n"), "{env}");
        let json: serde_json::Value = serde_json::from_slice(&render(SinkFormat::Json, &wild).unwrap()).unwrap();
        assert_eq!(json["extra"]["permissions"][0]["accountId"], 123);
        let generic = TokenState {
            provider: "oauth2".into(),
            extra: Some(r#"{"org-id":"o1","quote":"it's","list":[1]}"#.into()),
            ..state()
        };
        let env = String::from_utf8(render(SinkFormat::Env, &generic).unwrap()).unwrap();
        assert!(env.ends_with("EXPIRES_AT='2021-09-28T20:19:56Z'\nTOKEND_MY_NATION_ORG_ID='o1'\n"), "{env}");
    }

    #[test]
    fn formats() {
        assert_eq!(render(SinkFormat::Raw, &state()).unwrap(), b"AT$1");
        let env = String::from_utf8(render(SinkFormat::Env, &state()).unwrap()).unwrap();
        assert_eq!(env, "TOKEND_MY_NATION_ACCESS_TOKEN='AT$1'\nTOKEND_MY_NATION_EXPIRES_AT='2021-09-28T20:19:56Z'\n");
        let json: serde_json::Value = serde_json::from_slice(&render(SinkFormat::Json, &state()).unwrap()).unwrap();
        assert_eq!(json["access_token"], "AT$1");
        assert_eq!(json["expires_at"], "2021-09-28T20:19:56Z");
        assert_eq!(json["generation"], 7);
        assert_eq!(json["token_type"], "Bearer");
        assert!(json.get("extra").is_none());
        assert_eq!(json["scope"], "default");
    }

    #[test]
    fn write_many_keeps_each_result_with_its_file_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let count = WRITE_MANY_OPEN_FILES * 2 + 3;
        let refused = WRITE_MANY_OPEN_FILES + 7;
        let mut sinks: Vec<SinkConfig> = (0..count)
            .map(|i| SinkConfig {
                path: dir.path().join(format!("t{i}")),
                format: SinkFormat::Raw,
                mode: 0o600,
                group: None,
            })
            .collect();
        // A sink whose file cannot be placed: its path names a file inside a missing directory.
        sinks[refused].path = dir.path().join("missing").join("t");
        let states: Vec<TokenState> =
            (0..count).map(|i| TokenState { access_token: Secret::new(format!("AT{i}")), ..state() }).collect();
        let items: Vec<(&SinkConfig, &TokenState)> = sinks.iter().zip(&states).collect();
        let results = write_many(&items, &Placements::default());
        assert_eq!(results.len(), count);
        for (i, result) in results.iter().enumerate() {
            if i == refused {
                assert!(result.as_ref().unwrap_err().to_string().contains("cannot create"), "{result:?}");
            } else {
                assert!(result.is_ok(), "{i}: {result:?}");
                assert_eq!(std::fs::read_to_string(&sinks[i].path).unwrap(), format!("AT{i}"));
            }
        }
        let leftovers = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".tokend-"));
        assert_eq!(leftovers.count(), 0, "no temp file left behind");
    }

    #[test]
    fn writes_atomically_with_mode_and_replaces_planted_entries_without_following_them() {
        let dir = tempfile::tempdir().unwrap();
        let sink = SinkConfig { path: dir.path().join("t"), format: SinkFormat::Raw, mode: 0o640, group: None };
        write(&sink, &state()).unwrap();
        assert_eq!(std::fs::read(&sink.path).unwrap(), b"AT$1");
        assert_eq!(std::fs::metadata(&sink.path).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left behind");
        assert!(is_current(&sink, &state()));

        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let before = replaced_total();
        let link = SinkConfig { path: dir.path().join("l"), format: SinkFormat::Raw, mode: 0o600, group: None };
        std::os::unix::fs::symlink(&victim, &link.path).unwrap();
        assert!(!is_current(&link, &state()));
        write(&link, &state()).unwrap();
        assert!(std::fs::symlink_metadata(&link.path).unwrap().file_type().is_file(), "the link itself is gone");
        assert_eq!(std::fs::read(&link.path).unwrap(), b"AT$1");

        let hard = SinkConfig { path: dir.path().join("h"), format: SinkFormat::Raw, mode: 0o600, group: None };
        std::fs::hard_link(&victim, &hard.path).unwrap();
        assert!(!is_current(&hard, &state()), "a file with two links is not ours alone");
        write(&hard, &state()).unwrap();
        assert_eq!(std::fs::read(&hard.path).unwrap(), b"AT$1");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep", "nothing written through either");
        assert_eq!(replaced_total() - before, 2);
    }

    #[test]
    fn only_the_file_the_writer_placed_counts_as_placed() {
        let dir = tempfile::tempdir().unwrap();
        let sink = SinkConfig { path: dir.path().join("t"), format: SinkFormat::Raw, mode: 0o600, group: None };
        let placements = Placements::default();
        assert!(!placements.holds_placed(&sink), "nothing placed yet");
        write_many(&[(&sink, &state())], &placements)[0].as_ref().unwrap();
        assert!(placements.holds_placed(&sink));

        // Someone else's file renamed over it: same content, mode and owner, another inode.
        let planted = dir.path().join("planted");
        std::fs::write(&planted, b"AT$1").unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&planted, &sink.path).unwrap();
        assert!(!placements.holds_placed(&sink), "a replaced file");

        write_many(&[(&sink, &state())], &placements)[0].as_ref().unwrap();
        std::fs::set_permissions(&sink.path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(!placements.holds_placed(&sink), "a re-moded file");

        write_many(&[(&sink, &state())], &placements)[0].as_ref().unwrap();
        std::fs::hard_link(&sink.path, dir.path().join("second")).unwrap();
        assert!(!placements.holds_placed(&sink), "a file with a second link");

        write_many(&[(&sink, &state())], &placements)[0].as_ref().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new().append(true).open(&sink.path).unwrap().write_all(b"x").unwrap();
        assert!(!placements.holds_placed(&sink), "a file changed in place");

        write_many(&[(&sink, &state())], &placements)[0].as_ref().unwrap();
        std::fs::remove_file(&sink.path).unwrap();
        std::os::unix::fs::symlink(dir.path().join("second"), &sink.path).unwrap();
        assert!(!placements.holds_placed(&sink), "a link");
    }
}
