//! The store a [`World`] runs on, so one test body runs against either backend: SQLite (a file in
//! the World's temp dir) or PostgreSQL (a database on a server the World starts and owns, its
//! schema made by `tokend migrate`). Tests read the store back through
//! [`tokend::store::AnyStore`], the same seam the CLI and the daemon use, so an assertion does not
//! know which backend it is on. [`on_both_backends!`](crate::on_both_backends) turns one
//! `async fn name(backend: Backend)` into a `name::sqlite` and a `name::postgres` test.

use super::World;
use super::postgres::{PG_PASSWORD, PgServer, daemon_lines};
use std::sync::{Mutex, MutexGuard, PoisonError};
use tokend::dev::mock::{MockProvider, MockSettings};
use tokend::redact::Secret;
use tokend::store::AnyStore;
use tokend::store::postgres::{PgStore, PgTarget};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// The name a test's figures are recorded under (`support::record_figures`): SQLite keeps the
    /// suite's historical name, PostgreSQL's gets a suffix.
    pub fn figures_name(self, label: &str) -> String {
        match self {
            Backend::Sqlite => label.to_string(),
            Backend::Postgres => format!("{label}-postgres"),
        }
    }
}

/// A World's own PostgreSQL server and the one database its config names. The server sits behind
/// a mutex so a test can stop and restart it (`pg_stop`, `pg_restart`) while other futures of the
/// same test hold the World (a CLI refresh in flight).
pub(super) struct PgDatabase {
    server: Mutex<PgServer>,
    conninfo: String,
    database: String,
}

/// The node-local directory of a PostgreSQL World (its lock, rescue files), relative to the
/// World's dir.
pub const PG_STATE_DIR: &str = "state";

impl World {
    /// A World on `backend`; a PostgreSQL one has its server started, its database created and
    /// migrated by `tokend migrate` before the test writes its own configuration.
    pub async fn on(backend: Backend, settings: MockSettings) -> World {
        let dir = tempfile::tempdir().unwrap();
        let mock = MockProvider::start(settings).await.unwrap();
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let server = PgServer::start();
                let database = server.create_database("tokend").await;
                Some(PgDatabase { conninfo: server.conninfo(&database), server: Mutex::new(server), database })
            }
        };
        let w = World { dir, mock, backend, pg };
        if backend == Backend::Postgres {
            // As the unit's StateDirectory= makes it: a CLI command's rescue file goes there
            // (without it, to the temp dir).
            std::fs::create_dir(w.path(PG_STATE_DIR)).unwrap();
            // Any valid configuration will do; the test writes its own afterwards.
            w.write_config(
                "[[credential]]\nname = \"migrate\"\nprovider = \"oauth2\"\ntoken_url = \"{mock}/token\"\nclient_id = \"id\"\n",
            );
            let run = w.tokend(&["migrate"], None).await;
            assert_eq!(run.code, 0, "tokend migrate: {}", run.stderr);
        }
        w
    }

    /// The `[daemon]` lines naming this World's store.
    pub(super) fn database_lines(&self) -> String {
        match &self.pg {
            None => "database = \"tokend.db\"\n".to_string(),
            Some(pg) => daemon_lines(&self.server(), &pg.database, self.dir.path(), PG_STATE_DIR),
        }
    }

    fn pg(&self) -> &PgDatabase {
        self.pg.as_ref().expect("a PostgreSQL World")
    }

    fn server(&self) -> MutexGuard<'_, PgServer> {
        self.pg().server.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops this World's PostgreSQL server (fast shutdown: sessions cut, nothing accepted).
    pub fn pg_stop(&self) {
        self.server().stop();
    }

    /// Starts it again on the same socket and data.
    pub fn pg_restart(&self) {
        self.server().restart();
    }

    /// A superuser session on this World's database, for faults the test injects.
    pub async fn pg_client(&self) -> tokio_postgres::Client {
        super::postgres::owner_session(&self.pg().conninfo).await
    }

    pub fn pg_database(&self) -> &str {
        &self.pg().database
    }

    /// The store as the CLI opens it, on either backend.
    pub fn store(&self) -> AnyStore {
        match &self.pg {
            None => AnyStore::Sqlite(tokend::store::Store::open(&self.path("tokend.db")).unwrap()),
            Some(pg) => {
                let target = PgTarget::parse(&pg.conninfo, Some(&Secret::new(PG_PASSWORD))).unwrap();
                AnyStore::Postgres(PgStore::open(&target, &self.path(&format!("{PG_STATE_DIR}/fleet"))).unwrap())
            }
        }
    }

    pub fn generation(&self, name: &str) -> i64 {
        self.store().get(name).unwrap().map_or(0, |s| s.generation)
    }
}

/// `on_both_backends!(a, b)` for test bodies `async fn a(backend: Backend)`: a module per body
/// with a `sqlite` and a `postgres` test (`cargo test --test crash postgres` runs one side).
#[macro_export]
macro_rules! on_both_backends {
    ($($body:ident),+ $(,)?) => {$(
        mod $body {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$body($crate::support::Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$body($crate::support::Backend::Postgres).await
            }
        }
    )+};
}
