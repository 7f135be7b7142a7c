//! The SQLite side of encryption at rest: which key a store is sealed with, which key ids its
//! values use, re-sealing in batches (encrypting a plaintext store, rotating the key), removing
//! what is left of old pages, and backups.
//!
//! The store's key id lives in SQLite's `application_id` header field (0 = never encrypted): it
//! is read at open for the price of one pragma, so a wrong or missing key is refused before any
//! value is read, any lease taken or any request sent, and no schema migration is needed. The key
//! id of each value is in the value itself (`s1 <key id> …`, src/seal.rs).

use super::{Store, seal_error};
use crate::seal::{Column, KeyId, SealError, Stored, classify};
use crate::store::StoreError;
use rusqlite::{Connection, TransactionBehavior, params};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// How many values of each kind a store holds: plaintext, and sealed under each key id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyUse {
    pub plaintext: u64,
    pub sealed: BTreeMap<KeyId, u64>,
}

impl KeyUse {
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self.sealed.iter().map(|(id, n)| format!("{n} sealed with key {id}")).collect();
        if self.plaintext > 0 || parts.is_empty() {
            parts.push(format!("{} in plaintext", self.plaintext));
        }
        parts.join(", ")
    }
}

impl Store {
    fn key_error(&self, message: String) -> StoreError {
        StoreError::Key { path: self.path.clone(), source: SealError::Store(message) }
    }

    /// The key id recorded in the store's header; `None` for a store never encrypted.
    pub fn store_key_id(&self) -> Result<Option<KeyId>, StoreError> {
        let id: i64 = self.conn.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(|e| self.err(e))?;
        // application_id is a signed 32-bit field holding the id's 4 bytes.
        Ok((id != 0).then(|| KeyId::from_u32(id as u32)))
    }

