//! The PostgreSQL store's SQL, one async function per operation (READ COMMITTED; every decision
//! that two nodes could race on is a row lock or a compare-and-set, never a read followed by a
//! blind write). The refresh path's operations (`begin`, `commit`, `failure`, `cancel`,
//! `release`) run inside a group commit's transaction, each in a savepoint of its own
//! (`batch.rs`), with statements prepared once per connection ([`Db`]); the others open their
//! own transaction.

use super::node_identity;
use crate::redact::fingerprint;
use crate::store::{Begin, LeaseHolder, Lifetime, NewToken, OpenAttempt, Status, TokenState};
use std::collections::HashMap;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Error, Row, Statement};

/// Statements prepared on one connection, by their SQL; emptied when the connection is replaced.
pub type Statements = HashMap<&'static str, Statement>;

/// A connection inside a group commit's transaction, with the refresh path's statements
/// prepared once (one round trip per statement afterwards instead of two).
pub struct Db<'c> {
    pub client: &'c Client,
    pub statements: &'c mut Statements,
}

/// A store thread's connection with its prepared statements, for an operation of its own.
pub struct Conn<'c> {
    pub client: &'c mut Client,
    pub statements: &'c mut Statements,
}

impl<'c> Conn<'c> {
    pub fn db(self) -> Db<'c> {
        Db { client: self.client, statements: self.statements }
    }
}

