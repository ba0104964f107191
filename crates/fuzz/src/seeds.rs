//! Valid inputs the targets start from: real packets, built with the
//! libraries the doors and their clients use, so that edits reach past
//! the first checks into option, property and body parsing.

use bytes::BytesMut;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use rumqttc::mqttbytes::{QoS, v4};
use rumqttc::v5::mqttbytes::{QoS as Q5, v5};
use serde_json::json;

const ROOM: &str = "!abcdefghijklmnop:localhost:8008";

/// MQTT byte streams as a client sends them: a CONNECT, then packets.
pub fn mqtt() -> Vec<Vec<u8>> {
    let mut out = Vec::new();

    // 3.1.1
    let mut c = v4::Connect::new("sensor-1");
    c.set_login("alice", "a long password");
    c.clean_session = false;
    c.keep_alive = 30;
    c.last_will = Some(v4::LastWill::new(
        format!("weft/r/{ROOM}/e/org.weft.status"),
        &b"{\"online\":false}"[..],
        QoS::AtLeastOnce,
        false,
    ));
    let topic = format!("weft/r/{ROOM}/e/org.weft.telemetry");
    let mut p1 = v4::Publish::new(&topic, QoS::AtLeastOnce, &br#"{"t":21.5,"h":61}"#[..]);
    p1.pkid = 1;
    let mut p2 = v4::Publish::new("weft/a/greenhouse/s/m.room.topic/", QoS::ExactlyOnce, b"hi".to_vec());
    p2.pkid = 2;
    let mut sub = v4::Subscribe::new(format!("weft/r/{ROOM}/e/#"), QoS::AtLeastOnce);
    sub.pkid = 3;
    sub.filters
        .push(v4::SubscribeFilter::new("weft/r/+/e/#".into(), QoS::AtMostOnce));
    let mut unsub = v4::Unsubscribe::new("weft/r/+/e/#");
    unsub.pkid = 4;
    let v4_packets = [
        v4::Packet::Connect(c),
        v4::Packet::Publish(p1),
        v4::Packet::Publish(v4::Publish::new(&topic, QoS::AtMostOnce, vec![0xff, 0x00, 0x01])),
        v4::Packet::Publish(p2),
        v4::Packet::PubAck(v4::PubAck::new(7)),
        v4::Packet::PubRec(v4::PubRec::new(8)),
        v4::Packet::PubRel(v4::PubRel::new(2)),
        v4::Packet::PubComp(v4::PubComp::new(9)),
        v4::Packet::Subscribe(sub),
        v4::Packet::Unsubscribe(unsub),
        v4::Packet::PingReq,
        v4::Packet::Disconnect,
    ];
    let mut stream = BytesMut::new();
    let mut each = Vec::new();
    for p in &v4_packets {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).expect("v4 seed");
        stream.extend_from_slice(&b);
        each.push(b.to_vec());
    }
    out.push(stream.to_vec());
    // The CONNECT followed by each packet alone: shorter inputs, so edits
    // land in the packet rather than anywhere in a long stream.
    for b in &each[1..] {
        out.push([&each[0][..], b].concat());
    }
    out.push(each[0].clone());

    // 5
    let mut props = v5::ConnectProperties::new();
    props.session_expiry_interval = Some(3600);
    props.receive_maximum = Some(16);
    props.max_packet_size = Some(65_536);
    props.topic_alias_max = Some(4);
    props.user_properties = vec![("k".into(), "v".into())];
    let connect = v5::Connect {
        keep_alive: 60,
        client_id: "sensor-5".into(),
        clean_start: true,
        properties: Some(props),
    };
    let will = v5::LastWill::new(
        format!("weft/r/{ROOM}/e/org.weft.status"),
        &b"gone"[..],
        Q5::AtMostOnce,
        false,
        Some(v5::LastWillProperties {
            delay_interval: Some(5),
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(60),
            content_type: Some("application/json".into()),
            response_topic: Some("r".into()),
            correlation_data: Some(bytes::Bytes::from_static(b"c")),
            user_properties: vec![("a".into(), "b".into())],
        }),
    );
    let login = v5::Login::new("@alice:localhost:8008", "syt_token");
    let mut pub5 = v5::Publish::new(
        &topic,
        Q5::AtLeastOnce,
        &br#"{"temperature_c":21.375}"#[..],
        Some(v5::PublishProperties {
            payload_format_indicator: Some(1),
            message_expiry_interval: Some(10),
            topic_alias: Some(1),
            response_topic: Some("resp".into()),
            correlation_data: Some(bytes::Bytes::from_static(b"x")),
            user_properties: vec![("u".into(), "p".into())],
            subscription_identifiers: vec![],
            content_type: Some("application/json".into()),
        }),
    );
    pub5.pkid = 10;
    let mut sub5 = v5::Subscribe::new(
        v5::Filter::new(format!("weft/r/{ROOM}/e/#"), Q5::ExactlyOnce),
        Some(v5::SubscribeProperties {
            id: None,
            user_properties: vec![("s".into(), "t".into())],
        }),
    );
    sub5.pkid = 11;
    let mut unsub5 = v5::Unsubscribe::new("weft/r/+/e/#", None);
    unsub5.pkid = 12;
    let v5_packets = [
        v5::Packet::Connect(connect, Some(will), Some(login)),
        v5::Packet::Publish(pub5),
        v5::Packet::Publish(v5::Publish::new("", Q5::AtMostOnce, &b"x"[..], None)),
        v5::Packet::PubAck(v5::PubAck::new(7, None)),
        v5::Packet::PubRec(v5::PubRec::new(8, None)),
        v5::Packet::PubRel(v5::PubRel::new(10, None)),
        v5::Packet::PubComp(v5::PubComp::new(9, None)),
        v5::Packet::Subscribe(sub5),
        v5::Packet::Unsubscribe(unsub5),
        v5::Packet::PingReq(v5::PingReq),
        v5::Packet::Disconnect(v5::Disconnect::new(v5::DisconnectReasonCode::DisconnectWithWillMessage)),
    ];
    let mut stream = BytesMut::new();
    let mut each = Vec::new();
    for p in &v5_packets {
        let mut b = BytesMut::new();
        p.write(&mut b, None).expect("v5 seed");
        stream.extend_from_slice(&b);
        each.push(b.to_vec());
    }
    // MQTT 5's DISCONNECT without reason code.
    stream.extend_from_slice(&[0xE0, 0x00]);
    out.push(stream.to_vec());
    for b in &each[1..] {
        out.push([&each[0][..], b].concat());
    }
    out.push(each[0].clone());
    out
}

