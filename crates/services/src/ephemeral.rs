//! Typing notifications, receipts, read markers and presence: who may set
//! them. Receipts and read markers are stored (receipts go to the room's
//! members in `/sync`'s `ephemeral`); typing and presence are accepted
//! without being relayed yet, but the rules hold already: a user sets only
//! their own typing state and presence, and only in rooms they are joined
//! to.

use ruma::{OwnedRoomId, UserId};
use serde_json::json;
use weft_core::{Error, Result};
use weft_store::ReceiptRecord;

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

    /// `POST /rooms/{roomId}/receipt/{type}/{eventId}`: `m.read` and
    /// `m.read.private` store a receipt (`thread_id`: `None` unthreaded,
    /// else `main` or a thread root's ID); `m.fully_read` sets the read
    /// marker (room account data) and takes no thread. Only in a room one
    /// is joined to (`403 M_FORBIDDEN`), for an event one may see
    /// (`404 M_NOT_FOUND`).
    pub async fn set_receipt(
        &self,
        session: &Session,
        room: &str,
        receipt_type: &str,
        event_id: &str,
        thread_id: Option<&str>,
    ) -> Result<()> {
        self.require_joined(session, room).await?;
        match receipt_type {
            RECEIPT_READ | RECEIPT_READ_PRIVATE => {}
            FULLY_READ => {
                if thread_id.is_some() {
                    return Err(Error::invalid_param("m.fully_read does not take a thread_id"));
                }
                return self.set_read_markers(session, room, Some(event_id), None, None).await;
            }
            _ => return Err(Error::invalid_param("Unknown receipt type")),
        }
        self.receipt_target(&session.user_id, room, event_id).await?;
        if let Some(t) = thread_id
            && t != "main"
        {
            // A thread root is an event of the room one may see.
            self.receipt_target(&session.user_id, room, t).await?;
        }
        self.store_receipt(session, room, receipt_type, event_id, thread_id.unwrap_or(""))
            .await
    }

    /// `POST /rooms/{roomId}/read_markers`: `m.fully_read` is stored as
    /// room account data of that type; `m.read` and `m.read.private` as
    /// unthreaded receipts. Every event must be one the user may see.
    pub async fn set_read_markers(
        &self,
        session: &Session,
        room: &str,
        fully_read: Option<&str>,
        read: Option<&str>,
        read_private: Option<&str>,
    ) -> Result<()> {
        self.require_joined(session, room).await?;
        for e in [fully_read, read, read_private].into_iter().flatten() {
            self.receipt_target(&session.user_id, room, e).await?;
        }
        if let Some(e) = fully_read {
            let content = serde_json::to_string(&json!({ "event_id": e })).map_err(Error::internal)?;
            self.store
                .put_account_data(session.user_id.as_str(), Some(room), FULLY_READ, &content)
                .await
                .map_err(|_| Error::internal("read marker not stored"))??;
        }
        if let Some(e) = read {
            self.store_receipt(session, room, RECEIPT_READ, e, "").await?;
        }
        if let Some(e) = read_private {
            self.store_receipt(session, room, RECEIPT_READ_PRIVATE, e, "").await?;
        }
        Ok(())
    }

    /// The event a receipt or marker points at must be in the room and
    /// visible to the user; otherwise `404 M_NOT_FOUND`.
    async fn receipt_target(&self, user_id: &UserId, room: &str, event_id: &str) -> Result<()> {
        self.visible_event(user_id, room, event_id).await.map(|_| ())
    }

    async fn store_receipt(
        &self,
        session: &Session,
        room: &str,
        receipt_type: &str,
        event_id: &str,
        thread_id: &str,
    ) -> Result<()> {
        let record = ReceiptRecord {
            room_id: room.to_owned(),
            receipt_type: receipt_type.to_owned(),
            user_id: session.user_id.to_string(),
            thread_id: thread_id.to_owned(),
            event_id: event_id.to_owned(),
            ts: weft_core::now_ms(),
            position: 0,
        };
        self.store
            .put_receipt(record)
            .await
            .map_err(|_| Error::internal("receipt not stored"))??;
        Ok(())
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

/// The public read receipt.
pub const RECEIPT_READ: &str = "m.read";
/// A read receipt only its own user sees.
pub const RECEIPT_READ_PRIVATE: &str = "m.read.private";
/// The read marker: room account data of this type.
pub const FULLY_READ: &str = "m.fully_read";

fn own_user(session: &Session, user_id: &str, message: &str) -> Result<()> {
    if session.user_id.as_str() == user_id {
        Ok(())
    } else {
        Err(Error::forbidden(message))
    }
}