impl Db<'_> {
    async fn prepared(&mut self, sql: &'static str) -> Result<Statement, Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    async fn query_opt(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, Error> {
        let statement = self.prepared(sql).await?;
        self.client.query_opt(&statement, params).await
    }

    async fn query_one(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, Error> {
        let statement = self.prepared(sql).await?;
        self.client.query_one(&statement, params).await
    }

    async fn query(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error> {
        let statement = self.prepared(sql).await?;
        self.client.query(&statement, params).await
    }

    async fn execute(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error> {
        let statement = self.prepared(sql).await?;
        self.client.execute(&statement, params).await
    }
}

// Lease writes and advisory locks: every write of a lease row holds the advisory lock
// `(1953459045, hashtext(name))` ("toke" in ASCII, in the two-key space, which never overlaps
// the one-key space other applications tend to use) until its batch commits. A `begin` that
// cannot take it at once is busy (a hash collision costs a look again, nothing more), so inside
// a batch's transaction a `begin` never waits for another node's batch, and the nodes' batches
// cannot deadlock on leases. A `release` waits for it (a `begin` holds it only for its batch).

const LEASE_OF: &str =
    "SELECT holder, node, pid, deadline > now(), (extract(epoch FROM deadline - now()) * 1000)::bigint
     FROM tokend_lease WHERE credential = $1 FOR UPDATE SKIP LOCKED";
const LEASE_TAKE_OVER: &str =
    "UPDATE tokend_lease SET holder = $2, node = $3, pid = $4, deadline = now() + make_interval(secs => $5)
     WHERE credential = $1 AND pg_try_advisory_xact_lock(1953459045, hashtext($1))";
const LEASE_TAKE: &str = "INSERT INTO tokend_lease (credential, holder, node, pid, deadline)
     SELECT $1, $2, $3, $4, now() + make_interval(secs => $5) WHERE pg_try_advisory_xact_lock(1953459045, hashtext($1))
     ON CONFLICT (credential) DO NOTHING";
const LEASE_RELEASE: &str = "DELETE FROM tokend_lease WHERE credential = $1 AND holder = $2
     AND pg_advisory_xact_lock(1953459045, hashtext($1)) IS NOT NULL";
const ATTEMPT_OPEN: &str =
    "INSERT INTO tokend_attempt (credential, from_generation, spent_fp, holder, node, backend_pid, started_at_ms)
     VALUES ($1, $2, $3, $4, $5, coalesce(nullif($7, 0), pg_backend_pid()), $6) RETURNING id";
/// See [`probed_rival`]; this process's own attempts (its listener's session) are no rivals.
/// Both sub-queries refer to the open attempt `r` found through the partial index of open
/// attempts, so they run only when there is one: as a filter of its own, the search for a
/// deferred rejection would scan every attempt ever recorded at every `begin`.
const PROBED_RIVAL: &str = "SELECT r.holder FROM tokend_attempt r
     WHERE r.credential = $1 AND r.finished_at_ms IS NULL AND r.from_generation = $2
       AND r.backend_pid <> coalesce(nullif($3, 0), pg_backend_pid())
       AND EXISTS (SELECT 1 FROM pg_stat_activity s WHERE s.pid = r.backend_pid)
       AND EXISTS (SELECT 1 FROM tokend_attempt d
                   WHERE d.credential = r.credential AND d.from_generation = r.from_generation
                     AND d.result = 'rejected, deferred')
     LIMIT 1";
const ATTEMPT_CANCEL: &str =
    "UPDATE tokend_attempt SET finished_at_ms = $2, result = $3 WHERE id = $1 AND finished_at_ms IS NULL";

/// The notification channel of every commit: the payload is `<generation> <name>`.
pub const COMMIT_CHANNEL: &str = "tokend_commit";

macro_rules! state_columns {
    () => {
        "name, provider, access_token, refresh_token, token_type, scope, expires_in, created_at, \
         expires_at, generation, status, last_error, last_refresh_at, \
         (SELECT count(*) FROM tokend_attempt a WHERE a.credential = c.name AND a.finished_at_ms IS NULL), \
         extra, refresh_token_expires_at, refresh_token_issued_at, dead_since"
    };
}
const STATE_BY_NAME: &str = concat!("SELECT ", state_columns!(), " FROM tokend_credential c WHERE name = $1");
const STATE_ALL: &str = concat!("SELECT ", state_columns!(), " FROM tokend_credential c ORDER BY name");
const STATE_OF_NAMES: &str = concat!("SELECT ", state_columns!(), " FROM tokend_credential c WHERE name = ANY($1)");

fn status_from_text(text: &str) -> Status {
    match text {
        "needs_reauth" => Status::NeedsReauth,
        "revoked" => Status::Revoked,
        _ => Status::Active,
    }
}

fn state_from_row(r: &Row) -> Result<TokenState, Error> {
    Ok(TokenState {
        name: r.try_get(0)?,
        provider: r.try_get(1)?,
        access_token: crate::redact::Secret::new(r.try_get::<_, String>(2)?),
        refresh_token: r.try_get::<_, Option<String>>(3)?.map(crate::redact::Secret::new),
        token_type: r.try_get(4)?,
        scope: r.try_get(5)?,
        expires_in: r.try_get(6)?,
        created_at: r.try_get(7)?,
        expires_at: r.try_get(8)?,
        generation: r.try_get(9)?,
        status: status_from_text(r.try_get(10)?),
        last_error: r.try_get(11)?,
        last_refresh_at: r.try_get(12)?,
        attempts_in_flight: r.try_get(13)?,
        extra: r.try_get(14)?,
        refresh_token_expires_at: r.try_get(15)?,
        refresh_token_issued_at: r.try_get(16)?,
        dead_since: r.try_get(17)?,
    })
}

pub async fn get(mut db: Db<'_>, name: &str) -> Result<Option<TokenState>, Error> {
    db.query_opt(STATE_BY_NAME, &[&name]).await?.as_ref().map(state_from_row).transpose()
}

/// The stored states of `names` (those that exist), in one round trip.
pub async fn get_many(mut db: Db<'_>, names: &[String]) -> Result<Vec<TokenState>, Error> {
    db.query(STATE_OF_NAMES, &[&names]).await?.iter().map(state_from_row).collect()
}

pub async fn list(c: &Client) -> Result<Vec<TokenState>, Error> {
    c.query(STATE_ALL, &[]).await?.iter().map(state_from_row).collect()
}

pub async fn list_lifetimes(c: &Client) -> Result<Vec<(String, Lifetime)>, Error> {
    let rows = c
        .query(
            "SELECT name, created_at, expires_at, generation, status, last_refresh_at, refresh_token_expires_at,
                 refresh_token_issued_at, dead_since FROM tokend_credential",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                Lifetime {
                    created_at: r.try_get(1)?,
                    expires: r.try_get::<_, Option<i64>>(2)?.into(),
                    generation: r.try_get(3)?,
                    status: status_from_text(r.try_get(4)?),
                    last_refresh_at: r.try_get::<_, Option<i64>>(5)?.into(),
                    refresh_token_expires_at: r.try_get::<_, Option<i64>>(6)?.into(),
                    refresh_token_issued_at: r.try_get::<_, Option<i64>>(7)?.into(),
                    dead_since: r.try_get::<_, Option<i64>>(8)?.into(),
                },
            ))
        })
        .collect()
}