fn coap_request(
    kind: MessageType,
    method: RequestType,
    path: &str,
    options: &[(CoapOption, Vec<u8>)],
    payload: Vec<u8>,
) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(kind);
    p.header.code = MessageClass::Request(method);
    p.header.message_id = 0x1234;
    p.set_token(vec![0xa1, 0xb2, 0xc3, 0xd4]);
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        let (seg, query) = match seg.split_once('?') {
            Some((s, q)) => (s, Some(q)),
            None => (seg, None),
        };
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        for q in query.into_iter().flat_map(|q| q.split('&')) {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
    }
    for (o, v) in options {
        p.add_option(*o, v.clone());
    }
    p.payload = payload;
    p.to_bytes().expect("coap seed")
}

/// CoAP datagrams: the request forms docs/coap.md shows, and the odd ones.
pub fn coap() -> Vec<Vec<u8>> {
    coap_for(ROOM)
}

/// [`coap`] with the requests naming `room`.
pub fn coap_for(room: &str) -> Vec<Vec<u8>> {
    use CoapOption as O;
    use MessageType::{Acknowledgement, Confirmable as Con, NonConfirmable as Non, Reset};
    use RequestType::{Get, Post, Put};
    let cf = |n: u8| (O::ContentFormat, vec![n]);
    let telemetry = crate::seeds::cbor_of(&json!({"sensor": "greenhouse-1", "temperature": 21.5, "humidity": 61}));
    let message = crate::seeds::cbor_of(&json!({"msgtype": "m.text", "body": "hello"}));
    let int_keys = weft_coap::msc3079::encode(&json!({"msgtype": "m.text", "body": "hello", "type": "m.room.message"}));
    let mut out = vec![
        coap_request(
            Con,
            Post,
            &format!("/_m/c/a/v1/r/{room}/s/m.room.message?a=syt_token"),
            &[cf(60)],
            message.clone(),
        ),
        coap_request(
            Con,
            Put,
            &format!("/9/{room}/org.weft.telemetry/txn1"),
            &[
                (O::Unknown(256), b"Bearer syt_token".to_vec()),
                (O::Unknown(257), vec![1]),
                cf(60),
            ],
            telemetry,
        ),
        coap_request(Non, Put, &format!("/9/{room}/m.room.message/t2"), &[], int_keys),
        coap_request(
            Con,
            Get,
            "/7?timeout=0&filter=0",
            &[(O::Observe, vec![]), (O::Accept, vec![50])],
            vec![],
        ),
        coap_request(
            Con,
            Get,
            "/_matrix/client/v3/sync?since=s72_5&a=tok",
            &[(O::Block2, vec![0x32]), (O::Observe, vec![1])],
            vec![],
        ),
        coap_request(
            Con,
            Put,
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.topic/"),
            &[cf(50), (O::Block1, vec![0x1e]), (O::Accept, vec![50])],
            br#"{"topic":"greenhouse \u00e9 21.50","n":-0,"big":9007199254740993}"#.to_vec(),
        ),
        coap_request(
            Con,
            Post,
            "/_matrix/client/v3/createRoom",
            &[(O::Block1, vec![0x0e, 0x2b, 0x0e])],
            vec![0xa0; 64],
        ),
        coap_request(Con, Get, "/_matrix/client/versions", &[], vec![]),
        coap_request(
            Con,
            Get,
            &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=5"),
            &[],
            vec![],
        ),
        coap_request(Con, Get, &format!("/_matrix/client/v3/rooms/{room}/state"), &[], vec![]),
        coap_request(Con, Get, "/_matrix/client/v3/joined_rooms", &[], vec![]),
        coap_request(
            Con,
            Put,
            &format!("/_matrix/client/v3/rooms/{room}/state/m.room.name/"),
            &[],
            crate::seeds::cbor_of(&json!({"name": "greenhouse"})),
        ),
        coap_request(
            Con,
            Post,
            "/G",
            &[],
            crate::seeds::cbor_of(&json!({"name": "r", "preset": "private_chat", "topic": "t"})),
        ),
        coap_request(
            Con,
            Get,
            &format!("/E/{room}?dir=b&limit=10"),
            &[(O::Observe, vec![0]), (O::Unknown(256), b"tok".to_vec())],
            vec![],
        ),
        coap_request(
            Con,
            Post,
            &format!("/_m/c/a/v1/r/{room}/s/org.weft.raw"),
            &[cf(0)],
            b"plain text 21.5".to_vec(),
        ),
        coap_request(
            Con,
            Post,
            &format!("/_m/c/a/v1/r/{room}/s/org.weft.raw"),
            &[cf(42)],
            vec![0xff, 0, 1, 2],
        ),
    ];
    // An empty CON (ping), an ACK, a RST.
    for kind in [Con, Acknowledgement, Reset] {
        let mut p = Packet::new();
        p.header.set_type(kind);
        p.header.code = MessageClass::Empty;
        p.header.message_id = 7;
        out.push(p.to_bytes().expect("coap seed"));
    }
    out
}

