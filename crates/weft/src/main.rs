//! `weft`: the Matrix homeserver and IoT platform binary. `weft serve`
//! runs the server; `weft user …` administers accounts in a data directory
//! (through the running server's admin socket when there is one).

mod admin;

mod listener;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use weft_core::Config;
use weft_core::config::DEFAULT_CONFIG_TOML;
use weft_services::Services;

#[derive(Parser)]
#[command(name = "weft", version, about = "Weft: a Matrix homeserver and IoT platform")]
struct Cli {
    /// Data directory: config (weft.toml), signing key, database.
    #[arg(long, global = true, env = "WEFT_DATA_DIR", default_value = "./weft-data")]
    data_dir: PathBuf,
    /// Config file (default: weft.toml in the data directory).
    #[arg(long, global = true, env = "WEFT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (creates the data directory on first run).
    Serve {
        /// Address to listen on (overrides `listen` in the config).
        #[arg(long)]
        listen: Option<String>,
        /// Server name (overrides `server_name`; choose before making users).
        #[arg(long)]
        server_name: Option<String>,
    },
    /// Manage user accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Reports of events and users sent by clients.
    #[command(subcommand)]
    Report(ReportCommand),
    /// The media repository (docs/media.md).
    #[command(subcommand)]
    Media(MediaCommand),
    /// Federation (docs/federation.md); needs the running server.
    #[command(subcommand)]
    Federation(FederationCommand),
    /// Application services (docs/appservices.md).
    #[command(subcommand)]
    Appservice(AppserviceCommand),
    /// Copy this data directory's SQLite database into an empty PostgreSQL
    /// database (docs/scale-out.md "Moving an embedded deployment"). The
    /// server must be stopped; the SQLite file is left as it was.
    MigrateFromSqlite {
        /// The PostgreSQL database to fill:
        /// postgres://user:password@host:port/database (default: the
        /// configured `database.url`, e.g. WEFT_DATABASE__URL, which keeps
        /// the password off the command line).
        #[arg(long)]
        to: Option<String>,
    },
}

#[derive(Subcommand)]
enum AppserviceCommand {
    /// The registered services (from `[appservice] registration_files`):
    /// URL, sender, namespaces, and delivery state (stream position,
    /// pending transaction, backoff, last error).
    List,
}

#[derive(Subcommand)]
enum FederationCommand {
    /// The outgoing queue per destination: queued PDUs and EDUs, current
    /// backoff, next try, last error, last success.
    Destinations,
    /// Queue an EDU for a server (content as JSON), sent like any other.
    #[command(hide = true)]
    QueueEdu {
        destination: String,
        edu_type: String,
        content: String,
    },
    /// Send one signed transaction (`{"pdus": [...], "edus": [...]}`) with
    /// this ID to a server now, outside the queue; prints its answer.
    #[command(hide = true)]
    SendTransaction {
        destination: String,
        txn_id: String,
        body: String,
    },
}

#[derive(Subcommand)]
enum MediaCommand {
    /// List media items, newest first: mxc URI, uploader, time (ms), size,
    /// type, name, and `quarantined` when so.
    List {
        /// Only this user's uploads.
        #[arg(long)]
        user: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Items, bytes, distinct files on disk, thumbnails.
    Stats,
    /// Delete media items (and their thumbnails and files) created more
    /// than a time ago (`30d`, `12h`, `90m`, `45s`), or all of one user's
    /// uploads, or one user's older ones.
    Purge {
        #[arg(long, value_parser = parse_age)]
        older_than: Option<u64>,
        #[arg(long)]
        user: Option<String>,
    },
    /// Quarantine a media item (`mxc://server/id` or its ID): no one can
    /// download it any more; `--release` undoes it.
    Quarantine {
        media: String,
        #[arg(long)]
        release: bool,
    },
}

/// `30d`, `12h`, `90m`, `45s` (or plain seconds) as milliseconds.
fn parse_age(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30d, 12h, 90m or 45s"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?} (use d, h, m or s)")),
    };
    Ok(n.saturating_mul(secs).saturating_mul(1000))
}

