//! Managing one's devices: renaming them, and deleting them (after
//! user-interactive auth with the account's password), which revokes
//! everything the device held.

use weft_core::{Error, Result};

use crate::sign_in::AuthData;
use crate::{Services, Session};

impl Services {
    /// `PUT /devices/{deviceId}`: sets the display name of one of the
    /// session's user's devices (`None` leaves it unchanged). Another
    /// user's device, like a missing one, is `404 M_NOT_FOUND`.
    ///
    /// An application service with `io.element.msc4190: true` acting as
    /// one of its users creates the device when it is missing (MSC4190).
    pub async fn rename_device(&self, session: &Session, device_id: &str, display_name: Option<&str>) -> Result<()> {
        crate::text::check_text("Device ID", device_id)?;
        crate::text::check_opt_text("Device display name", display_name)?;
        if self.acts_with_msc4190(session) {
            let exists = self
                .store
                .list_devices(session.user_id.as_str())
                .await?
                .iter()
                .any(|d| d.device_id == device_id);
            if !exists {
                // Its access token is never handed out: the service acts
                // for the device with its own token.
                self.accounts
                    .new_device(&session.user_id, Some(device_id), display_name)
                    .await?;
                return Ok(());
            }
        }
        let found = match display_name {
            Some(name) => {
                self.store
                    .set_device_display_name(session.user_id.as_str(), device_id, Some(name))
                    .await?
            }
            None => self
                .store
                .list_devices(session.user_id.as_str())
                .await?
                .iter()
                .any(|d| d.device_id == device_id),
        };
        if found {
            Ok(())
        } else {
            Err(Error::not_found("Device not found"))
        }
    }

    /// `DELETE /devices/{deviceId}` and `POST /delete_devices`: after
    /// `m.login.password` user-interactive auth (the 401 that asks for it
    /// otherwise), deletes each named device of the session's user — its
    /// access token, DTLS key, device and one-time keys and pending
    /// to-device messages — and ends its open connections. A device the
    /// user does not have is skipped. Users sharing a room with the user
    /// see the device list change if the device had keys.
    ///
    /// An application service with `io.element.msc4190: true` needs no
    /// user-interactive auth (MSC4190).
    pub async fn delete_devices(&self, session: &Session, devices: &[String], auth: Option<AuthData>) -> Result<()> {
        if !self.acts_with_msc4190(session) {
            self.password_uia(session, auth).await?;
        }
        let own = self.store.list_devices(session.user_id.as_str()).await?;
        for device in devices {
            if own.iter().any(|d| &d.device_id == device) {
                self.accounts.revoke_device(&session.user_id, device).await?;
            }
        }
        Ok(())
    }
}
