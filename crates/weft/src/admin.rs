//! The admin socket and the data directory lock: how `weft user …` reaches
//! the one process that writes the database.
//!
//! `weft serve` holds an exclusive lock on `DATA_DIR/weft.lock` for its
//! whole life (a second `weft serve` on the same directory fails), and
//! listens on the Unix socket `DATA_DIR/admin.sock` (mode 0600). An admin
//! command first connects to that socket: if a server answers, the server
//! runs the command, so it publishes the stream positions it assigns and
//! its sync waiters wake. With no server the command takes the same lock
//! and opens the database itself; a server starting meanwhile waits for it.
//!
//! Protocol: one JSON line each way per connection,
//! `{"v":1,"command":{"op":"deactivate","name":"bob"}}` answered by
//! `{"v":1,"ok":{"outcome":"deactivated","user_id":"@bob:…"}}` or
//! `{"v":1,"error":{"errcode":"M_NOT_FOUND","error":"…"}}`.
//!
//! Authorization is the file system's: the socket is 0600 and the server
//! also refuses a peer whose uid is neither its own nor root's (which
//! closes the moment between bind and chmod).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use weft_services::Services;
use weft_services::admin::{AdminCommand, AdminOutcome};

/// The protocol version this binary speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The socket's file name in the data directory.
pub const SOCKET_FILE: &str = "admin.sock";
/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = "weft.lock";
/// Longest request line the server reads.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// How long the server waits for a request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a command (CLI) or a starting server waits for the lock held by
/// a short-lived process (a direct admin command, a server starting up).
const LOCK_WAIT: Duration = Duration::from_secs(15);