#[derive(Subcommand)]
enum ReportCommand {
    /// List reports, newest first: id, time (ms), reporter, what is
    /// reported (room and event, or user), reason.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user.
    Create {
        name: String,
        #[arg(long)]
        password: String,
        /// Make the user a server admin.
        #[arg(long)]
        admin: bool,
    },
    /// List users.
    List,
    /// Set a new password.
    ResetPassword {
        name: String,
        #[arg(long)]
        password: String,
    },
    /// Deactivate a user: no more logins, all devices logged out.
    Deactivate { name: String },
    /// Issue an access token for a new (or named) device of a user, e.g.
    /// for a sensor that cannot log in itself. The token belongs to that
    /// device alone; naming an existing device replaces its token.
    Token {
        name: String,
        #[arg(long)]
        device_id: Option<String>,
    },
    /// List a user's devices (device ID, display name, last seen).
    Devices { name: String },
    /// Revoke one device: its access token stops working at once, and its
    /// end-to-end keys and pending to-device messages are deleted.
    Revoke { name: String, device_id: String },
    /// Mint a DTLS pre-shared key for a new (or named) device of a user,
    /// for the CoAP door's DTLS listener (`coap-client -u IDENTITY -k KEY
    /// coaps://…`). Prints the identity and the key; minting again for the
    /// same device replaces its key. Deleting the device revokes it.
    Psk {
        name: String,
        #[arg(long)]
        device_id: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    tune_malloc();
    private_files();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
                .unwrap_or_else(|_| "weft=info,rustls=error,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve { listen, server_name } => {
                serve(&cli.data_dir, cli.config, listen, server_name, started).await
            }
            Command::User(cmd) => user(&cli.data_dir, cli.config, cmd).await,
            Command::Media(cmd) => {
                use weft_services::admin::AdminCommand as A;
                let command = match cmd {
                    MediaCommand::List { user, limit } => A::MediaList { user, limit },
                    MediaCommand::Stats => A::MediaStats,
                    MediaCommand::Purge { older_than, user } => A::MediaPurge {
                        older_than_ms: older_than,
                        user,
                    },
                    MediaCommand::Quarantine { media, release } => A::MediaQuarantine { media, release },
                };
                admin_command(&cli.data_dir, cli.config, command).await
            }
            Command::Federation(cmd) => {
                use weft_services::admin::AdminCommand as A;
                let command = match cmd {
                    FederationCommand::Destinations => A::FederationDestinations,
                    FederationCommand::QueueEdu {
                        destination,
                        edu_type,
                        content,
                    } => A::FederationQueueEdu {
                        destination,
                        edu_type,
                        content,
                    },
                    FederationCommand::SendTransaction {
                        destination,
                        txn_id,
                        body,
                    } => A::FederationSendTransaction {
                        destination,
                        txn_id,
                        body,
                    },
                };
                // The queue lives in the running server: never opened here.
                let outcome = admin::run(&cli.data_dir, command, || {
                    anyhow::bail!(
                        "no weft server is running on {}: start it first",
                        cli.data_dir.display()
                    )
                })
                .await?;
                admin::print(&outcome);
                Ok(())
            }
            Command::Appservice(AppserviceCommand::List) => {
                admin_command(
                    &cli.data_dir,
                    cli.config,
                    weft_services::admin::AdminCommand::AppserviceList,
                )
                .await
            }
            Command::MigrateFromSqlite { to } => migrate_from_sqlite(&cli.data_dir, cli.config, to).await,
            Command::Report(ReportCommand::List { limit }) => {
                admin_command(
                    &cli.data_dir,
                    cli.config,
                    weft_services::admin::AdminCommand::Reports { limit },
                )
                .await
            }
        }
    })
}

/// glibc raises its mmap threshold after the first large free, after which
/// argon2's 19 MiB buffers stay in the heap for good; a fixed threshold
/// hands them back to the kernel. Fewer arenas than glibc's default (8 per
/// core) keep idle memory small, but not too few: with 2, threads waited
/// on the arena locks for about a fifth of the server's CPU under fan-out
/// (a profile on PostgreSQL), and 8 measured the same idle and loaded RSS
/// as 2 with 12–30% more sends/s. (mimalloc was as fast but took 40–55 MB
/// more memory idle.)
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 8);
    }
}

