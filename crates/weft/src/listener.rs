//! The HTTP listener: accepts TCP connections, admits at most
//! `[limits] max_connections_per_ip` open ones per client address (shared
//! with the MQTT listeners), and serves each with hyper's HTTP/1.1
//! connection (over TLS on the federation listener), which closes a
//! connection that takes longer than
//! `[limits] header_timeout_secs` to send a request's headers, or waits
//! that long idle for its next request.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use weft_services::{ConnectionPermit, Services};

/// Serves `app` on `listener` until `shutdown` completes, then lets open
/// requests finish (connections close once idle; WebSocket connections
/// are not waited for).
pub async fn serve(listener: TcpListener, app: Router, services: Arc<Services>, shutdown: impl Future<Output = ()>) {
    serve_with(listener, None, app, services, shutdown).await
}

/// [`serve`] over TLS (the federation listener): each connection's
/// handshake must end within `[limits] header_timeout_secs`, in the
/// connection's own task.
pub async fn serve_tls(
    listener: TcpListener,
    tls: TlsAcceptor,
    app: Router,
    services: Arc<Services>,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(listener, Some(tls), app, services, shutdown).await
}

async fn serve_with(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    services: Arc<Services>,
    shutdown: impl Future<Output = ()>,
) {
    let header_timeout = Duration::from_secs(services.config.limits.header_timeout_secs.max(1));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    // Connections watch this to start a graceful close; when all of them
    // have dropped their receivers, they are done.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // E.g. out of file descriptors: wait rather than spin.
                    tracing::warn!("http: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(permit) = services.connections.try_open(peer.ip()) else {
            tracing::debug!(
                "http: {} connections open from {}; closing a new one",
                services.connections.max_per_ip(),
                peer.ip()
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        let stop = stop_rx.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    serve_connection(
                        Counted {
                            stream,
                            _permit: permit,
                        },
                        builder,
                        service,
                        stop,
                        peer,
                    )
                    .await
                }
                Some(tls) => match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        serve_connection(
                            Counted {
                                stream,
                                _permit: permit,
                            },
                            builder,
                            service,
                            stop,
                            peer,
                        )
                        .await
                    }
                    Ok(Err(e)) => tracing::debug!("https: TLS handshake with {peer}: {e}"),
                    Err(_) => tracing::debug!("https: TLS handshake with {peer} timed out"),
                },
            }
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
}

/// Serves one connection until it ends, or closes it gracefully once
/// `stop` turns true. The permit travels with the socket, into a
/// WebSocket too.
async fn serve_connection<S, F>(
    io: Counted<S>,
    builder: hyper::server::conn::http1::Builder,
    service: F,
    mut stop: watch::Receiver<bool>,
    peer: std::net::SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: hyper::service::Service<hyper::Request<Incoming>, Response = axum::response::Response> + Send + 'static,
    F::Future: Send + 'static,
    F::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::trace!("http: connection from {peer}: {e}");
            }
            return;
        }
        _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

/// A connection's socket (plain or TLS) holding its per-address slot.
struct Counted<S = TcpStream> {
    stream: S,
    _permit: ConnectionPermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Raises the soft limit on open files to the hard limit, so the
/// connection caps, not the usual soft default of 1024, bound the
/// connections served. Returns the soft limit in force.
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every unix
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return None;
            }
            if lim.rlim_cur < lim.rlim_max {
                let wanted = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                    lim.rlim_cur = lim.rlim_max;
                }
            }
        }
        Some(lim.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    None
}
