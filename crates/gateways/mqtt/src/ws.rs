//! MQTT over WebSocket on the HTTP listener: `GET /mqtt` with the
//! subprotocol `mqtt` (or `mqttv3.1`). MQTT bytes travel in binary
//! messages; a packet may span messages and a message may hold several
//! packets, so the WebSocket is turned back into a byte stream ([`WsIo`])
//! and served by the same connection code as TCP and TLS.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{MAX_CONNECTIONS, MAX_PACKET, Mqtt};

/// The path of MQTT over WebSocket (the common broker convention).
pub const WS_PATH: &str = "/mqtt";

/// Subprotocols accepted, in order of preference (`mqttv3.1` is what some
/// MQTT 3.1 clients send).
const PROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Largest WebSocket message: a few packets' worth (one message may hold
/// several packets); each packet is still held to [`MAX_PACKET`].
const MAX_MESSAGE: usize = 4 * MAX_PACKET;

impl Mqtt {
    /// The `GET /mqtt` route, to merge into the HTTP application.
    pub fn ws_router(&self) -> Router {
        Router::new().route(WS_PATH, get(upgrade)).with_state(self.clone())
    }
}

async fn upgrade(State(mqtt): State<Mqtt>, req: Request) -> Response {
    let (mut parts, _body) = req.into_parts();
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let ws = ws.protocols(PROTOCOLS);
    if ws.selected_protocol().is_none() {
        return (
            StatusCode::BAD_REQUEST,
            "MQTT over WebSocket needs the subprotocol `mqtt` (Sec-WebSocket-Protocol: mqtt)\n",
        )
            .into_response();
    }
    let Some(slot) = mqtt.slot() else {
        tracing::warn!("mqtt: {MAX_CONNECTIONS} connections open; refusing a WebSocket from {peer:?}");
        return (StatusCode::SERVICE_UNAVAILABLE, "too many MQTT connections\n").into_response();
    };
    ws.max_message_size(MAX_MESSAGE)
        .max_frame_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move { mqtt.serve_in_slot(WsIo::new(socket), peer, slot).await })
}

/// A WebSocket as a byte stream: binary messages in, one binary message
/// per write out. Text messages are a protocol error (MQTT 6.0); a close
/// message or the end of the socket is the end of the stream.
pub struct WsIo {
    ws: WebSocket,
    /// The rest of the last binary message not yet read.
    rest: Bytes,
}

impl WsIo {
    pub fn new(ws: WebSocket) -> Self {
        WsIo { ws, rest: Bytes::new() }
    }
}

fn ws_error(e: axum::Error) -> io::Error {
    io::Error::other(e)
}

impl AsyncRead for WsIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.rest.is_empty() {
                let n = this.rest.len().min(buf.remaining());
                buf.put_slice(&this.rest.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.rest = data,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket takes binary messages only",
                    )));
                }
                // Pings are answered by the WebSocket itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            }
        }
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_error)?;
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(data)))
            .map_err(ws_error)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_flush(cx).map_err(ws_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_close(cx).map_err(ws_error)
    }
}