/// Everything this process creates (data directory, database and its WAL,
/// keys, certificates) is readable by its owner only: the umask is 077.
fn private_files() {
    #[cfg(unix)]
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// Takes away group and other access from a data directory and the
/// secrets in it that an older version created readable by all: the
/// directory, the database with its WAL and shared-memory files, the
/// signing key, the `tls/` directory and the private keys in it.
fn tighten_permissions(data_dir: &Path, config: &Config) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let tighten = |path: &Path, mode: u32| -> anyhow::Result<()> {
            match std::fs::metadata(path) {
                Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                        .with_context(|| format!("restricting access to {}", path.display()))?;
                    tracing::info!("restricted {} to mode {mode:o}", path.display());
                }
                _ => {}
            }
            Ok(())
        };
        tighten(data_dir, 0o700)?;
        let db = config.sqlite_file(data_dir);
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut name = db.clone().into_os_string();
            name.push(suffix);
            tighten(Path::new(&name), 0o600)?;
        }
        tighten(&data_dir.join("signing.key"), 0o600)?;
        let tls = data_dir.join("tls");
        tighten(&tls, 0o700)?;
        if let Ok(entries) = std::fs::read_dir(&tls) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "key") {
                    tighten(&entry.path(), 0o600)?;
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (data_dir, config);
    Ok(())
}

/// Loads the config, creating the data directory and a commented config
/// file on first run. Returns whether this was the first run.
fn prepare(
    data_dir: &Path,
    config: Option<PathBuf>,
    listen: Option<String>,
    server_name: Option<String>,
    create: bool,
) -> anyhow::Result<(Config, bool)> {
    let config_path = config.unwrap_or_else(|| data_dir.join("weft.toml"));
    let mut first_run = false;
    if !data_dir.exists() {
        if !create {
            bail!(
                "data directory {} does not exist; start the server once with `weft serve` to create it",
                data_dir.display()
            );
        }
        std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        first_run = true;
    }
    if !config_path.exists() && create {
        let mut text = DEFAULT_CONFIG_TOML.to_owned();
        if let Some(name) = &server_name {
            text = text.replace("server_name = \"localhost:8008\"", &format!("server_name = {name:?}"));
        }
        std::fs::write(&config_path, text).with_context(|| format!("writing {}", config_path.display()))?;
    }
    let mut config = Config::load(&config_path).map_err(anyhow::Error::msg)?;
    if let Some(l) = listen {
        config.listen = l;
    }
    if let Some(n) = server_name {
        config.server_name = n;
    }
    tighten_permissions(data_dir, &config)?;
    Ok((config, first_run))
}

