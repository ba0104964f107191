//! Typing notifications, receipts, read markers and presence: who may set
//! them. Weft accepts them without storing or relaying them yet, but the
//! rules hold already: a user sets only their own typing state and
//! presence, and only in rooms they are joined to.

use ruma::OwnedRoomId;
use weft_core::{Error, Result};

use crate::{Services, Session};

impl Services {
    /// `PUT /rooms/{roomId}/typing/{userId}`: only for oneself, in a room
    /// one is joined to; otherwise `403 M_FORBIDDEN`.
    pub async fn set_typing(&self, session: &Session, room: &str, user_id: &str) -> Result<()> {
        own_user(session, user_id, "Cannot set another user's typing state")?;
        self.require_joined(session, room).await
    }

    /// `PUT /presence/{userId}/status`: only one's own (`403 M_FORBIDDEN`).
    pub async fn set_presence(&self, session: &Session, user_id: &str) -> Result<()> {
        own_user(session, user_id, "Cannot set another user's presence")
    }

    /// Receipts and read markers: only in a room one is joined to
    /// (`403 M_FORBIDDEN`).
    pub async fn set_read_marker(&self, session: &Session, room: &str) -> Result<()> {
        self.require_joined(session, room).await
    }

    async fn require_joined(&self, session: &Session, room: &str) -> Result<()> {
        let room_id = OwnedRoomId::try_from(room).map_err(|_| Error::invalid_param("Invalid room ID"))?;
        match self.rooms.membership(&room_id, &session.user_id).await {
            Ok(Some(m)) if m == "join" => Ok(()),
            Ok(_) => Err(Error::forbidden("You are not in this room")),
            // An unknown room reads as one you are not in.
            Err(e) if e.kind == weft_core::ErrorKind::NotFound => Err(Error::forbidden("You are not in this room")),
            Err(e) => Err(e),
        }
    }
}

fn own_user(session: &Session, user_id: &str, message: &str) -> Result<()> {
    if session.user_id.as_str() == user_id {
        Ok(())
    } else {
        Err(Error::forbidden(message))
    }
}