#[derive(Debug, Serialize, Deserialize)]
pub struct AdminRequest {
    pub v: u32,
    pub command: AdminCommand,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AdminError {
    pub errcode: String,
    pub error: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AdminResponse {
    pub v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<AdminOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AdminError>,
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

/// The exclusive lock on `DATA_DIR/weft.lock`; released when dropped (or
/// when the process ends, however it ends).
pub struct DataDirLock {
    _file: File,
}

/// Takes the data directory's lock if no other process holds it.
fn try_lock(data_dir: &Path) -> anyhow::Result<Option<DataDirLock>> {
    let path = data_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(DataDirLock { _file: file })),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// The lock for `weft serve`, held for the server's life. Another server
/// on the same directory is refused at once; a direct admin command
/// holding the lock is waited for (up to [`LOCK_WAIT`]).
pub async fn lock_for_serve(data_dir: &Path) -> anyhow::Result<DataDirLock> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        if let Some(lock) = try_lock(data_dir)? {
            return Ok(lock);
        }
        let socket = socket_path(data_dir);
        if UnixStream::connect(&socket).await.is_ok() {
            bail!(
                "another `weft serve` is already running on the data directory {} (it holds {} and answers on {}); \
                 stop it first, or give this one its own --data-dir",
                data_dir.display(),
                data_dir.join(LOCK_FILE).display(),
                socket.display()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the data directory {} is in use by another weft process (it holds {}): \
                 another `weft serve` starting or stopping, or a `weft user …` command",
                data_dir.display(),
                data_dir.join(LOCK_FILE).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lock for `weft migrate-from-sqlite`, held for the whole copy: a
/// running server (whose admin socket answers) is refused at once, a short
/// admin command is waited for (up to [`LOCK_WAIT`]).
pub async fn lock_for_migration(data_dir: &Path) -> anyhow::Result<DataDirLock> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        if let Some(lock) = try_lock(data_dir)? {
            return Ok(lock);
        }
        if UnixStream::connect(socket_path(data_dir)).await.is_ok() {
            bail!(
                "a weft server is running on the data directory {} (it holds {}): stop it before migrating its database",
                data_dir.display(),
                data_dir.join(LOCK_FILE).display()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "the data directory {} is in use by another weft process (it holds {}): stop it before migrating",
                data_dir.display(),
                data_dir.join(LOCK_FILE).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The running server's admin socket; the socket file is removed when
/// this is dropped (clean shutdown).
pub struct AdminSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl AdminSocket {
    /// Listens on `DATA_DIR/admin.sock` (mode 0600), replacing a stale
    /// socket a crashed server left behind. Call with the data directory
    /// lock held, so no other server can be listening there.
    pub async fn start(data_dir: &Path, services: Arc<Services>) -> anyhow::Result<AdminSocket> {
        let path = socket_path(data_dir);
        if std::fs::symlink_metadata(&path).is_ok() {
            if UnixStream::connect(&path).await.is_ok() {
                bail!(
                    "{} answers: another server is running on this data directory",
                    path.display()
                );
            }
            std::fs::remove_file(&path).with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(&path).with_context(|| {
            format!(
                "cannot listen on the admin socket {} (Unix socket paths are limited to 107 bytes: a shorter --data-dir helps)",
                path.display()
            )
        })?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?;
        let owner = std::fs::metadata(&path)
            .with_context(|| format!("stat {}", path.display()))?
            .uid();
        let task = tokio::spawn(accept_loop(listener, services, owner, path.clone()));
        Ok(AdminSocket { path, task })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

async fn accept_loop(listener: UnixListener, services: Arc<Services>, owner: u32, path: PathBuf) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("admin socket {}: accept failed: {e}", path.display());
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == owner || cred.uid() == 0 => {}
            Ok(cred) => {
                tracing::warn!(
                    "admin socket {}: refused a peer with uid {}",
                    path.display(),
                    cred.uid()
                );
                continue;
            }
            Err(e) => {
                tracing::warn!("admin socket {}: no peer credentials: {e}", path.display());
                continue;
            }
        }
        tokio::spawn(handle(stream, services.clone(), path.clone()));
    }
}

fn error_response(errcode: &str, error: impl Into<String>) -> AdminResponse {
    AdminResponse {
        v: PROTOCOL_VERSION,
        ok: None,
        error: Some(AdminError {
            errcode: errcode.to_owned(),
            error: error.into(),
        }),
    }
}

async fn handle(stream: UnixStream, services: Arc<Services>, path: PathBuf) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => return,
        Ok(Err(e)) => error_response("M_BAD_JSON", format!("unreadable request: {e}")),
        Ok(Ok(_)) if !line.ends_with('\n') => error_response(
            "M_BAD_JSON",
            format!("the request must be one line of at most {MAX_REQUEST_BYTES} bytes"),
        ),
        Ok(Ok(_)) => respond(&line, &services, &path).await,
    };
    let mut out = match serde_json::to_vec(&response) {
        Ok(out) => out,
        Err(e) => {
            tracing::warn!("admin socket: cannot encode a response: {e}");
            return;
        }
    };
    out.push(b'\n');
    let _ = write.write_all(&out).await;
    let _ = write.shutdown().await;
}

async fn respond(line: &str, services: &Services, path: &Path) -> AdminResponse {
    // The version first, so a newer client gets a clear answer even when
    // its command is unknown here.
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    match serde_json::from_str::<Version>(line) {
        Ok(Version { v }) if v == PROTOCOL_VERSION => {}
        Ok(Version { v }) => {
            return error_response(
                "M_UNRECOGNIZED",
                format!("admin protocol version {v} is not supported (this server speaks {PROTOCOL_VERSION})"),
            );
        }
        Err(e) => return error_response("M_BAD_JSON", format!("bad request: {e}")),
    }
    let request: AdminRequest = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return error_response("M_BAD_JSON", format!("bad request: {e}")),
    };
    let op = request.command.op();
    tracing::info!("admin command {op} over {}", path.display());
    match services.admin(request.command).await {
        Ok(outcome) => AdminResponse {
            v: PROTOCOL_VERSION,
            ok: Some(outcome),
            error: None,
        },
        Err(e) => error_response(e.errcode(), e.message),
    }
}

/// Sends `command` to the server running on `data_dir`. `None` if no
/// server listens there (no socket, or a stale one).
async fn via_server(data_dir: &Path, command: &AdminCommand) -> anyhow::Result<Option<AdminOutcome>> {
    let path = socket_path(data_dir);
    let mut stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot reach the running server's admin socket {} (run the command as the user the server runs as)",
                    path.display()
                )
            });
        }
    };
    tracing::debug!("sending {} to the running server over {}", command.op(), path.display());
    let mut request = serde_json::to_vec(&AdminRequest {
        v: PROTOCOL_VERSION,
        command: command.clone(),
    })?;
    request.push(b'\n');
    stream
        .write_all(&request)
        .await
        .with_context(|| format!("writing to {}", path.display()))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .await
        .with_context(|| format!("reading from {}", path.display()))?;
    if line.is_empty() {
        bail!(
            "the server closed the admin socket {} without an answer",
            path.display()
        );
    }
    let response: AdminResponse =
        serde_json::from_str(&line).with_context(|| format!("bad answer on {}: {line}", path.display()))?;
    match (response.ok, response.error) {
        (Some(outcome), _) => Ok(Some(outcome)),
        (None, Some(e)) => bail!("{}", e.error),
        (None, None) => bail!("empty answer on {}", path.display()),
    }
}