fn open_services(data_dir: &Path, mut config: Config) -> anyhow::Result<Arc<Services>> {
    // Registration files: relative paths are in the data directory.
    for file in &mut config.appservice.registration_files {
        if Path::new(file.as_str()).is_relative() {
            *file = data_dir.join(file.as_str()).display().to_string();
        }
    }
    let key = weft_rooms::keys::load_or_create(data_dir).map_err(anyhow::Error::msg)?;
    let store = weft_store::open(&config, data_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let blobs = weft_services::media::open_blobs(&config, data_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    Services::new(config, store, key, blobs).map_err(|e| anyhow::anyhow!("{e}"))
}

async fn serve(
    data_dir: &Path,
    config: Option<PathBuf>,
    listen: Option<String>,
    server_name: Option<String>,
    started: Instant,
) -> anyhow::Result<()> {
    let (mut config, first_run) = prepare(data_dir, config, listen, server_name, true)?;
    // One server per data directory, for its whole life (see admin.rs).
    let _lock = admin::lock_for_serve(data_dir).await?;
    let open_files = listener::raise_open_file_limit();
    if let Some(n) = open_files
        && config.limits.max_connections_per_ip as u64 > n / 2
    {
        tracing::warn!(
            "the open-file limit is {n}: one address may hold {} connections ([limits] max_connections_per_ip)",
            config.limits.max_connections_per_ip
        );
    }
    let listen_addr = config.listen.clone();
    let server_name = config.server_name.clone();
    let listener = tokio::net::TcpListener::bind(&listen_addr)
        .await
        .with_context(|| format!("cannot listen on {listen_addr}"))?;
    let addr = listener.local_addr()?;
    // Advertise the address actually bound (port 0 picks one).
    config.listen = addr.to_string();
    // CoAP over DTLS with per-device pre-shared keys (`weft user psk`) or a
    // certificate. The address actually bound is advertised in the CoAP
    // `/versions` (MSC3079).
    let coaps_socket = if config.coap.enabled && config.coap.dtls_enabled {
        let dtls_listen = config.coap.dtls_listen.clone();
        let socket = tokio::net::UdpSocket::bind(&dtls_listen).await.with_context(|| {
            format!(
                "cannot listen for CoAP over DTLS on {dtls_listen} (set [coap] dtls_listen or dtls_enabled = false)"
            )
        })?;
        config.coap.dtls_listen = socket.local_addr()?.to_string();
        // The certificate for clients without a pre-shared key.
        let cert = weft_coap::dtls::load_certificate(data_dir, &config).map_err(|e| {
            anyhow::anyhow!("CoAP over DTLS: {e} (set [coap] dtls_cert/dtls_key or dtls_enabled = false)")
        })?;
        Some((socket, cert))
    } else {
        None
    };
    let services = open_services(data_dir, config)?;
    // The TLS federation listener (the Server-Server API).
    let federation = federation_listener(data_dir, &services).await?;
    // Push: evaluation of push rules and delivery to push gateways.
    services.start_push();
    // Federation: the outgoing queue's reader and senders.
    services
        .start_federation_queue()
        .await
        .map_err(|e| anyhow::anyhow!("federation queue: {e}"))?;
    // Application services: each one's delivery task (its position stored
    // first, so nothing sent from now on is missed).
    services
        .start_appservices()
        .await
        .map_err(|e| anyhow::anyhow!("application services: {e}"))?;
    let admin_socket = admin::AdminSocket::start(data_dir, services.clone()).await?;
    let mut app = weft_http::router(services.clone());
    // The MQTT door (TCP, TLS, and WebSocket on this HTTP listener), one
    // broker for all three, sharing the same services.
    let mqtt_config = services.config.mqtt.clone();
    let mqtt = mqtt_config.enabled.then(|| weft_mqtt::Mqtt::new(services.clone()));
    if let Some(mqtt) = &mqtt
        && mqtt_config.ws_enabled
    {
        app = app.merge(mqtt.ws_router());
    }
    // The CoAP+CBOR door (UDP), sharing the same services.
    let coap_socket = if services.config.coap.enabled {
        let coap_listen = services.config.coap.listen.clone();
        let socket = tokio::net::UdpSocket::bind(&coap_listen).await.with_context(|| {
            format!("cannot listen for CoAP on {coap_listen} (set [coap] listen or enabled = false)")
        })?;
        Some(socket)
    } else {
        None
    };
    if first_run {
        println!(
            "weft: created data directory {} (config weft.toml, signing key, database)",
            data_dir.display()
        );
    }
    println!("weft: server name {server_name}, data in {}", data_dir.display());
    // Printed before the HTTP line, which tells a launcher start-up is
    // done.
    if let Some((listener, tls, files)) = federation {
        println!("weft: federation listening on https://{}", listener.local_addr()?);
        println!(
            "weft: federation tls certificate {}{}",
            files.cert_path.display(),
            if files.self_signed { " (self-signed)" } else { "" }
        );
        let router = weft_api::federation_router(&services);
        // It stops with the process; open federation requests are not
        // waited for.
        tokio::spawn(listener::serve_tls(
            listener,
            tls,
            router,
            services.clone(),
            std::future::pending(),
        ));
    }
    println!("weft listening on http://{addr}");
    println!("weft: admin socket {}", admin_socket.path().display());
    // Typing and presence timeouts.
    services.start_ephemeral_expiry();
    // Revocations written by other processes end this one's connections.
    services.start_revocation_follower();
    if let Some(socket) = coap_socket {
        println!("weft: coap listening on {}", socket.local_addr()?);
        tokio::spawn(weft_coap::serve(services.clone(), socket));
    }
    if let Some((socket, cert)) = coaps_socket {
        println!("weft: coap dtls listening on {}", socket.local_addr()?);
        if let Some(why) = &cert.fallback {
            println!("weft: coap dtls: {why}; using the generated certificate");
        }
        println!(
            "weft: coap dtls certificate {}{}",
            cert.cert_path.display(),
            if cert.self_signed { " (self-signed)" } else { "" }
        );
        tokio::spawn(weft_coap::dtls::serve_dtls(services.clone(), socket, cert));
    }
    // The exact path of this binary, so the hint works under `cargo run` too.
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "weft".into());
    println!(
        "weft: create a user with: {exe} user create alice --password 'choose-a-password' --data-dir {}",
        data_dir.display()
    );
    println!(
        "weft: then point any Matrix client at http://{addr} (ready in {} ms)",
        started.elapsed().as_millis()
    );
    if let Some(mqtt) = &mqtt {
        let hosts = weft_services::tls::certificate_hosts(&services.config);
        serve_mqtt(mqtt.clone(), &mqtt_config, data_dir, &hosts, addr).await?;
    }
    let mqtt_on_signal = mqtt.clone();
    let shutdown = async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing SIGTERM handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        // MQTT connections end (storing their sessions) while HTTP drains.
        if let Some(mqtt) = mqtt_on_signal {
            mqtt.begin_shutdown();
        }
    };
    listener::serve(listener, app, services.clone(), shutdown).await;
    // MQTT connections store their sessions before the process ends.
    if let Some(mqtt) = &mqtt {
        mqtt.shutdown(std::time::Duration::from_secs(5)).await;
    }
    // Removes the socket file; the lock goes with the process.
    drop(admin_socket);
    Ok(())
}