pub fn cbor_of(v: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("cbor seed");
    out
}

/// CBOR items: what devices send (floats of each width, int keys) and
/// the encodings a decoder must handle (indefinite lengths, tags, big
/// integers, byte strings, simple values).
pub fn cbor() -> Vec<Vec<u8>> {
    let msc = "a5026e6d2e726f6f6d2e6d65737361676503a2181b6b48656c6c6f20576f726c64181c666d2e74657874056e21666f6f3a6c6f63616c686f7374067040616c6963653a6c6f63616c686f737409a26a626f6f6c5f76616c7565f56a6e756c6c5f76616c7565f6";
    let msc: Vec<u8> = (0..msc.len() / 2)
        .map(|i| u8::from_str_radix(&msc[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    vec![
        msc,
        cbor_of(&json!({"msgtype": "m.text", "body": "hello", "n": -3, "a": [1, true, null, "x"], "o": {"x": "y"}})),
        cbor_of(&json!({"temperature": 21.5, "big": u64::MAX, "neg": i64::MIN, "deep": [[[[{"k": [0.1]}]]]]})),
        // {"t": f32 21.3, "h": f16 1.0, "d": f64 0.1}
        vec![
            0xa3, 0x61, b't', 0xfa, 0x41, 0xaa, 0x66, 0x66, 0x61, b'h', 0xf9, 0x3c, 0x00, 0x61, b'd', 0xfb, 0x3f, 0xb9,
            0x99, 0x99, 0x99, 0x99, 0x99, 0x9a,
        ],
        // {_ "a": [_ 1, 2], "b": (_ "st" "r"), "c": (_ h'01' h'ff')}
        vec![
            0xbf, 0x61, b'a', 0x9f, 0x01, 0x02, 0xff, 0x61, b'b', 0x7f, 0x62, b's', b't', 0x61, b'r', 0xff, 0x61, b'c',
            0x5f, 0x41, 0x01, 0x41, 0xff, 0xff, 0xff,
        ],
        // tag 2 bignum, tag 1 epoch time, simple(16), undefined, simple(255)
        vec![
            0x85, 0xc2, 0x49, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0xc1, 0x1a, 0x5f, 0x00, 0x00, 0x00, 0xf0, 0xf7, 0xf8, 0xff,
        ],
        // {1: "$e", 27: "body", true: 1, -5: 0, "27": h'68 69'}
        vec![
            0xa5, 0x01, 0x62, b'$', b'e', 0x18, 0x1b, 0x64, b'b', b'o', b'd', b'y', 0xf5, 0x01, 0x24, 0x00, 0x62, b'2',
            b'7', 0x42, b'h', b'i',
        ],
        // 8-byte lengths and integers
        vec![
            0x82, 0x1b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3b, 0, 0, 0, 0, 0, 0, 0, 1,
        ],
    ]
}

/// Door payloads (MQTT PUBLISH bodies, CoAP JSON/text bodies).
pub fn door_content() -> Vec<Vec<u8>> {
    [
        &br#"{"temperature_c":21.375,"humidity":61}"#[..],
        br#"  {"a": 21.50, "b": -3, "c": [1e3, "x\"1.5", 7], "d": 9007199254740993, "e": {"f": -0.0, "g": null}}"#,
        br#"{"msgtype":"m.text","body":"h\u00e9llo \\ \"q\" \ud83d\ude00","nested":{"x":[true,false,{"y":-1E-7}]}}"#,
        br#"{"n":-9007199254740991,"m":9007199254740991,"z":0,"k":"0.5"}"#,
        "plain text reading: 21.5 °C".as_bytes(),
        b"\t\n{\"tab\":1}\r\n",
        &[0xff, 0x00, 0x01, 0x80, 0xc3],
        b"[1,2,3]",
        b"",
    ]
    .iter()
    .map(|b| b.to_vec())
    .collect()
}
