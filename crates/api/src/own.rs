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

/// The query of the file listings (`org.weft.files`): every parameter
/// optional.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct FileListQuery {
    pub tag: Option<String>,
    /// A type or type prefix: `image/`, `application/pdf`.
    #[serde(rename = "type")]
    pub mimetype: Option<String>,
    /// Milliseconds since the epoch.
    pub since: Option<u64>,
    pub until: Option<u64>,
    /// Words to find in names and tags.
    pub q: Option<String>,
    pub from: Option<String>,
    pub limit: Option<usize>,
}

fn file_query<B: AsRef<[u8]>>(
    request: &axum::http::Request<B>,
) -> Result<FileListQuery, ruma::api::error::FromHttpRequestError> {
    let q = request.uri().query().unwrap_or("");
    serde_html_form::from_str(q).map_err(|e| ruma::api::error::DeserializationError::Query(e).into())
}

/// `GET /_matrix/client/unstable/org.weft.files/rooms/{roomId}/files`:
/// the files shared in a room (docs/media.md, "Files").
pub mod room_files {
    use ruma::OwnedRoomId;
    use ruma::api::auth_scheme::AccessToken;
    use ruma::api::error::FromHttpRequestError;
    use ruma::api::{IncomingRequest, metadata};
    use serde::de::value::{Error as PathError, SeqDeserializer};

    use super::FileListQuery;

    metadata! {
        method: GET,
        rate_limited: false,
        authentication: AccessToken,
        history: {
            unstable => "/_matrix/client/unstable/org.weft.files/rooms/{room_id}/files",
        }
    }

    #[derive(Clone, Debug)]
    pub struct Request {
        pub room_id: OwnedRoomId,
        pub query: FileListQuery,
    }

    impl IncomingRequest for Request {
        type EndpointError = ruma::api::error::Error;
        // Not used: the handler answers with `Full` (a JSON listing).
        type OutgoingResponse = ruma::api::client::account::whoami::v3::Response;

        fn try_from_http_request<B, S>(
            request: axum::http::Request<B>,
            path_args: &[S],
        ) -> Result<Self, FromHttpRequestError>
        where
            B: AsRef<[u8]>,
            S: AsRef<str>,
        {
            Self::check_request_method(request.method())?;
            let (room_id,): (OwnedRoomId,) = serde::Deserialize::deserialize(SeqDeserializer::<_, PathError>::new(
                path_args.iter().map(AsRef::as_ref),
            ))?;
            Ok(Self {
                room_id,
                query: super::file_query(&request)?,
            })
        }
    }
}

/// `GET /_matrix/client/unstable/org.weft.files/uploads`: the caller's own
/// uploads (docs/media.md, "Files").
pub mod my_uploads {
    use ruma::api::auth_scheme::AccessToken;
    use ruma::api::error::FromHttpRequestError;
    use ruma::api::{IncomingRequest, metadata};

    use super::FileListQuery;

    metadata! {
        method: GET,
        rate_limited: false,
        authentication: AccessToken,
        history: {
            unstable => "/_matrix/client/unstable/org.weft.files/uploads",
        }
    }

    #[derive(Clone, Debug)]
    pub struct Request {
        pub query: FileListQuery,
    }

    impl IncomingRequest for Request {
        type EndpointError = ruma::api::error::Error;
        // Not used: the handler answers with `Full` (a JSON listing).
        type OutgoingResponse = ruma::api::client::account::whoami::v3::Response;

        fn try_from_http_request<B, S>(
            request: axum::http::Request<B>,
            _path_args: &[S],
        ) -> Result<Self, FromHttpRequestError>
        where
            B: AsRef<[u8]>,
            S: AsRef<str>,
        {
            Self::check_request_method(request.method())?;
            Ok(Self {
                query: super::file_query(&request)?,
            })
        }
    }
}

/// `GET /_matrix/key/v2/server/{keyId}`: the deprecated form of
/// `/_matrix/key/v2/server` (servers must ignore the key ID and answer
/// all keys), which ruma no longer declares.
pub mod server_keys_by_id {
    use ruma::api::auth_scheme::NoAuthentication;
    use ruma::api::error::FromHttpRequestError;
    use ruma::api::federation::discovery::get_server_keys;
    use ruma::api::{IncomingRequest, metadata};

    metadata! {
        method: GET,
        rate_limited: false,
        authentication: NoAuthentication,
        path: "/_matrix/key/v2/server/{key_id}",
    }

    #[derive(Clone, Debug)]
    pub struct Request;

    pub type Response = get_server_keys::v2::Response;

    impl IncomingRequest for Request {
        type EndpointError = ruma::api::error::Error;
        type OutgoingResponse = Response;

        fn try_from_http_request<B, S>(
            request: axum::http::Request<B>,
            _path_args: &[S],
        ) -> Result<Self, FromHttpRequestError>
        where
            B: AsRef<[u8]>,
            S: AsRef<str>,
        {
            Self::check_request_method(request.method())?;
            Ok(Self)
        }
    }
}