/// Binds the federation listener (`[federation] listen`, TLS with
/// `tls_cert`/`tls_key` or the generated pair), unless federation is off or
/// `listen` is empty. Warns when outgoing certificate checks are off.
async fn federation_listener(
    data_dir: &Path,
    services: &Services,
) -> anyhow::Result<
    Option<(
        tokio::net::TcpListener,
        tokio_rustls::TlsAcceptor,
        weft_services::tls::CertFiles,
    )>,
> {
    let c = &services.config.federation;
    if !c.enabled {
        return Ok(None);
    }
    if !c.verify_certificates {
        tracing::warn!(
            "[federation] verify_certificates = false: other servers' TLS certificates are not checked (tests and local interop only)"
        );
    }
    if c.listen.is_empty() {
        return Ok(None);
    }
    let hosts = weft_services::tls::certificate_hosts(&services.config);
    let files = weft_services::tls::cert_files(data_dir, c.tls_cert.as_deref(), c.tls_key.as_deref(), &hosts)
        .map_err(|e| anyhow::anyhow!("federation TLS: {e} (set [federation] tls_cert and tls_key, or neither)"))?;
    let tls = weft_mqtt::tls::acceptor(&files.cert_path, &files.key_path)
        .map_err(|e| anyhow::anyhow!("federation TLS: {e} (set [federation] tls_cert/tls_key)"))?;
    let listener = tokio::net::TcpListener::bind(&c.listen).await.with_context(|| {
        format!(
            "cannot listen for federation on {} (set [federation] listen, \"\" for none, or enabled = false)",
            c.listen
        )
    })?;
    Ok(Some((listener, tls, files)))
}

/// Starts the MQTT door's TCP and TLS listeners and prints where they (and
/// MQTT over WebSocket) are.
async fn serve_mqtt(
    mqtt: weft_mqtt::Mqtt,
    c: &weft_core::config::MqttConfig,
    data_dir: &Path,
    // The names a generated certificate is made for.
    hosts: &[String],
    http: SocketAddr,
) -> anyhow::Result<()> {
    if !c.listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&c.listen).await.with_context(|| {
            format!(
                "cannot listen for MQTT on {} (set [mqtt] listen, \"\" for no plain TCP, or enabled = false)",
                c.listen
            )
        })?;
        println!("weft: mqtt listening on {}", listener.local_addr()?);
        tokio::spawn(mqtt.clone().serve_tcp(listener));
    }
    if c.tls_enabled {
        let tls = weft_mqtt::tls::load_or_generate(data_dir, c.tls_cert.as_deref(), c.tls_key.as_deref(), hosts)
            .map_err(|e| anyhow::anyhow!("MQTT over TLS: {e} (set [mqtt] tls_cert/tls_key or tls_enabled = false)"))?;
        let listener = tokio::net::TcpListener::bind(&c.tls_listen).await.with_context(|| {
            format!(
                "cannot listen for MQTT over TLS on {} (set [mqtt] tls_listen or tls_enabled = false)",
                c.tls_listen
            )
        })?;
        println!("weft: mqtt tls listening on {}", listener.local_addr()?);
        println!(
            "weft: mqtt tls certificate {}{}",
            tls.cert_path.display(),
            if c.tls_cert.is_none() {
                " (self-signed: clients take it as their CA file, e.g. mosquitto_sub --cafile)"
            } else {
                ""
            }
        );
        tokio::spawn(mqtt.clone().serve_tls(listener, tls.acceptor));
    }
    if c.ws_enabled {
        println!("weft: mqtt websocket on ws://{http}{}", weft_mqtt::WS_PATH);
    }
    Ok(())
}