fn millis(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// Steps 1 and 2, in the caller's transaction (a group commit's savepoint). The lease's deadline
/// is the server's `now()` plus the lease's length, and a lease is taken over only when the
/// server's clock says it is past, or its holder is a process of this very node that no longer
/// exists. Returns whether to keep what it did: a busy lease keeps nothing, not even the row
/// locks it took (the caller rolls back to its savepoint).
pub async fn begin(
    db: &mut Db<'_>,
    name: &str,
    holder: &LeaseHolder,
    lease_ttl: std::time::Duration,
    now_ms: i64,
    planned: Option<i64>,
) -> Result<(Begin, bool), Error> {
    let node = node_identity();
    let pid = i32::try_from(holder.pid).unwrap_or(i32::MAX);
    let ttl = millis(lease_ttl);
    // SKIP LOCKED: a lease row another node is taking right now is busy, not waited for.
    let current = db.query_opt(LEASE_OF, &[&name]).await?;
    let mut reclaimed = None;
    match current {
        Some(row) => {
            let (other, other_node, other_pid, live, lease_left_ms): (String, String, i32, bool, i64) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?, row.try_get(4)?);
            let ours = other == holder.id;
            let dead_here = other_node == node && !super::pid_alive(other_pid.unsigned_abs());
            if !ours && live && !dead_here {
                return Ok((Begin::Busy { pid: other_pid.unsigned_abs(), lease_left_ms }, false));
            }
            let taken = db.execute(LEASE_TAKE_OVER, &[&name, &holder.id, &node, &pid, &ttl]).await?;
            if taken == 0 {
                return Ok((Begin::Busy { pid: other_pid.unsigned_abs(), lease_left_ms }, false));
            }
            if !ours {
                reclaimed = Some((other, other_node));
            }
        }
        None => {
            let taken = db.execute(LEASE_TAKE, &[&name, &holder.id, &node, &pid, &ttl]).await?;
            if taken == 0 {
                // Another node holds the row locked this very moment: busy, look again soon.
                return Ok((Begin::Busy { pid: 0, lease_left_ms: 0 }, false));
            }
        }
    }
    let state = db.query_opt(STATE_BY_NAME, &[&name]).await?.as_ref().map(state_from_row).transpose()?;
    let generation = state.as_ref().map_or(0, |s| s.generation);
    if let Some(state) = state.as_ref().filter(|s| planned.is_some_and(|p| p != s.generation)) {
        // `false`: the savepoint is rolled back, the lease just written with it.
        return Ok((Begin::MovedOn(state.clone()), false));
    }
    if let Some((other, other_node)) = reclaimed {
        tracing::warn!(credential = name, stale_holder = %other, stale_node = %other_node, "reclaiming a stale lease (holder gone or past its deadline on the database's clock)");
    }
    if let Some(rival) = probed_rival(db, name, generation).await? {
        tracing::debug!(credential = name, rival_holder = %rival, "not sending: the grant was already probed while this holder's attempt is unresolved");
        return Ok((Begin::Busy { pid: 0, lease_left_ms: PROBED_RIVAL_RECHECK_MS }, false));
    }
    let spent = state.as_ref().and_then(|s| s.refresh_token.as_ref()).map(|t| fingerprint(t.expose()));
    let listener = super::LISTENER_BACKEND.load(std::sync::atomic::Ordering::SeqCst);
    let attempt_id: i64 = db
        .query_one(ATTEMPT_OPEN, &[&name, &generation, &spent, &holder.id, &node, &now_ms, &listener])
        .await?
        .try_get(0)?;
    Ok((Begin::Leased { state, attempt_id }, true))
}

/// What the fenced rotation commit found.
#[allow(clippy::large_enum_variant, reason = "built once per commit and consumed at once; boxing buys nothing")]
pub enum Committed {
    Stored(TokenState),
    /// The generation had moved on from the one spent: the answer was kept in `tokend_rescue`
    /// (id `rescue_id`), the stored token left alone.
    Superseded {
        found: i64,
        rescue_id: i64,
    },
}

