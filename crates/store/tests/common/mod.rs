//! Runs each contract test against both backends: `both!(name, …)` makes
//! `name::sqlite` and `name::postgres` from `async fn name(b: Backend)`.

use std::sync::Arc;

use weft_store::pg_testing::PgTestDb;
use weft_store::{PgStore, SqliteStore, Store};

/// Where a test's store lives; `open` may be called again to reopen it.
pub enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(PgTestDb),
}

impl Backend {
    pub fn sqlite() -> Self {
        Backend::Sqlite(tempfile::tempdir().expect("temp dir"))
    }

    /// `None` (with a note) when PostgreSQL is unreachable and `CI` is unset.
    pub fn postgres() -> Option<Self> {
        PgTestDb::create().map(Backend::Postgres)
    }

    pub fn open(&self) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite(dir) => Arc::new(SqliteStore::open(&dir.path().join("weft.db"), true).expect("open store")),
            Backend::Postgres(db) => Arc::new(PgStore::open(&db.url).expect("open store")),
        }
    }
}

#[macro_export]
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::common::Backend::sqlite()).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if let Some(b) = $crate::common::Backend::postgres() {
                        super::$name(b).await
                    }
                }
            }
        )*
    };
}