async fn user(data_dir: &Path, config: Option<PathBuf>, cmd: UserCommand) -> anyhow::Result<()> {
    use weft_services::admin::AdminCommand;
    let command = match cmd {
        UserCommand::Create { name, password, admin } => AdminCommand::CreateUser { name, password, admin },
        UserCommand::List => AdminCommand::ListUsers,
        UserCommand::ResetPassword { name, password } => AdminCommand::ResetPassword { name, password },
        UserCommand::Deactivate { name } => AdminCommand::Deactivate { name },
        UserCommand::Token { name, device_id } => AdminCommand::Token { name, device_id },
        UserCommand::Devices { name } => AdminCommand::Devices { name },
        UserCommand::Revoke { name, device_id } => AdminCommand::Revoke { name, device_id },
        UserCommand::Psk { name, device_id } => AdminCommand::Psk { name, device_id },
    };
    admin_command(data_dir, config, command).await
}

/// Runs an admin command through the running server, or on the database
/// when none runs.
async fn admin_command(
    data_dir: &Path,
    config: Option<PathBuf>,
    command: weft_services::admin::AdminCommand,
) -> anyhow::Result<()> {
    let outcome = admin::run(data_dir, command, || {
        let (config, _) = prepare(data_dir, config, None, None, true)?;
        open_services(data_dir, config)
    })
    .await?;
    admin::print(&outcome);
    Ok(())
}

/// `weft migrate-from-sqlite`: holds the data directory's lock (so no
/// server runs on the SQLite database, nor starts, during the copy) and
/// copies the database into the empty PostgreSQL one at `to` (or the
/// configured `database.url`).
async fn migrate_from_sqlite(data_dir: &Path, config: Option<PathBuf>, to: Option<String>) -> anyhow::Result<()> {
    let (config, _) = prepare(data_dir, config, None, None, false)?;
    let Some(url) = to.or_else(|| config.database.url.clone()) else {
        bail!(
            "give the PostgreSQL database to fill: --to postgres://user:password@host:port/database (or set database.url)"
        );
    };
    let _lock = admin::lock_for_migration(data_dir).await?;
    let sqlite = config.sqlite_file(data_dir);
    println!(
        "weft: copying {} into PostgreSQL (one transaction: all or nothing)",
        sqlite.display()
    );
    let started = Instant::now();
    let (src, to) = (sqlite.clone(), url);
    // The PostgreSQL client runs its own runtime: not on one of tokio's threads.
    let report = std::thread::spawn(move || {
        weft_store::migrate::migrate_sqlite_to_postgres(&src, &to, &mut |line| println!("{line}"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the migration panicked"))?
    .map_err(|e| anyhow::anyhow!("migration refused or failed, nothing was written: {}", e.message))?;
    println!(
        "weft: copied {} rows of {} tables in {} ms; the stream continues at position {}",
        report.rows,
        report.tables.len(),
        started.elapsed().as_millis(),
        report.stream_head
    );
    if report.search_skipped > 0 {
        println!(
            "weft: {} search index entries had no text left in their event and were not copied",
            report.search_skipped
        );
    }
    println!(
        "weft: done. Now set in the config file (or the environment):\n  [database]\n  backend = \"postgres\"\n  url = \"<the URL you migrated to>\"\n\
         and start `weft serve` again; {} stays as it was (a backup: do not serve it again).",
        sqlite.display()
    );
    if config.media.backend == "fs" {
        println!(
            "weft: media files stay in {} (media.backend = \"fs\"): every process serving this database needs them there (docs/scale-out.md)",
            data_dir.join("media").display()
        );
    }
    Ok(())
}