/// Step 4's common case in one statement (one round trip): the fenced update, the attempt
/// closed, the notification queued (sent when the transaction commits), the new state returned
/// in `state_from_row`'s columns. No row: the fence did not match (or there is no row yet).
const COMMIT_FENCED: &str = "WITH updated AS (
     UPDATE tokend_credential SET access_token = $2, refresh_token = COALESCE($3, refresh_token), token_type = $4,
         scope = COALESCE($5, scope), expires_in = $6, created_at = $7, expires_at = $8,
         generation = generation + 1, status = 'active', last_error = NULL, last_refresh_at = $9, updated_at = $9,
         extra = COALESCE($11, extra),
         refresh_token_expires_at = CASE WHEN $3::text IS NULL THEN COALESCE($12::bigint, refresh_token_expires_at) ELSE $12::bigint END,
         refresh_token_issued_at = CASE WHEN $3::text IS NULL THEN refresh_token_issued_at ELSE $7::bigint END,
         dead_since = NULL
     WHERE name = $1 AND generation = $10
     RETURNING name, provider, access_token, refresh_token, token_type, scope, expires_in, created_at, expires_at,
         generation, status, last_error, last_refresh_at, extra, refresh_token_expires_at, refresh_token_issued_at,
         dead_since),
   closed AS (
     UPDATE tokend_attempt SET finished_at_ms = $14, result = 'refreshed' WHERE id = $13 AND EXISTS (SELECT 1 FROM updated))
 SELECT u.name, u.provider, u.access_token, u.refresh_token, u.token_type, u.scope, u.expires_in, u.created_at,
     u.expires_at, u.generation, u.status, u.last_error, u.last_refresh_at,
     (SELECT count(*) FROM tokend_attempt a WHERE a.credential = u.name AND a.finished_at_ms IS NULL AND a.id <> $13),
     u.extra, u.refresh_token_expires_at, u.refresh_token_issued_at, u.dead_since,
     pg_notify('tokend_commit', u.generation || ' ' || u.name)::text
 FROM updated u";

/// Step 4, fenced: the new token lands only on the generation that was spent. Runs in the
/// caller's transaction (a group commit's savepoint).
pub async fn commit(
    db: &mut Db<'_>,
    name: &str,
    provider: &str,
    attempt_id: i64,
    from_generation: i64,
    token: &NewToken,
    now_ms: i64,
) -> Result<Committed, Error> {
    let now_secs = now_ms.div_euclid(1000);
    let refresh = token.refresh_token.as_ref().map(crate::redact::Secret::expose);
    let expires_at = token.expires_at();
    let stored = db
        .query_opt(
            COMMIT_FENCED,
            &[
                &name,
                &token.access_token.expose(),
                &refresh,
                &token.token_type,
                &token.scope,
                &token.expires_in,
                &token.created_at,
                &expires_at,
                &now_secs,
                &from_generation,
                &token.extra,
                &token.refresh_token_expires_at,
                &attempt_id,
                &now_ms,
            ],
        )
        .await?;
    if let Some(row) = stored {
        return Ok(Committed::Stored(state_from_row(&row)?));
    }
    let c = db.client;
    let mut changed = 0;
    if from_generation == 0 {
        // The first token of an API-key credential: nobody else may have created the row.
        changed = c
            .execute(
                "INSERT INTO tokend_credential (name, provider, access_token, refresh_token, token_type, scope, expires_in,
                     created_at, expires_at, generation, status, last_refresh_at, updated_at,
                     extra, refresh_token_expires_at, refresh_token_issued_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, 'active', $10, $10,
                     $11, $12, CASE WHEN $4::text IS NULL THEN NULL ELSE $8::bigint END) ON CONFLICT (name) DO NOTHING",
                &[
                    &name,
                    &provider,
                    &token.access_token.expose(),
                    &refresh,
                    &token.token_type,
                    &token.scope,
                    &token.expires_in,
                    &token.created_at,
                    &expires_at,
                    &now_secs,
                    &token.extra,
                    &token.refresh_token_expires_at,
                ],
            )
            .await?;
    }
    if changed == 0 {
        let found: Option<i64> = c
            .query_opt("SELECT generation FROM tokend_credential WHERE name = $1", &[&name])
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
        let answer = token.answer_json();
        let rescue_id: i64 = c
            .query_one(
                "INSERT INTO tokend_rescue (credential, from_generation, found_generation, node, answer)
                 VALUES ($1, $2, $3, $4, ($5::text)::jsonb) RETURNING id",
                &[&name, &from_generation, &found, &node_identity(), &answer.to_string()],
            )
            .await?
            .try_get(0)?;
        c.execute(
            "UPDATE tokend_attempt SET finished_at_ms = $2, result = 'superseded: answer kept in tokend_rescue' WHERE id = $1",
            &[&attempt_id, &now_ms],
        )
        .await?;
        return Ok(Committed::Superseded { found: found.unwrap_or(0), rescue_id });
    }
    c.execute(
        "UPDATE tokend_attempt SET finished_at_ms = $2, result = 'refreshed' WHERE id = $1",
        &[&attempt_id, &now_ms],
    )
    .await?;
    let state = c.query_one(STATE_BY_NAME, &[&name]).await.and_then(|r| state_from_row(&r))?;
    c.execute("SELECT pg_notify($1, $2)", &[&COMMIT_CHANNEL, &format!("{} {name}", state.generation)]).await?;
    Ok(Committed::Stored(state))
}

