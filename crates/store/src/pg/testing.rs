//! A throw-away PostgreSQL database per test (the store's contract tests
//! and testkit's servers use it). The server is named by
//! `WEFT_TEST_POSTGRES_URL` (default
//! `postgres://weft:weft@127.0.0.1:5432/postgres`, what `.ci/run` sets up);
//! its role must be allowed to create databases.

use std::sync::atomic::{AtomicU32, Ordering};

/// Where the test databases are made, unless `WEFT_TEST_POSTGRES_URL` says.
pub const DEFAULT_ADMIN_URL: &str = "postgres://weft:weft@127.0.0.1:5432/postgres";

/// A fresh, empty database, dropped (with its connections) when this is.
pub struct PgTestDb {
    /// Connection URL of the new database.
    pub url: String,
    admin_url: String,
    name: String,
}

impl PgTestDb {
    /// Creates one. When the server cannot be reached this fails if `CI` is
    /// set (the tests need it there) and answers `None` otherwise (the
    /// caller skips, saying so).
    pub fn create() -> Option<Self> {
        let admin_url = std::env::var("WEFT_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned());
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "weft_test_{}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        let (admin, n) = (admin_url.clone(), name.clone());
        // The synchronous client runs its own runtime: keep it off the
        // caller's (a tokio test's) thread.
        let made = std::thread::spawn(move || -> Result<(), postgres::Error> {
            let mut c = postgres::Client::connect(&admin, postgres::NoTls)?;
            c.batch_execute(&format!("CREATE DATABASE {n}"))
        })
        .join()
        .unwrap_or_else(|_| panic!("creating a test database panicked"));
        if let Err(e) = made {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but PostgreSQL at WEFT_TEST_POSTGRES_URL (or {DEFAULT_ADMIN_URL}) is unusable: {e}");
            }
            eprintln!("note: PostgreSQL unreachable ({e}); skipping the PostgreSQL part of this test");
            return None;
        }
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => format!("{admin_url}/{name}"),
        };
        Some(Self { url, admin_url, name })
    }
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        let (admin, n) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(mut c) = postgres::Client::connect(&admin, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"));
            }
        })
        .join();
    }
}
