//! The one error type of the server. Every layer returns [`Error`]; the HTTP
//! door turns it into a Matrix error body in one place, and other doors map
//! [`ErrorKind`] to their own failure codes.

use std::fmt;

/// What went wrong, as the Matrix spec names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    MissingToken,
    UnknownToken {
        soft_logout: bool,
    },
    Forbidden,
    NotJson,
    BadJson,
    Unrecognized {
        method_not_allowed: bool,
    },
    NotFound,
    InvalidUsername,
    UserInUse,
    Exclusive,
    InvalidParam,
    MissingParam,
    TooLarge,
    LimitExceeded {
        retry_after_ms: u64,
    },
    RoomInUse,
    UnsupportedRoomVersion,
    InvalidRoomState,
    UserDeactivated,
    WeakPassword,
    /// User-interactive auth is needed; carries the 401 UIA body.
    Uia(serde_json::Value),
    BadState,
    /// A key-backup request named a version that is not the current one
    /// (`None`: there is no backup).
    WrongRoomKeysVersion {
        current_version: Option<String>,
    },
    /// The media ID already has its bytes (`409`).
    CannotOverwriteMedia,
    /// The media ID has no bytes yet and the wait ran out (`504`).
    NotYetUploaded,
    /// A sliding sync `pos` the server does not know (any more): the
    /// client starts the connection afresh (MSC4186).
    UnknownPos,
    /// A federation request without a valid `X-Matrix` signature, or
    /// addressed to another server (`401 M_UNAUTHORIZED`).
    Unauthorized,
    /// Another server could not be reached or answered with nonsense
    /// (`502`); the message says which server and why.
    RemoteUnreachable,
    /// `/make_join`: the joining server supports none of the room's
    /// version (`400`, with `room_version`).
    IncompatibleRoomVersion {
        room_version: String,
    },
    /// `POST /appservice/{id}/ping` failed: the spec's code for why
    /// (`M_URL_NOT_SET`, `M_BAD_STATUS` with the service's status and
    /// body, `M_CONNECTION_FAILED`, `M_CONNECTION_TIMEOUT`).
    Ping {
        errcode: &'static str,
        status: Option<u16>,
        body: Option<String>,
    },
    /// MSC4190: an application service that manages its users' devices
    /// tried `m.login.application_service` (or `/register` without
    /// `inhibit_login`) (`400`).
    AppserviceLoginUnsupported,
    /// The store refused an event built on forward extremities the room
    /// no longer has: another process wrote to the room meanwhile. The
    /// room pipeline rebuilds and resends it; a client sees this (`503`)
    /// only when that kept failing.
    RoomMoved,
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// HTTP status where the spec uses an unusual one (e.g. 409 for an
    /// existing alias).
    pub status: Option<u16>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            status: None,
        }
    }
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }
    pub fn bad_json(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadJson, m)
    }
    pub fn invalid_param(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidParam, m)
    }
    pub fn missing_param(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::MissingParam, m)
    }
    /// An internal failure (storage, I/O). The message is logged, not shown
    /// in detail to clients.
    pub fn internal(m: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Unknown, m.to_string())
    }

    /// The Matrix `errcode` for this error.
    pub fn errcode(&self) -> &'static str {
        match &self.kind {
            ErrorKind::MissingToken => "M_MISSING_TOKEN",
            ErrorKind::UnknownToken { .. } => "M_UNKNOWN_TOKEN",
            ErrorKind::Forbidden => "M_FORBIDDEN",
            ErrorKind::NotJson => "M_NOT_JSON",
            ErrorKind::BadJson => "M_BAD_JSON",
            ErrorKind::Unrecognized { .. } => "M_UNRECOGNIZED",
            ErrorKind::NotFound => "M_NOT_FOUND",
            ErrorKind::InvalidUsername => "M_INVALID_USERNAME",
            ErrorKind::UserInUse => "M_USER_IN_USE",
            ErrorKind::Exclusive => "M_EXCLUSIVE",
            ErrorKind::InvalidParam => "M_INVALID_PARAM",
            ErrorKind::MissingParam => "M_MISSING_PARAM",
            ErrorKind::TooLarge => "M_TOO_LARGE",
            ErrorKind::LimitExceeded { .. } => "M_LIMIT_EXCEEDED",
            ErrorKind::RoomInUse => "M_ROOM_IN_USE",
            ErrorKind::UnsupportedRoomVersion => "M_UNSUPPORTED_ROOM_VERSION",
            ErrorKind::InvalidRoomState => "M_INVALID_ROOM_STATE",
            ErrorKind::UserDeactivated => "M_USER_DEACTIVATED",
            ErrorKind::WeakPassword => "M_WEAK_PASSWORD",
            ErrorKind::Uia(_) => "M_FORBIDDEN",
            ErrorKind::BadState => "M_BAD_STATE",
            ErrorKind::WrongRoomKeysVersion { .. } => "M_WRONG_ROOM_KEYS_VERSION",
            ErrorKind::CannotOverwriteMedia => "M_CANNOT_OVERWRITE_MEDIA",
            ErrorKind::NotYetUploaded => "M_NOT_YET_UPLOADED",
            ErrorKind::UnknownPos => "M_UNKNOWN_POS",
            ErrorKind::Unauthorized => "M_UNAUTHORIZED",
            ErrorKind::RemoteUnreachable => "M_UNKNOWN",
            ErrorKind::IncompatibleRoomVersion { .. } => "M_INCOMPATIBLE_ROOM_VERSION",
            ErrorKind::Ping { errcode, .. } => errcode,
            ErrorKind::AppserviceLoginUnsupported => "M_APPSERVICE_LOGIN_UNSUPPORTED",
            ErrorKind::RoomMoved => "M_UNKNOWN",
            ErrorKind::Unknown => "M_UNKNOWN",
        }
    }

    /// The HTTP status the Client-Server API uses for this error.
    pub fn http_status(&self) -> u16 {
        if let Some(s) = self.status {
            return s;
        }
        match &self.kind {
            ErrorKind::MissingToken | ErrorKind::UnknownToken { .. } | ErrorKind::Uia(_) | ErrorKind::Unauthorized => {
                401
            }
            ErrorKind::Forbidden | ErrorKind::UserDeactivated | ErrorKind::WrongRoomKeysVersion { .. } => 403,
            ErrorKind::Unrecognized {
                method_not_allowed: true,
            } => 405,
            ErrorKind::Unrecognized { .. } | ErrorKind::NotFound => 404,
            ErrorKind::TooLarge => 413,
            ErrorKind::LimitExceeded { .. } => 429,
            ErrorKind::CannotOverwriteMedia => 409,
            ErrorKind::NotYetUploaded => 504,
            ErrorKind::RemoteUnreachable => 502,
            ErrorKind::RoomMoved => 503,
            ErrorKind::Ping { errcode, .. } => match *errcode {
                "M_URL_NOT_SET" => 400,
                "M_CONNECTION_TIMEOUT" => 504,
                _ => 502,
            },
            ErrorKind::Unknown => 500,
            _ => 400,
        }
    }

    /// The JSON body of the Matrix error response.
    pub fn body(&self) -> serde_json::Value {
        if let ErrorKind::Uia(body) = &self.kind {
            return body.clone();
        }
        let mut body = serde_json::json!({ "errcode": self.errcode(), "error": self.message });
        match &self.kind {
            ErrorKind::UnknownToken { soft_logout } => {
                body["soft_logout"] = (*soft_logout).into();
            }
            ErrorKind::LimitExceeded { retry_after_ms } => {
                body["retry_after_ms"] = (*retry_after_ms).into();
            }
            ErrorKind::WrongRoomKeysVersion {
                current_version: Some(v),
            } => {
                body["current_version"] = v.as_str().into();
            }
            ErrorKind::IncompatibleRoomVersion { room_version } => {
                body["room_version"] = room_version.as_str().into();
            }
            ErrorKind::Ping {
                status: Some(status),
                body: answer,
                ..
            } => {
                body["status"] = (*status).into();
                body["body"] = answer.clone().unwrap_or_default().into();
            }
            _ => {}
        }
        body
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.errcode(), self.message)
    }
}

impl std::error::Error for Error {}