/// Tells every listening node (after the transaction commits) that `name` is at `generation`.
async fn notify(tx: &tokio_postgres::Transaction<'_>, name: &str, generation: i64) -> Result<(), Error> {
    tx.execute("SELECT pg_notify($1, $2)", &[&COMMIT_CHANNEL, &format!("{generation} {name}")]).await.map(|_| ())
}

/// How soon a credential held back by [`probed_rival`] is looked at again.
const PROBED_RIVAL_RECHECK_MS: i64 = 2000;

/// Another holder's unresolved attempt on `generation` (see [`unresolved_rival`]) after which
/// someone already presented the same refresh token and got a rejection whose `needs_reauth` was
/// deferred. That one probe showed the token spent; presenting it again while the rival may
/// still land the only live answer would only show it again — and a provider that revokes a
/// whole grant on reuse would take that answer with it.
async fn probed_rival(db: &mut Db<'_>, name: &str, generation: i64) -> Result<Option<String>, Error> {
    // Within a batch, pg_stat_activity may be as old as the batch's transaction: a rival seen
    // alive that just died only delays this credential by one recheck.
    let listener = super::LISTENER_BACKEND.load(std::sync::atomic::Ordering::SeqCst);
    let row = db.query_opt(PROBED_RIVAL, &[&name, &generation, &listener]).await?;
    row.map(|r| r.try_get(0)).transpose()
}

/// An open attempt of another holder on the same generation whose database session still
/// exists: it may yet land its answer (ARCHITECTURE.md, "Fleet: invalid_grant and the other
/// node's attempt").
async fn unresolved_rival(c: &Client, attempt_id: i64) -> Result<Option<(i64, String)>, Error> {
    // A session reads pg_stat_activity once per transaction and keeps that picture; inside a
    // group commit's transaction it could be as old as the batch. Which sessions exist must be
    // read now.
    c.batch_execute("SELECT pg_stat_clear_snapshot()").await?;
    let row = c
        .query_opt(
            "SELECT r.id, r.holder FROM tokend_attempt a JOIN tokend_attempt r
               ON r.credential = a.credential AND r.from_generation = a.from_generation AND r.id <> a.id
             WHERE a.id = $1 AND r.finished_at_ms IS NULL
               AND r.backend_pid <> a.backend_pid
               AND EXISTS (SELECT 1 FROM pg_stat_activity s WHERE s.pid = r.backend_pid)
             ORDER BY r.id LIMIT 1",
            &[&attempt_id],
        )
        .await?;
    row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
}

/// Closes an attempt that produced no token. Returns whether the credential was marked
/// `needs_reauth`: a rejection is not final while a rival attempt on the same generation is
/// unresolved — that attempt may hold the only live token. Runs in the caller's transaction.
pub async fn failure(
    c: &Client,
    name: &str,
    attempt_id: i64,
    reason: &str,
    needs_reauth: bool,
    now_ms: i64,
) -> Result<bool, Error> {
    let rival = if needs_reauth { unresolved_rival(c, attempt_id).await? } else { None };
    let (mark, error) = match &rival {
        Some((id, holder)) => {
            tracing::warn!(credential = name, rival_attempt = id, rival_holder = %holder, "grant rejected while another holder's attempt on the same generation is unresolved; needs_reauth deferred until it settles");
            (
                false,
                format!("{reason} (needs_reauth deferred: attempt {id} by {holder} on this generation is unresolved)"),
            )
        }
        None => (needs_reauth, reason.to_string()),
    };
    c.execute(
        "UPDATE tokend_credential SET last_error = $2, updated_at = $3,
             status = CASE WHEN $4 THEN 'needs_reauth' ELSE status END,
             dead_since = CASE WHEN $4 THEN COALESCE(dead_since, $3) ELSE dead_since END
         WHERE name = $1",
        &[&name, &error, &now_ms.div_euclid(1000), &mark],
    )
    .await?;
    let result = match (mark, rival.is_some()) {
        (true, _) => "needs_reauth",
        (false, true) => "rejected, deferred",
        (false, false) => "failed",
    };
    c.execute(
        "UPDATE tokend_attempt SET finished_at_ms = $2, result = $3 WHERE id = $1",
        &[&attempt_id, &now_ms, &result],
    )
    .await?;
    Ok(mark)
}

