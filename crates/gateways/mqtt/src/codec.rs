//! Wire format: framing and the two protocol versions behind one small set
//! of types. Encoding and decoding of the packets themselves is rumqttc's
//! (`mqttbytes::v4` for MQTT 3.1.1, `v5::mqttbytes::v5` for MQTT 5); this
//! module only picks the version from the CONNECT, normalises packets into
//! [`In`] and writes [`Out`] in the connection's version. The reason codes
//! for failures are chosen here too, in [`refusal`] and the `encode` arms,
//! the one place where `weft_core::ErrorKind` becomes MQTT.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::{self as mb, QoS};
use rumqttc::v5::mqttbytes::QoS as V5QoS;
use rumqttc::v5::mqttbytes::v5;
use weft_core::{Error, ErrorKind};

/// Largest packet accepted (fixed header excluded). A Matrix event is at
/// most 64 KiB, so this leaves room for topic and properties.
pub const MAX_PACKET: usize = 128 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// Why something was refused, before it becomes a version's reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadCredentials,
    ClientIdInvalid,
    NotAuthorized,
    TopicInvalid,
    PayloadInvalid,
    /// The event would be over the spec's 64 KiB limit.
    TooLarge,
    Quota,
    Unspecified,
}

/// The one mapping from the services' errors to MQTT failures.
pub fn refusal(e: &Error) -> Refusal {
    match e.kind {
        ErrorKind::Forbidden
        | ErrorKind::UnknownToken { .. }
        | ErrorKind::MissingToken
        | ErrorKind::UserDeactivated
        | ErrorKind::Exclusive => Refusal::NotAuthorized,
        ErrorKind::NotFound | ErrorKind::InvalidParam | ErrorKind::MissingParam => Refusal::TopicInvalid,
        ErrorKind::NotJson | ErrorKind::BadJson => Refusal::PayloadInvalid,
        ErrorKind::TooLarge => Refusal::TooLarge,
        ErrorKind::LimitExceeded { .. } => Refusal::Quota,
        _ => Refusal::Unspecified,
    }
}

/// A CONNECT, either version.
#[derive(Debug)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    pub keep_alive: u16,
    /// 3.1.1 clean session / 5 clean start: start without an earlier session.
    pub clean: bool,
    /// Whether the session outlives the connection: 3.1.1 without clean
    /// session; 5 with a session expiry interval above 0.
    pub keep_session: bool,
    /// How long a kept session outlives the connection, in seconds; `None`:
    /// until a clean start (3.1.1, or MQTT 5's 0xFFFFFFFF).
    pub session_expiry: Option<u32>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<Will>,
    /// MQTT 5 Receive Maximum: QoS 1/2 publishes the client accepts
    /// unacknowledged at once (3.1.1 has no such limit).
    pub receive_max: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
}

/// A packet from the client after CONNECT.
#[derive(Debug)]
pub enum In {
    Publish {
        topic: String,
        qos: u8,
        pkid: u16,
        payload: Bytes,
    },
    PubAck(u16),
    PubRec(u16),
    /// MQTT 5: a PUBREC with a failure reason code; the flow ends there.
    PubRecFailed(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        /// MQTT 5 "disconnect with will message".
        send_will: bool,
        /// MQTT 5: a new session expiry interval (0: the session ends now).
        session_expiry: Option<u32>,
    },
    /// A packet a server never receives (CONNACK, SUBACK, a second CONNECT…).
    Unexpected,
}