/// Runs an admin command: through the running server if there is one,
/// otherwise on the database directly, holding the data directory lock
/// (so a server cannot start meanwhile). `open` loads the config and opens
/// the database; it runs only on the direct path, under the lock.
pub async fn run(
    data_dir: &Path,
    command: AdminCommand,
    open: impl FnOnce() -> anyhow::Result<Arc<Services>>,
) -> anyhow::Result<AdminOutcome> {
    if let Some(outcome) = via_server(data_dir, &command).await? {
        return Ok(outcome);
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let deadline = Instant::now() + LOCK_WAIT;
    let _lock = loop {
        if let Some(lock) = try_lock(data_dir)? {
            break lock;
        }
        // A server is starting (it listens once it is ready), or another
        // direct command runs.
        if let Some(outcome) = via_server(data_dir, &command).await? {
            return Ok(outcome);
        }
        if Instant::now() >= deadline {
            bail!(
                "the data directory {} is locked by another weft process ({}) whose admin socket does not answer",
                data_dir.display(),
                data_dir.join(LOCK_FILE).display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tracing::debug!(
        "no server running: running {} on the database in {}",
        command.op(),
        data_dir.display()
    );
    let services = open()?;
    services
        .admin(command)
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message))
}

/// Prints an outcome as `weft user …` always has: results on stdout,
/// notes on stderr.
pub fn print(outcome: &AdminOutcome) {
    match outcome {
        AdminOutcome::Created { user_id } => println!("created {user_id}"),
        AdminOutcome::Users { users } => {
            for u in users {
                let flags = [(u.admin, "admin"), (u.deactivated, "deactivated")]
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, n)| *n)
                    .collect::<Vec<_>>()
                    .join(",");
                println!("{}\t{}", u.user_id, flags);
            }
        }
        AdminOutcome::PasswordChanged { user_id } => println!("password changed for {user_id}"),
        AdminOutcome::Deactivated { user_id } => println!("deactivated {user_id}"),
        AdminOutcome::Token {
            user_id,
            device_id,
            access_token,
        } => {
            println!("{access_token}");
            eprintln!("device {device_id} of {user_id}");
        }
        AdminOutcome::Devices { devices, .. } => {
            for d in devices {
                let seen = d.last_seen_ms.map(|ms| ms.to_string()).unwrap_or_else(|| "-".into());
                println!(
                    "{}\t{}\t{}",
                    d.device_id,
                    d.display_name.as_deref().unwrap_or_default(),
                    seen
                );
            }
        }
        AdminOutcome::Revoked { user_id, device_id } => println!("revoked device {device_id} of {user_id}"),
        AdminOutcome::Reports { reports } => {
            for r in reports {
                let what = match (&r.room_id, &r.event_id, &r.target_user) {
                    (Some(room), Some(event), _) => format!("{room} {event}"),
                    (_, _, Some(user)) => user.clone(),
                    _ => "-".into(),
                };
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    r.id,
                    r.received_ms,
                    r.reporter,
                    what,
                    r.reason.as_deref().unwrap_or_default().replace(['\n', '\t'], " ")
                );
            }
        }
        AdminOutcome::Media { media } => {
            for m in media {
                let size = m.size.map(|s| s.to_string()).unwrap_or_else(|| "pending".into());
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}{}",
                    m.mxc,
                    m.uploader,
                    m.created_ms,
                    size,
                    m.content_type.as_deref().unwrap_or("-"),
                    m.filename.as_deref().unwrap_or("-").replace(['\n', '\t'], " "),
                    if m.quarantined { "\tquarantined" } else { "" }
                );
            }
        }
        AdminOutcome::MediaStats { stats } => {
            println!("items\t{}\t{} bytes", stats.items, stats.bytes);
            println!("files\t{}\t{} bytes", stats.blobs, stats.blob_bytes);
            println!("thumbnails\t{}\t{} bytes", stats.thumbnails, stats.thumbnail_bytes);
            println!("quarantined\t{}", stats.quarantined);
            println!("pending\t{}", stats.pending);
        }
        AdminOutcome::MediaPurged { deleted } => println!("deleted {deleted} media items"),
        AdminOutcome::MediaQuarantined { mxc, quarantined } => {
            println!("{mxc} {}", if *quarantined { "quarantined" } else { "released" })
        }
        AdminOutcome::Destinations { now_ms, destinations } => {
            use weft_services::federation_queue::describe_ms_from_now as when;
            println!("destination\tpdus\tedus\tbackoff_ms\tretry\tlast_success\tlast_error");
            for d in destinations {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    d.name,
                    d.queued_pdus,
                    d.queued_edus,
                    d.backoff_ms,
                    if d.retry_at_ms > *now_ms {
                        when(d.retry_at_ms, *now_ms)
                    } else {
                        "now".into()
                    },
                    d.last_success_ms
                        .map(|t| when(t, *now_ms))
                        .unwrap_or_else(|| "never".into()),
                    d.last_error.as_deref().unwrap_or("-").replace(['\n', '\t'], " ")
                );
            }
        }
        AdminOutcome::EduQueued { destination } => println!("queued for {destination}"),
        AdminOutcome::Appservices { now_ms, services } => {
            use weft_services::federation_queue::describe_ms_from_now as when;
            if services.is_empty() {
                println!("no application services registered ([appservice] registration_files)");
            }
            for s in services {
                println!("{}", s.id);
                println!("  file\t{}", s.file);
                println!("  url\t{}", s.url.as_deref().unwrap_or("(none: no traffic)"));
                println!("  sender\t{}", s.sender);
                for (kind, list) in [("users", &s.users), ("aliases", &s.aliases), ("rooms", &s.rooms)] {
                    for re in list.iter() {
                        println!("  {kind}\t{re}");
                    }
                }
                println!("  rate_limited\t{}", s.rate_limited);
                println!("  ephemeral\t{}", s.ephemeral);
                match &s.state {
                    Some(st) => {
                        println!("  position\t{}", st.position);
                        println!("  next_txn\t{}", st.next_txn);
                        println!(
                            "  pending\t{}",
                            st.pending
                                .as_ref()
                                .map(|(upto, _)| format!("transaction {} up to {upto}", st.next_txn))
                                .unwrap_or_else(|| "-".into())
                        );
                        println!("  backoff_ms\t{}", st.backoff_ms);
                        println!(
                            "  retry\t{}",
                            if st.retry_at_ms > *now_ms {
                                when(st.retry_at_ms, *now_ms)
                            } else {
                                "now".into()
                            }
                        );
                        println!(
                            "  last_success\t{}",
                            st.last_success_ms
                                .map(|t| when(t, *now_ms))
                                .unwrap_or_else(|| "never".into())
                        );
                        println!(
                            "  last_error\t{}",
                            st.last_error.as_deref().unwrap_or("-").replace(['\n', '\t'], " ")
                        );
                    }
                    None => println!("  position\t(not started yet)"),
                }
            }
        }
        AdminOutcome::TransactionAnswer { response, .. } => println!("{response}"),
        AdminOutcome::Psk {
            user_id,
            device_id,
            identity,
            key,
        } => {
            println!("identity {identity}");
            println!("key {key}");
            eprintln!("device {device_id} of {user_id}");
        }
    }
}