pub async fn cancel(db: &mut Db<'_>, attempt_id: i64, why: &str, now_ms: i64) -> Result<(), Error> {
    db.execute(ATTEMPT_CANCEL, &[&attempt_id, &now_ms, &why]).await.map(|_| ())
}

pub async fn release(db: &mut Db<'_>, name: &str, holder: &LeaseHolder) -> Result<(), Error> {
    db.execute(LEASE_RELEASE, &[&name, &holder.id]).await.map(|_| ())
}

/// Stores tokens obtained outside a refresh: generation + 1, open attempts closed as superseded.
pub async fn import_many(c: &mut Client, tokens: &[(String, String, NewToken)], now_secs: i64) -> Result<(), Error> {
    let tx = c.transaction().await?;
    let upsert = tx
        .prepare(
            "INSERT INTO tokend_credential (name, provider, access_token, refresh_token, token_type, scope, expires_in,
                 created_at, expires_at, generation, status, last_error, last_refresh_at, updated_at,
                 extra, refresh_token_expires_at, refresh_token_issued_at, dead_since)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, 'active', NULL, NULL, $10,
                 $11, $12, CASE WHEN $4::text IS NULL THEN NULL ELSE $8::bigint END, NULL)
             ON CONFLICT (name) DO UPDATE SET provider = excluded.provider, access_token = excluded.access_token,
                 refresh_token = excluded.refresh_token, token_type = excluded.token_type, scope = excluded.scope,
                 expires_in = excluded.expires_in, created_at = excluded.created_at, expires_at = excluded.expires_at,
                 generation = tokend_credential.generation + 1, status = 'active', last_error = NULL,
                 updated_at = excluded.updated_at, extra = excluded.extra,
                 refresh_token_expires_at = excluded.refresh_token_expires_at,
                 refresh_token_issued_at = excluded.refresh_token_issued_at, dead_since = NULL
             RETURNING generation",
        )
        .await?;
    for (name, provider, token) in tokens {
        let generation: i64 = tx
            .query_one(
                &upsert,
                &[
                    name,
                    provider,
                    &token.access_token.expose(),
                    &token.refresh_token.as_ref().map(crate::redact::Secret::expose),
                    &token.token_type,
                    &token.scope,
                    &token.expires_in,
                    &token.created_at,
                    &token.expires_at(),
                    &now_secs,
                    &token.extra,
                    &token.refresh_token_expires_at,
                ],
            )
            .await?
            .try_get(0)?;
        tx.execute(
            "UPDATE tokend_attempt SET finished_at_ms = $2, result = 'superseded by import'
             WHERE credential = $1 AND finished_at_ms IS NULL",
            &[name, &(now_secs * 1000)],
        )
        .await?;
        notify(&tx, name, generation).await?;
    }
    tx.commit().await
}

pub async fn remove(c: &mut Client, name: &str) -> Result<bool, Error> {
    let tx = c.transaction().await?;
    let n = tx.execute("DELETE FROM tokend_credential WHERE name = $1", &[&name]).await?;
    tx.execute("DELETE FROM tokend_lease WHERE credential = $1", &[&name]).await?;
    tx.execute("DELETE FROM tokend_attempt WHERE credential = $1", &[&name]).await?;
    notify(&tx, name, 0).await?;
    tx.commit().await?;
    Ok(n > 0)
}

pub async fn mark_revoked(c: &Client, name: &str, now_secs: i64) -> Result<bool, Error> {
    c.execute(
        "UPDATE tokend_credential SET status = 'revoked', last_error = 'revoked with tokend revoke', updated_at = $2,
             dead_since = COALESCE(dead_since, $2) WHERE name = $1",
        &[&name, &now_secs],
    )
    .await
    .map(|n| n > 0)
}

