//! Request types of the endpoints ruma has none for, declared as ruma
//! declares its own: the metadata (method, authentication, paths by
//! version) with ruma's `metadata!`, and an [`IncomingRequest`] reading the
//! path arguments and body, so the layer serves them like any other
//! endpoint (paths under every prefix, caller, errors).
//!
//! [`IncomingRequest`]: ruma::api::IncomingRequest

/// `POST /rooms/{roomId}/send/{eventType}`: a send without a transaction
/// ID, as the original `api/v1` API (and the CoAP form in the talk) sends
/// it. Not idempotent: each request sends an event. The answer is that of
/// the send with a transaction ID (`{"event_id": …}`).
pub mod send_without_txn {
    use ruma::OwnedRoomId;
    use ruma::api::auth_scheme::AccessToken;
    use ruma::api::client::message::send_message_event;
    use ruma::api::error::FromHttpRequestError;
    use ruma::api::{IncomingRequest, metadata};
    use ruma::events::{AnyMessageLikeEventContent, MessageLikeEventType};
    use ruma::serde::Raw;
    use serde::de::value::{Error as PathError, SeqDeserializer};

    metadata! {
        method: POST,
        rate_limited: false,
        authentication: AccessToken,
        history: {
            1.0 => "/_matrix/client/r0/rooms/{room_id}/send/{event_type}",
            1.1 => "/_matrix/client/v3/rooms/{room_id}/send/{event_type}",
        }
    }

    #[derive(Clone, Debug)]
    pub struct Request {
        pub room_id: OwnedRoomId,
        pub event_type: MessageLikeEventType,
        /// The event content: a JSON object.
        pub body: Raw<AnyMessageLikeEventContent>,
    }

    pub type Response = send_message_event::v3::Response;

    impl IncomingRequest for Request {
        type EndpointError = ruma::api::error::Error;
        type OutgoingResponse = Response;

        fn try_from_http_request<B, S>(
            request: axum::http::Request<B>,
            path_args: &[S],
        ) -> Result<Self, FromHttpRequestError>
        where
            B: AsRef<[u8]>,
            S: AsRef<str>,
        {
            Self::check_request_method(request.method())?;
            let (room_id, event_type) = serde::Deserialize::deserialize(SeqDeserializer::<_, PathError>::new(
                path_args.iter().map(AsRef::as_ref),
            ))?;
            let body = ruma::serde::deserialize_raw_object(&mut serde_json::Deserializer::from_slice(
                request.body().as_ref(),
            ))?;
            Ok(Self {
                room_id,
                event_type,
                body,
            })
        }
    }
}
