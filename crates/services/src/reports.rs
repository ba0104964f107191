//! Reports of events and users, kept for the operator (`weft report
//! list`). A report names only what its reporter may see: an event in a
//! room they can read, a user ID that is well formed.

use ruma::UserId;
use weft_core::{Error, Result};
use weft_store::Report;

use crate::{Services, Session};

/// The longest reason kept, in bytes.
pub const MAX_REASON_BYTES: usize = 4096;

fn reason_of(reason: Option<String>) -> Result<Option<String>> {
    crate::text::check_opt_text("The reason", reason.as_deref())?;
    match reason {
        Some(r) if r.len() > MAX_REASON_BYTES => Err(Error::invalid_param(format!(
            "The reason is longer than {MAX_REASON_BYTES} bytes"
        ))),
        r => Ok(r.filter(|r| !r.is_empty())),
    }
}

impl Services {
    /// `POST /rooms/{roomId}/report/{eventId}`: `404 M_NOT_FOUND` unless the
    /// reporter can see the event (the same answer whether it does not
    /// exist or is hidden from them).
    pub async fn report_event(
        &self,
        session: &Session,
        room: &str,
        event_id: &str,
        reason: Option<String>,
    ) -> Result<()> {
        let reason = reason_of(reason)?;
        self.event(session, room, event_id).await?;
        self.store
            .add_report(Report {
                id: 0,
                reporter: session.user_id.to_string(),
                room_id: Some(room.to_owned()),
                event_id: Some(event_id.to_owned()),
                target_user: None,
                reason,
                received_ms: weft_core::now_ms(),
            })
            .await?;
        tracing::info!(reporter = %session.user_id, room, event_id, "event reported");
        Ok(())
    }

    /// `POST /users/{userId}/report`. Accepted whether or not the user
    /// exists, so reports cannot be used to find out who does.
    pub async fn report_user(&self, session: &Session, user: &UserId, reason: Option<String>) -> Result<()> {
        let reason = reason_of(reason)?;
        self.store
            .add_report(Report {
                id: 0,
                reporter: session.user_id.to_string(),
                room_id: None,
                event_id: None,
                target_user: Some(user.to_string()),
                reason,
                received_ms: weft_core::now_ms(),
            })
            .await?;
        tracing::info!(reporter = %session.user_id, user = %user, "user reported");
        Ok(())
    }
}