/// Open attempts that can no longer land: their database session is gone (the process died, or
/// its connection did). A paused node keeps its session, so its attempt is not reported.
pub async fn abandoned_attempts(c: &Client) -> Result<Vec<OpenAttempt>, Error> {
    let rows = c
        .query(
            "SELECT id, credential, from_generation, spent_fp, holder, started_at_ms FROM tokend_attempt a
             WHERE finished_at_ms IS NULL AND NOT EXISTS (SELECT 1 FROM pg_stat_activity s WHERE s.pid = a.backend_pid)
             ORDER BY id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(OpenAttempt {
                id: r.try_get(0)?,
                credential: r.try_get(1)?,
                from_generation: r.try_get(2)?,
                spent_fp: r.try_get(3)?,
                holder: r.try_get(4)?,
                started_at_ms: r.try_get(5)?,
            })
        })
        .collect()
}

pub async fn maintenance(c: &Client, cutoff_ms: i64) -> Result<usize, Error> {
    let n = c
        .execute("DELETE FROM tokend_attempt WHERE finished_at_ms IS NOT NULL AND finished_at_ms < $1", &[&cutoff_ms])
        .await?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

/// Every lease, as the server's clock sees it: (credential, holder, node, pid, seconds left;
/// negative when past its deadline).
pub async fn leases(c: &Client) -> Result<Vec<super::Lease>, Error> {
    let rows = c
        .query(
            "SELECT credential, holder, node, pid, extract(epoch FROM deadline - now())::float8 FROM tokend_lease ORDER BY credential",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(super::Lease {
                credential: r.try_get(0)?,
                holder: r.try_get(1)?,
                node: r.try_get(2)?,
                pid: r.try_get::<_, i32>(3)?.unsigned_abs(),
                seconds_left: r.try_get(4)?,
            })
        })
        .collect()
}

/// `tokend migrate --from sqlite:… --to postgres://…`: every credential as it stands (tokens,
/// generation, status, last error), in one transaction that commits only if the target then
/// holds exactly as many credentials with exactly the same generations. `Ok(Err(why))`: refused,
/// nothing written.
pub async fn copy_in(
    c: &mut Client,
    states: &[TokenState],
    now_secs: i64,
) -> Result<Result<(i64, i64), String>, Error> {
    let tx = c.transaction().await?;
    let existing: i64 = tx.query_one("SELECT count(*) FROM tokend_credential", &[]).await?.try_get(0)?;
    if existing > 0 {
        return Ok(Err(format!(
            "already holds {existing} credential(s); tokend migrate --from copies into an empty store only"
        )));
    }
    let insert = tx
        .prepare(
            "INSERT INTO tokend_credential (name, provider, access_token, refresh_token, token_type, scope, expires_in,
                 created_at, expires_at, generation, status, last_error, last_refresh_at, updated_at,
                 extra, refresh_token_expires_at, refresh_token_issued_at, dead_since)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
        )
        .await?;
    for s in states {
        tx.execute(
            &insert,
            &[
                &s.name,
                &s.provider,
                &s.access_token.expose(),
                &s.refresh_token.as_ref().map(crate::redact::Secret::expose),
                &s.token_type,
                &s.scope,
                &s.expires_in,
                &s.created_at,
                &s.expires_at,
                &s.generation,
                &s.status.as_str(),
                &s.last_error,
                &s.last_refresh_at,
                &now_secs,
                &s.extra,
                &s.refresh_token_expires_at,
                &s.refresh_token_issued_at,
                &s.dead_since,
            ],
        )
        .await?;
    }
    let row = tx.query_one("SELECT count(*), coalesce(sum(generation), 0)::bigint FROM tokend_credential", &[]).await?;
    let (count, generations): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    let expected_count = i64::try_from(states.len()).unwrap_or(i64::MAX);
    let expected_generations: i64 = states.iter().map(|s| s.generation).sum();
    if (count, generations) != (expected_count, expected_generations) {
        return Ok(Err(format!(
            "verification failed: {count} credential(s), generations summing to {generations}, instead of {expected_count} and {expected_generations}; rolled back"
        )));
    }
    tx.commit().await?;
    Ok(Ok((count, generations)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_statement_commit_notifies_on_the_channel_nodes_listen_to() {
        // SQL literals cannot take the constant: a renamed channel must fail here, not in a fleet.
        assert!(COMMIT_FENCED.contains(&format!("pg_notify('{COMMIT_CHANNEL}', u.generation || ' ' || u.name)")));
    }
}
