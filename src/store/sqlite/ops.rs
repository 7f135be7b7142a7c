//! The refresh path's operations, each written once: [`super::Store`]'s methods run them in a
//! transaction of their own, [`crate::committer::Committer`] in a group commit. Steps 1–2
//! (`begin`: lease and attempt), 4 (`commit`: the rotation), the failure record, the
//! cancellation of an attempt that sent nothing, the lease release, and the read.

use super::{STATE_BY_NAME, seal_error, sealed, state_from_row};
use crate::redact::fingerprint;
use crate::seal::{Column, Sealer};
use crate::store::{Begin, LeaseHolder, NewToken, TokenState};
use rusqlite::{Connection, OptionalExtension, params};
use std::time::Duration;

pub(crate) fn get(c: &Connection, sealer: &Sealer, name: &str) -> rusqlite::Result<Option<TokenState>> {
    c.prepare_cached(STATE_BY_NAME)?.query_row([name], |r| state_from_row(r, sealer)).optional()
}

pub(crate) fn begin(
    c: &Connection,
    sealer: &Sealer,
    name: &str,
    holder: &LeaseHolder,
    lease_ttl: Duration,
    now_ms: i64,
) -> rusqlite::Result<Begin> {
    // Opening the stored tokens comes first: a wrong key fails here, before a lease, an attempt
    // or a request exists.
    let state = get(c, sealer, name)?;
    let current: Option<(String, u32, i64)> = c
        .prepare_cached("SELECT holder, pid, deadline_ms FROM lease WHERE credential = ?1")?
        .query_row([name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if let Some((other, pid, deadline_ms)) = current {
        let ours = other == holder.id;
        if !ours && deadline_ms > now_ms && process_alive(pid) {
            return Ok(Begin::Busy { pid, lease_left_ms: deadline_ms - now_ms });
        }
        if !ours {
            tracing::warn!(
                credential = name,
                stale_pid = pid,
                "reclaiming a stale lease (holder gone or past its deadline)"
            );
        }
    }
    let deadline = now_ms.saturating_add(i64::try_from(lease_ttl.as_millis()).unwrap_or(i64::MAX));
    c.prepare_cached("INSERT INTO lease (credential, holder, pid, deadline_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (credential) DO UPDATE SET holder = excluded.holder, pid = excluded.pid, deadline_ms = excluded.deadline_ms")?.execute(
        params![name, holder.id, holder.pid, deadline],
    )?;
    c.prepare_cached("INSERT INTO attempt (credential, from_generation, spent_fp, holder, started_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)")?.execute(
        params![
            name,
            state.as_ref().map_or(0, |s| s.generation),
            state.as_ref().and_then(|s| s.refresh_token.as_ref()).map(|t| fingerprint(t.expose())),
            holder.id,
            now_ms
        ],
    )?;
    Ok(Begin::Leased { state, attempt_id: c.last_insert_rowid() })
}

#[allow(clippy::too_many_arguments, reason = "the trait method's six, plus the connection and its sealer")]
pub(crate) fn commit(
    c: &Connection,
    sealer: &Sealer,
    name: &str,
    provider: &str,
    attempt_id: i64,
    from_generation: i64,
    token: &NewToken,
    now_ms: i64,
) -> rusqlite::Result<Option<TokenState>> {
    // No generation predicate: the provider has already rotated, so this answer is the only valid
    // token there is and must be stored whatever happened meanwhile.
    let stored: Option<(i64, Option<String>)> = c
        .prepare_cached("SELECT generation, refresh_token FROM credential WHERE name = ?1")?
        .query_row([name], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let previous = stored.as_ref().map(|(g, _)| *g);
    let generation = previous.unwrap_or(from_generation) + 1;
    let mut values = sealed(sealer, name, generation, token)?;
    if token.refresh_token.is_none()
        && let Some((g, Some(kept))) = &stored
    {
        // The refresh token kept (the answer had none) is bound to the old generation: sealed
        // again for the new one, in this same transaction.
        let kept = sealer.open(name, Column::RefreshToken, *g, kept).map_err(seal_error)?;
        values.1 = Some(sealer.seal(name, Column::RefreshToken, generation, kept.expose()).map_err(seal_error)?);
    }
    let now_secs = now_ms.div_euclid(1000);
    let changed = c
        .prepare_cached(
            "UPDATE credential SET access_token = ?2, refresh_token = COALESCE(?3, refresh_token), token_type = ?4,
             scope = COALESCE(?5, scope), expires_in = ?6, created_at = ?7, expires_at = ?8,
             generation = generation + 1, status = 'active', last_error = NULL, last_refresh_at = ?11, updated_at = ?11,
             extra = COALESCE(?9, extra),
             refresh_token_expires_at = CASE WHEN ?12 THEN ?10 ELSE COALESCE(?10, refresh_token_expires_at) END,
             refresh_token_issued_at = CASE WHEN ?12 THEN ?7 ELSE refresh_token_issued_at END,
             dead_since = NULL
         WHERE name = ?1",
        )?
        // ?12: the answer carried a refresh token of its own (`?3` may hold the kept one, sealed
        // again for the new generation).
        .execute(token_params!(name, token, values, now_secs, token.refresh_token.is_some()))?;
    if changed == 0 {
        // First token of an API-key credential, or removed while we were refreshing: create the
        // row, the new token must not be lost.
        c.prepare_cached(
            "INSERT INTO credential (name, provider, access_token, refresh_token, token_type, scope, expires_in,
                 created_at, expires_at, generation, status, last_refresh_at, updated_at,
                 extra, refresh_token_expires_at, refresh_token_issued_at)
             VALUES (?1, ?13, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?11, 'active', ?12, ?12,
                 ?9, ?10, CASE WHEN ?3 IS NULL THEN NULL ELSE ?7 END)",
        )?
        .execute(token_params!(name, token, values, generation, now_secs, provider))?;
    }
    c.prepare_cached("UPDATE attempt SET finished_at_ms = ?2, result = 'refreshed' WHERE id = ?1")?
        .execute(params![attempt_id, now_ms])?;
    if previous.is_some_and(|g| g != from_generation) {
        tracing::warn!(credential = name, expected = from_generation, found = ?previous, "credential changed during a leased refresh");
    }
    get(c, sealer, name)
}

pub(crate) fn failure(
    c: &Connection,
    name: &str,
    attempt_id: i64,
    reason: &str,
    needs_reauth: bool,
    now_ms: i64,
) -> rusqlite::Result<()> {
    c.prepare_cached(
        "UPDATE credential SET last_error = ?2, updated_at = ?3,
             status = CASE WHEN ?4 THEN 'needs_reauth' ELSE status END,
             dead_since = CASE WHEN ?4 THEN COALESCE(dead_since, ?3) ELSE dead_since END
         WHERE name = ?1",
    )?
    .execute(params![name, reason, now_ms.div_euclid(1000), needs_reauth])?;
    c.prepare_cached("UPDATE attempt SET finished_at_ms = ?2, result = ?3 WHERE id = ?1")?.execute(params![
        attempt_id,
        now_ms,
        if needs_reauth { "needs_reauth" } else { "failed" }
    ])?;
    Ok(())
}

pub(crate) fn cancel(c: &Connection, attempt_id: i64, why: &str, now_ms: i64) -> rusqlite::Result<()> {
    c.prepare_cached("UPDATE attempt SET finished_at_ms = ?2, result = ?3 WHERE id = ?1")?
        .execute(params![attempt_id, now_ms, why])
        .map(|_| ())
}

pub(crate) fn release(c: &Connection, name: &str, holder: &LeaseHolder) -> rusqlite::Result<()> {
    c.prepare_cached("DELETE FROM lease WHERE credential = ?1 AND holder = ?2")?
        .execute(params![name, holder.id])
        .map(|_| ())
}

/// The pid is the part of a holder id before the first '-'.
pub(super) fn holder_alive(holder: &str) -> bool {
    holder.split('-').next().and_then(|p| p.parse().ok()).is_some_and(process_alive)
}

/// Whether a process with this pid exists. A process owned by another user (EPERM) counts as
/// alive: we must not steal a lease from a live refresher we merely cannot signal.
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // Signal "none" sends nothing; it only checks that the pid exists.
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}