    /// Records `id` as the key this store is sealed with (from now on, a start without it fails).
    pub(crate) fn set_store_key_id(&mut self, id: KeyId) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "application_id", id.as_u32() as i32).map_err(|e| self.err(e))
    }

    /// At open: a store sealed with a key must be opened with it; a key given for a plaintext
    /// store marks it as sealed with that key (the values follow with [`Store::reseal_batch`]).
    pub(super) fn check_key(&mut self) -> Result<(), StoreError> {
        if self.sealer.is_locked() {
            return Ok(());
        }
        let recorded = self.store_key_id()?;
        let ring = self.sealer.keyring();
        match (recorded, ring) {
            (None, None) => Ok(()),
            (Some(id), None) => Err(self.key_error(format!(
                "is encrypted (key id {id}) but no key is configured: set key_credential, key_file or key_env in [daemon]"
            ))),
            (Some(id), Some(ring)) if !ring.ids().any(|k| k == id) => Err(self.key_error(format!(
                "is encrypted with key id {id}, but the configured key ({}) has id {}: wrong key",
                ring.current().source(),
                ring.current().id()
            ))),
            (Some(_), Some(_)) => Ok(()),
            (None, Some(ring)) => {
                let id = ring.current().id();
                self.set_store_key_id(id)
            }
        }
    }

    /// Counts the stored secrets by key id, without decrypting anything.
    pub fn key_use(&self) -> Result<KeyUse, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT CASE WHEN substr(v, 1, 3) = 's1 ' THEN substr(v, 4, 8) ELSE '' END AS k, count(*)
                 FROM (SELECT access_token AS v FROM credential
                       UNION ALL SELECT refresh_token FROM credential WHERE refresh_token IS NOT NULL)
                 GROUP BY k",
            )
            .map_err(|e| self.err(e))?;
        let rows =
            stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).map_err(|e| self.err(e))?;
        let mut using = KeyUse::default();
        for row in rows {
            let (kid, n) = row.map_err(|e| self.err(e))?;
            let n = u64::try_from(n).unwrap_or(0);
            match KeyId::parse(&kid) {
                Some(id) => *using.sealed.entry(id).or_default() += n,
                None => using.plaintext += n,
            }
        }
        Ok(using)
    }

    /// Seals again, under the current key, up to `limit` credentials whose tokens are plaintext
    /// or sealed with another key, in one transaction; returns how many rows it rewrote (0 when
    /// none is left). `after` is where the previous batch stopped (a name), so a pass over the
    /// whole store reads each row once; a rerun after a crash starts again from the beginning
    /// and rewrites only what is still left.
    pub fn reseal_batch(&mut self, after: &str, limit: usize) -> Result<(usize, Option<String>), StoreError> {
        let Some(ring) = self.sealer.keyring() else {
            return Err(self.key_error("no key configured to seal with".into()));
        };
        let current = ring.current().id();
        let sealer = self.sealer.clone();
        let path = self.path.clone();
        let sql = |e| StoreError::from_sql(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sql)?;
        let mut rewritten = 0;
        let mut last = None;
        {
            let mut rows = tx
                .prepare("SELECT name, generation, access_token, refresh_token FROM credential WHERE name > ?1 ORDER BY name LIMIT ?2")
                .map_err(sql)?;
            let mut update = tx
                .prepare("UPDATE credential SET access_token = ?2, refresh_token = ?3 WHERE name = ?1")
                .map_err(sql)?;
            let batch: Vec<(String, i64, String, Option<String>)> = rows
                .query_map(params![after, i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .map_err(sql)?
                .collect::<Result<_, _>>()
                .map_err(sql)?;
            for (name, generation, access, refresh) in batch {
                let done = |v: &str| classify(v) == Stored::Sealed(current);
                if !(done(&access) && refresh.as_deref().is_none_or(done)) {
                    let reseal = |column: Column, stored: &str| -> rusqlite::Result<String> {
                        let secret = sealer.open(&name, column, generation, stored).map_err(seal_error)?;
                        sealer.seal(&name, column, generation, secret.expose()).map_err(seal_error)
                    };
                    let access = reseal(Column::AccessToken, &access).map_err(sql)?;
                    let refresh = refresh.map(|r| reseal(Column::RefreshToken, &r)).transpose().map_err(sql)?;
                    update.execute(params![name, access, refresh]).map_err(sql)?;
                    rewritten += 1;
                }
                last = Some(name);
            }
        }
        tx.commit().map_err(sql)?;
        Ok((rewritten, last))
    }

    /// Rebuilds the file without free pages (VACUUM) and empties the WAL (checkpoint, TRUNCATE):
    /// after an encryption or a rotation, no page of the database or its WAL holds the old
    /// values. What the file system did with the old blocks is outside SQLite's reach.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch("VACUUM; PRAGMA wal_checkpoint(TRUNCATE);").map_err(|e| self.err(e))?;
        let busy: i64 =
            self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).map_err(|e| self.err(e))?;
        if busy != 0 {
            return Err(StoreError::Other {
                path: self.path.clone(),
                message: "the WAL could not be emptied: another connection is reading; stop tokend and run this again"
                    .into(),
            });
        }
        Ok(())
    }

    /// How many credentials the store holds.
    pub fn count(&self) -> Result<u64, StoreError> {
        let n: i64 =
            self.conn.query_row("SELECT count(*) FROM credential", [], |r| r.get(0)).map_err(|e| self.err(e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// A consistent copy of the store at `source` into `target` (SQLite's online backup API, safe
/// beside a running daemon), mode 0600, one self-contained file (rollback journal, no WAL beside
/// it). Values are copied as stored — sealed stays sealed — so no key is needed. Returns the key
/// id the copy is sealed with and how many credentials it holds.
pub fn backup(source: &Path, target: &Path) -> Result<(Option<KeyId>, u64), StoreError> {
    let io = |context: String, e| StoreError::Io { path: target.to_path_buf(), context, source: e };
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
        .map_err(|e| io("cannot create the backup file (an existing file is never overwritten)".into(), e))?;
    let copy = || -> Result<(i64, i64), StoreError> {
        let from = Connection::open_with_flags(source, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| StoreError::from_sql(source, e))?;
        from.busy_timeout(std::time::Duration::from_secs(30)).map_err(|e| StoreError::from_sql(source, e))?;
        let sql = |e| StoreError::from_sql(target, e);
        let mut dest = Connection::open(target).map_err(sql)?;
        {
            let backup = rusqlite::backup::Backup::new(&from, &mut dest).map_err(sql)?;
            backup.run_to_completion(256, std::time::Duration::from_millis(5), None).map_err(sql)?;
        }
        dest.query_row("PRAGMA journal_mode = DELETE", [], |_| Ok(())).map_err(sql)?;
        dest.execute_batch("PRAGMA synchronous = FULL; VACUUM;").map_err(sql)?;
        let id: i64 = dest.query_row("PRAGMA application_id", [], |r| r.get(0)).map_err(sql)?;
        let n: i64 = dest.query_row("SELECT count(*) FROM credential", [], |r| r.get(0)).map_err(sql)?;
        Ok((id, n))
    };
    let (id, n) = match copy() {
        Ok(found) => found,
        Err(e) => {
            remove_with_side_files(target);
            return Err(e);
        }
    };
    OpenOptions::new().read(true).open(target).and_then(|f| f.sync_all()).map_err(|e| io("cannot sync".into(), e))?;
    Ok(((id != 0).then(|| KeyId::from_u32(id as u32)), u64::try_from(n).unwrap_or(0)))
}

/// Removes a database file and its -wal, -shm and -journal files, if there.
pub fn remove_with_side_files(path: &Path) {
    let _ = std::fs::remove_file(path);
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let _ = std::fs::remove_file(side);
    }
}

/// How many credentials the store at `path` holds, read without a key.
pub fn count_credentials(path: &Path) -> Result<u64, StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(|e| StoreError::from_sql(path, e))?;
    let n: i64 = conn
        .query_row("SELECT count(*) FROM credential", [], |r| r.get(0))
        .or_else(|e| match e {
            // A file created but never migrated holds no credentials.
            rusqlite::Error::SqliteFailure(_, Some(ref m)) if m.starts_with("no such table") => Ok(0),
            e => Err(e),
        })
        .map_err(|e| StoreError::from_sql(path, e))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use crate::redact::Secret;
    use crate::seal::{Key, Keyring, Sealer};
    use crate::store::{Begin, LeaseHolder, NewToken, Store, StoreError};
    use std::time::Duration;

    fn sealer() -> Sealer {
        Sealer::with(Keyring::new(Key::from_text(&Key::generate_text(), "test key").unwrap(), vec![]))
    }

    fn token(access: &str, refresh: Option<&str>) -> NewToken {
        NewToken {
            access_token: Secret::new(access),
            refresh_token: refresh.map(Secret::new),
            token_type: "Bearer".into(),
            scope: None,
            expires_in: Some(3600),
            created_at: 1000,
            extra: None,
            refresh_token_expires_at: None,
        }
    }

    #[test]
    fn a_sealed_store_round_trips_and_refuses_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let key = sealer();
        {
            let mut store = Store::open_sealed(&db, key.clone()).unwrap();
            store.import("nb", "nationbuilder", &token("access-one", Some("refresh-one")), 1000).unwrap();
            let me = LeaseHolder::new();
            let Begin::Leased { attempt_id, state } =
                store.begin_refresh("nb", &me, Duration::from_secs(60), 1).unwrap()
            else {
                panic!()
            };
            assert_eq!(state.unwrap().refresh_token.unwrap().expose(), "refresh-one");
            // No refresh token in the answer: the kept one is sealed again for generation 2, and
            // it is still the one issued at the import (its lifetime counts from then).
            let two = NewToken { created_at: 2000, ..token("access-two", None) };
            let s = store.commit_rotation("nb", "nationbuilder", attempt_id, 1, &two, 2).unwrap();
            assert_eq!((s.generation, s.refresh_token.unwrap().expose()), (2, "refresh-one"));
            assert_eq!(s.refresh_token_issued_at, Some(1000));
            let using = store.key_use().unwrap();
            assert_eq!((using.plaintext, using.sealed.values().sum::<u64>()), (0, 2));
        }
        let bytes = std::fs::read(&db).unwrap();
        let wal = std::fs::read(dir.path().join("t.db-wal")).unwrap_or_default();
        for needle in ["access-one", "access-two", "refresh-one"] {
            for file in [&bytes, &wal] {
                assert!(!file.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle} in clear");
            }
        }
        let wrong = Store::open_sealed(&db, sealer()).err().unwrap();
        assert!(matches!(wrong, StoreError::Key { .. }) && wrong.to_string().contains("wrong key"), "{wrong}");
        let none = Store::open(&db).err().unwrap();
        assert!(none.to_string().contains("no key is configured"), "{none}");
        assert_eq!(
            Store::open_sealed(&db, key).unwrap().get("nb").unwrap().unwrap().access_token.expose(),
            "access-two"
        );
    }
}