/// A packet to the client.
#[derive(Debug)]
pub enum Out {
    ConnAck {
        session_present: bool,
        result: Result<(), Refusal>,
        /// MQTT 5: the ID assigned to a client that sent an empty one.
        assigned_id: Option<String>,
    },
    ConnAckBadVersion,
    PubAck {
        pkid: u16,
        result: Result<(), Refusal>,
    },
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    SubAck {
        pkid: u16,
        results: Vec<Result<u8, Refusal>>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    Publish {
        topic: String,
        qos: u8,
        pkid: u16,
        retain: bool,
        /// A resend of a message with the same packet ID (after a reconnect).
        dup: bool,
        payload: Bytes,
    },
    /// MQTT 5 only (3.1.1 servers just close the connection).
    Disconnect(Refusal),
    /// MQTT 5 only: the connection is closed for a protocol-level reason.
    DisconnectProtocol(ProtocolFailure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolFailure {
    Malformed,
    TooLarge,
    ProtocolError,
    KeepAliveTimeout,
    TakenOver,
    ServerShuttingDown,
}

/// What came out of the read buffer.
pub enum Frame {
    Packet(BytesMut),
    /// Not enough bytes yet.
    Incomplete,
    TooLarge,
    Malformed,
}

/// Splits one whole packet off the front of `buf`, if there is one.
pub fn frame(buf: &mut BytesMut) -> Frame {
    // Packet types 0 and 15 do not exist: refuse garbage before waiting
    // for the rest of a "frame" it seems to announce.
    if buf.first().is_some_and(|b| matches!(b >> 4, 0 | 15)) {
        return Frame::Malformed;
    }
    match mb::check(buf.iter(), MAX_PACKET) {
        Ok(h) => Frame::Packet(buf.split_to(h.frame_length())),
        Err(mb::Error::InsufficientBytes(_)) => Frame::Incomplete,
        Err(mb::Error::PayloadSizeLimitExceeded(_)) => Frame::TooLarge,
        Err(_) => Frame::Malformed,
    }
}

fn qos_num(q: QoS) -> u8 {
    q as u8
}

fn qos5_num(q: V5QoS) -> u8 {
    q as u8
}

fn qos5_of(n: u8) -> V5QoS {
    match n {
        0 => V5QoS::AtMostOnce,
        1 => V5QoS::AtLeastOnce,
        _ => V5QoS::ExactlyOnce,
    }
}

fn qos_of(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The protocol level of a CONNECT frame: `None` if it is no CONNECT.
pub fn connect_level(frame: &[u8]) -> Option<u8> {
    if frame.first()? >> 4 != 1 {
        return None;
    }
    // Skip the remaining-length varint.
    let mut i = 1;
    while *frame.get(i)? & 0x80 != 0 {
        i += 1;
    }
    i += 1;
    let name_len = u16::from_be_bytes([*frame.get(i)?, *frame.get(i + 1)?]) as usize;
    frame.get(i + 2 + name_len).copied()
}

/// Decodes the first packet, a CONNECT of either version.
pub fn decode_connect(mut frame: BytesMut) -> Result<Connect, mb::Error> {
    match connect_level(&frame) {
        Some(4) => match v4::Packet::read(&mut frame, MAX_PACKET)? {
            v4::Packet::Connect(c) => Ok(Connect {
                version: Version::V311,
                client_id: c.client_id,
                keep_alive: c.keep_alive,
                clean: c.clean_session,
                keep_session: !c.clean_session,
                session_expiry: None,
                username: c.login.as_ref().map(|l| l.username.clone()).filter(|u| !u.is_empty()),
                password: c.login.map(|l| l.password).filter(|p| !p.is_empty()),
                will: c.last_will.map(|w| Will {
                    topic: w.topic,
                    payload: w.message,
                }),
                receive_max: None,
            }),
            _ => Err(mb::Error::MalformedPacket),
        },
        Some(5) => {
            match v5::Packet::read(&mut frame, Some(MAX_PACKET as u32)).map_err(|_| mb::Error::MalformedPacket)? {
                v5::Packet::Connect(c, will, login) => Ok(Connect {
                    version: Version::V5,
                    client_id: c.client_id,
                    keep_alive: c.keep_alive,
                    clean: c.clean_start,
                    keep_session: c
                        .properties
                        .as_ref()
                        .and_then(|p| p.session_expiry_interval)
                        .is_some_and(|e| e > 0),
                    receive_max: c.properties.as_ref().and_then(|p| p.receive_maximum),
                    session_expiry: c
                        .properties
                        .as_ref()
                        .and_then(|p| p.session_expiry_interval)
                        .filter(|e| *e != u32::MAX),
                    username: login.as_ref().map(|l| l.username.clone()).filter(|u| !u.is_empty()),
                    password: login.map(|l| l.password).filter(|p| !p.is_empty()),
                    will: match will {
                        Some(w) => Some(Will {
                            topic: String::from_utf8(w.topic.to_vec()).map_err(|_| mb::Error::TopicNotUtf8)?,
                            payload: w.message,
                        }),
                        None => None,
                    },
                }),
                _ => Err(mb::Error::MalformedPacket),
            }
        }
        Some(level) => Err(mb::Error::InvalidProtocolLevel(level)),
        None => Err(mb::Error::NotConnect(mb::PacketType::Connect)),
    }
}

/// Decodes a packet after CONNECT.
pub fn decode(version: Version, mut frame: BytesMut) -> Result<In, mb::Error> {
    match version {
        Version::V311 => Ok(match v4::Packet::read(&mut frame, MAX_PACKET)? {
            v4::Packet::Publish(p) => In::Publish {
                topic: p.topic,
                qos: qos_num(p.qos),
                pkid: p.pkid,
                payload: p.payload,
            },
            v4::Packet::PubAck(p) => In::PubAck(p.pkid),
            v4::Packet::PubRec(p) => In::PubRec(p.pkid),
            v4::Packet::PubRel(p) => In::PubRel(p.pkid),
            v4::Packet::PubComp(p) => In::PubComp(p.pkid),
            v4::Packet::Subscribe(s) => In::Subscribe {
                pkid: s.pkid,
                filters: s.filters.into_iter().map(|f| (f.path, qos_num(f.qos))).collect(),
            },
            v4::Packet::Unsubscribe(u) => In::Unsubscribe {
                pkid: u.pkid,
                filters: u.topics,
            },
            v4::Packet::PingReq => In::PingReq,
            v4::Packet::Disconnect => In::Disconnect {
                send_will: false,
                session_expiry: None,
            },
            _ => In::Unexpected,
        }),
        Version::V5 => {
            // rumqttc refuses a DISCONNECT without reason code, which MQTT 5
            // allows (it means "normal disconnection").
            if frame[..] == [0xE0, 0x00] {
                return Ok(In::Disconnect {
                    send_will: false,
                    session_expiry: None,
                });
            }
            let packet =
                v5::Packet::read(&mut frame, Some(MAX_PACKET as u32)).map_err(|_| mb::Error::MalformedPacket)?;
            Ok(match packet {
                v5::Packet::Publish(p) => In::Publish {
                    topic: String::from_utf8(p.topic.to_vec()).map_err(|_| mb::Error::TopicNotUtf8)?,
                    qos: qos5_num(p.qos),
                    pkid: p.pkid,
                    payload: p.payload,
                },
                v5::Packet::PubAck(p) => In::PubAck(p.pkid),
                v5::Packet::PubRec(p) => match p.reason {
                    v5::PubRecReason::Success | v5::PubRecReason::NoMatchingSubscribers => In::PubRec(p.pkid),
                    _ => In::PubRecFailed(p.pkid),
                },
                v5::Packet::PubRel(p) => In::PubRel(p.pkid),
                v5::Packet::PubComp(p) => In::PubComp(p.pkid),
                v5::Packet::Subscribe(s) => In::Subscribe {
                    pkid: s.pkid,
                    filters: s.filters.into_iter().map(|f| (f.path, qos5_num(f.qos))).collect(),
                },
                v5::Packet::Unsubscribe(u) => In::Unsubscribe {
                    pkid: u.pkid,
                    filters: u.filters,
                },
                v5::Packet::PingReq(_) => In::PingReq,
                v5::Packet::Disconnect(d) => In::Disconnect {
                    send_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
                    session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
                },
                _ => In::Unexpected,
            })
        }
    }
}

/// Appends `out` to `buf` in the connection's version. Packets that a
/// version has no form for (a negative PUBACK or a DISCONNECT in 3.1.1) are
/// not written; the caller closes the connection instead.
pub fn encode(version: Version, out: Out, buf: &mut BytesMut) {
    let res = match version {
        Version::V311 => encode_v4(out, buf),
        Version::V5 => encode_v5(out, buf),
    };
    if let Err(e) = res {
        tracing::warn!("mqtt: cannot encode a packet: {e}");
    }
}

fn encode_v4(out: Out, buf: &mut BytesMut) -> Result<usize, mb::Error> {
    use v4::ConnectReturnCode as C;
    let packet = match out {
        Out::ConnAck {
            session_present,
            result,
            ..
        } => v4::Packet::ConnAck(v4::ConnAck::new(
            match result {
                Ok(()) => C::Success,
                Err(Refusal::BadCredentials) => C::BadUserNamePassword,
                Err(Refusal::NotAuthorized) => C::NotAuthorized,
                Err(Refusal::ClientIdInvalid) => C::BadClientId,
                Err(_) => C::ServiceUnavailable,
            },
            session_present && result.is_ok(),
        )),
        Out::ConnAckBadVersion => v4::Packet::ConnAck(v4::ConnAck::new(C::RefusedProtocolVersion, false)),
        Out::PubAck { pkid, result: Ok(()) } => v4::Packet::PubAck(v4::PubAck::new(pkid)),
        Out::PubAck { result: Err(_), .. } | Out::Disconnect(_) | Out::DisconnectProtocol(_) => return Ok(0),
        Out::PubRec(pkid) => v4::Packet::PubRec(v4::PubRec::new(pkid)),
        Out::PubRel(pkid) => v4::Packet::PubRel(v4::PubRel::new(pkid)),
        Out::PubComp(pkid) => v4::Packet::PubComp(v4::PubComp::new(pkid)),
        Out::SubAck { pkid, results } => v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            results
                .into_iter()
                .map(|r| match r {
                    Ok(q) => v4::SubscribeReasonCode::Success(qos_of(q)),
                    Err(_) => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Out::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
        Out::PingResp => v4::Packet::PingResp,
        Out::Publish {
            topic,
            qos,
            pkid,
            retain,
            dup,
            payload,
        } => {
            let mut p = v4::Publish::from_bytes(topic, qos_of(qos), payload);
            p.pkid = pkid;
            p.retain = retain;
            p.dup = dup;
            v4::Packet::Publish(p)
        }
    };
    packet.write(buf, usize::MAX)
}

/// Writes a DISCONNECT with its reason code and an empty property length.
/// MQTT 5 lets the property length be left out, but rumqttc cannot read
/// that form (nor write this one: it shortens it to `E0 00`).
fn write_disconnect5(reason: v5::DisconnectReasonCode, buf: &mut BytesMut) -> Result<usize, mb::Error> {
    buf.extend_from_slice(&[0xE0, 0x02, reason as u8, 0x00]);
    Ok(4)
}

fn encode_v5(out: Out, buf: &mut BytesMut) -> Result<usize, mb::Error> {
    use v5::ConnectReturnCode as C;
    let packet = match out {
        Out::ConnAck {
            session_present,
            result,
            assigned_id,
        } => {
            let properties = result.is_ok().then(|| v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: None,
                max_qos: None,
                retain_available: None,
                max_packet_size: Some(MAX_PACKET as u32),
                assigned_client_identifier: assigned_id,
                topic_alias_max: None,
                reason_string: None,
                user_properties: vec![],
                wildcard_subscription_available: None,
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            v5::Packet::ConnAck(v5::ConnAck {
                session_present: session_present && result.is_ok(),
                code: match result {
                    Ok(()) => C::Success,
                    Err(Refusal::BadCredentials) => C::BadUserNamePassword,
                    Err(Refusal::NotAuthorized) => C::NotAuthorized,
                    Err(Refusal::ClientIdInvalid) => C::ClientIdentifierNotValid,
                    Err(Refusal::TopicInvalid) => C::UnspecifiedError,
                    Err(Refusal::PayloadInvalid) => C::MalformedPacket,
                    Err(Refusal::TooLarge) => C::PacketTooLarge,
                    Err(Refusal::Quota) => C::QuotaExceeded,
                    Err(Refusal::Unspecified) => C::UnspecifiedError,
                },
                properties,
            })
        }
        Out::ConnAckBadVersion => v5::Packet::ConnAck(v5::ConnAck {
            session_present: false,
            code: C::UnsupportedProtocolVersion,
            properties: None,
        }),
        Out::PubAck { pkid, result } => v5::Packet::PubAck(v5::PubAck {
            pkid,
            reason: match result {
                Ok(()) => v5::PubAckReason::Success,
                Err(Refusal::NotAuthorized | Refusal::BadCredentials) => v5::PubAckReason::NotAuthorized,
                Err(Refusal::TopicInvalid) => v5::PubAckReason::TopicNameInvalid,
                Err(Refusal::PayloadInvalid) => v5::PubAckReason::PayloadFormatInvalid,
                // PUBACK has no "packet too large" (0x95 is for CONNACK and
                // DISCONNECT only; clients cannot even decode it here):
                // 0x83, "valid, but not accepted", documented as meaning an
                // event over 64 KiB.
                Err(Refusal::TooLarge) => v5::PubAckReason::ImplementationSpecificError,
                Err(Refusal::Quota) => v5::PubAckReason::QuotaExceeded,
                Err(Refusal::Unspecified | Refusal::ClientIdInvalid) => v5::PubAckReason::UnspecifiedError,
            },
            properties: None,
        }),
        Out::PubRec(pkid) => v5::Packet::PubRec(v5::PubRec::new(pkid, None)),
        Out::PubRel(pkid) => v5::Packet::PubRel(v5::PubRel::new(pkid, None)),
        Out::PubComp(pkid) => v5::Packet::PubComp(v5::PubComp::new(pkid, None)),
        Out::SubAck { pkid, results } => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: results
                .into_iter()
                .map(|r| match r {
                    Ok(q) => v5::SubscribeReasonCode::Success(qos5_of(q)),
                    Err(Refusal::NotAuthorized | Refusal::BadCredentials) => v5::SubscribeReasonCode::NotAuthorized,
                    Err(Refusal::TopicInvalid) => v5::SubscribeReasonCode::TopicFilterInvalid,
                    Err(Refusal::Quota) => v5::SubscribeReasonCode::QuotaExceeded,
                    Err(_) => v5::SubscribeReasonCode::Unspecified,
                })
                .collect(),
            properties: None,
        }),
        Out::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid,
            reasons: vec![v5::UnsubAckReason::Success; count],
            properties: None,
        }),
        Out::PingResp => v5::Packet::PingResp(v5::PingResp),
        Out::Publish {
            topic,
            qos,
            pkid,
            retain,
            dup,
            payload,
        } => {
            let mut p = v5::Publish::new(topic, qos5_of(qos), payload, None);
            p.pkid = pkid;
            p.retain = retain;
            p.dup = dup;
            v5::Packet::Publish(p)
        }
        Out::Disconnect(r) => {
            return write_disconnect5(
                match r {
                    Refusal::NotAuthorized | Refusal::BadCredentials => v5::DisconnectReasonCode::NotAuthorized,
                    Refusal::TopicInvalid => v5::DisconnectReasonCode::TopicNameInvalid,
                    Refusal::PayloadInvalid => v5::DisconnectReasonCode::PayloadFormatInvalid,
                    Refusal::TooLarge => v5::DisconnectReasonCode::PacketTooLarge,
                    Refusal::Quota => v5::DisconnectReasonCode::QuotaExceeded,
                    Refusal::Unspecified | Refusal::ClientIdInvalid => v5::DisconnectReasonCode::UnspecifiedError,
                },
                buf,
            );
        }
        Out::DisconnectProtocol(f) => {
            return write_disconnect5(
                match f {
                    ProtocolFailure::Malformed => v5::DisconnectReasonCode::MalformedPacket,
                    ProtocolFailure::TooLarge => v5::DisconnectReasonCode::PacketTooLarge,
                    ProtocolFailure::ProtocolError => v5::DisconnectReasonCode::ProtocolError,
                    ProtocolFailure::KeepAliveTimeout => v5::DisconnectReasonCode::KeepAliveTimeout,
                    ProtocolFailure::TakenOver => v5::DisconnectReasonCode::SessionTakenOver,
                    ProtocolFailure::ServerShuttingDown => v5::DisconnectReasonCode::ServerShuttingDown,
                },
                buf,
            );
        }
    };
    packet.write(buf, None).map_err(|_| mb::Error::MalformedPacket)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random and mutated packets never panic the decoders.
    #[test]
    fn random_bytes_never_panic() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut good = BytesMut::new();
        let mut c = v4::Connect::new("dev");
        c.set_login("alice", "secret");
        v4::Packet::Connect(c).write(&mut good, MAX_PACKET).unwrap();
        for i in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut bytes: Vec<u8> = if i % 2 == 0 {
                (0..len).map(|_| next() as u8).collect()
            } else {
                // A valid CONNECT with a few bytes changed or cut.
                let mut b = good.to_vec();
                for _ in 0..3 {
                    let at = (next() as usize) % b.len();
                    b[at] = next() as u8;
                }
                b.truncate(1 + (next() as usize) % b.len());
                b
            };
            // Random packet type with a consistent remaining length.
            if i % 3 == 0 && bytes.len() >= 2 {
                bytes[1] = (bytes.len() - 2).min(127) as u8;
            }
            let mut buf = BytesMut::from(&bytes[..]);
            if let Frame::Packet(p) = frame(&mut buf) {
                let _ = decode_connect(p.clone());
                let _ = decode(Version::V311, p.clone());
                let _ = decode(Version::V5, p);
            }
        }
    }

    /// rumqttc's MQTT 5 reader takes our DISCONNECT, reason code and all.
    #[test]
    fn disconnect5_is_readable() {
        let mut buf = BytesMut::new();
        encode(
            Version::V5,
            Out::DisconnectProtocol(ProtocolFailure::ServerShuttingDown),
            &mut buf,
        );
        assert_eq!(&buf[..], &[0xE0, 0x02, 0x8B, 0x00]);
        match v5::Packet::read(&mut buf, None) {
            Ok(v5::Packet::Disconnect(d)) => {
                assert_eq!(d.reason_code, v5::DisconnectReasonCode::ServerShuttingDown)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connect_level_reads_the_protocol_level() {
        let mut good = BytesMut::new();
        v4::Packet::Connect(v4::Connect::new("x"))
            .write(&mut good, MAX_PACKET)
            .unwrap();
        assert_eq!(connect_level(&good), Some(4));
        assert_eq!(connect_level(b"GET / HTTP/1.1"), None);
        assert_eq!(connect_level(&[0x10]), None);
    }
}
