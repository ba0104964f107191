//! The operator's account administration (`weft user …`): one function per
//! command, called both by the running server's admin socket and, when no
//! server runs, by the CLI on the database directly, so both behave alike.
//! The commands and their outcomes are serde types: the admin socket sends
//! them as they are.

use serde::{Deserialize, Serialize};
use weft_core::{Error, Result};

use crate::Services;

/// One admin command. `name` is a localpart or a full user ID on this server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminCommand {
    /// Creates a user with a password (and optionally the admin flag).
    CreateUser {
        name: String,
        password: String,
        admin: bool,
    },
    /// Every user with its flags.
    ListUsers,
    /// Sets a new password.
    ResetPassword { name: String, password: String },
    /// Leaves every room (so other members see the account go), then
    /// deactivates: no more logins, every device logged out.
    Deactivate { name: String },
    /// A fresh access token for a new (or the named) device.
    Token { name: String, device_id: Option<String> },
    /// A user's devices.
    Devices { name: String },
    /// Deletes one device: its token and key stop working at once.
    Revoke { name: String, device_id: String },
    /// A fresh DTLS pre-shared key for a new (or the named) device.
    Psk { name: String, device_id: Option<String> },
    /// The newest reports of events and users.
    Reports { limit: usize },
    /// Media items, newest first, of one user or everyone.
    MediaList { user: Option<String>, limit: usize },
    /// The media repository in numbers.
    MediaStats,
    /// Deletes media items created more than `older_than_ms` ago, or all
    /// of one user's (on their request), or both conditions together.
    MediaPurge {
        older_than_ms: Option<u64>,
        user: Option<String>,
    },
    /// Quarantines a media item (`mxc://…` or its ID): served to no one;
    /// `release` undoes it.
    MediaQuarantine { media: String, release: bool },
    /// The outgoing federation queue per destination (running server only).
    FederationDestinations,
    /// The registered application services and their delivery state.
    AppserviceList,
    /// Queues an EDU (`content` is its JSON) for a server, as the server's
    /// own parts do (running server only; for tests and diagnosis).
    FederationQueueEdu {
        destination: String,
        edu_type: String,
        content: String,
    },
    /// Sends one signed transaction (`body`: `{"pdus": [...], "edus":
    /// [...]}`) with the given ID to a server now, outside the queue, and
    /// answers its response (running server only; for tests and diagnosis).
    FederationSendTransaction {
        destination: String,
        txn_id: String,
        body: String,
    },
}

/// A media item as `weft media list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminMedia {
    pub mxc: String,
    pub uploader: String,
    pub created_ms: u64,
    /// `None` while waiting for its bytes.
    pub size: Option<u64>,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    pub quarantined: bool,
}

/// A user as `weft user list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminUser {
    pub user_id: String,
    pub admin: bool,
    pub deactivated: bool,
}

/// A device as `weft user devices` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminDevice {
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ms: Option<u64>,
}

/// What an [`AdminCommand`] did, one variant per command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AdminOutcome {
    Created {
        user_id: String,
    },
    Users {
        users: Vec<AdminUser>,
    },
    PasswordChanged {
        user_id: String,
    },
    Deactivated {
        user_id: String,
    },
    Token {
        user_id: String,
        device_id: String,
        access_token: String,
    },
    Devices {
        user_id: String,
        devices: Vec<AdminDevice>,
    },
    Revoked {
        user_id: String,
        device_id: String,
    },
    Psk {
        user_id: String,
        device_id: String,
        identity: String,
        key: String,
    },
    Reports {
        reports: Vec<weft_store::Report>,
    },
    Media {
        media: Vec<AdminMedia>,
    },
    MediaStats {
        stats: weft_store::MediaStats,
    },
    MediaPurged {
        deleted: usize,
    },
    MediaQuarantined {
        mxc: String,
        quarantined: bool,
    },
    Destinations {
        /// The server's clock when it answered (ms since the epoch).
        now_ms: u64,
        destinations: Vec<weft_store::DestinationRecord>,
    },
    EduQueued {
        destination: String,
    },
    Appservices {
        now_ms: u64,
        services: Vec<crate::appservice::AppserviceInfo>,
    },
    /// The destination's answer to a transaction, as JSON.
    TransactionAnswer {
        destination: String,
        response: String,
    },
}

impl AdminCommand {
    /// The command's name (for logs: never its arguments, which may hold a
    /// password).
    pub fn op(&self) -> &'static str {
        match self {
            AdminCommand::CreateUser { .. } => "create_user",
            AdminCommand::ListUsers => "list_users",
            AdminCommand::ResetPassword { .. } => "reset_password",
            AdminCommand::Deactivate { .. } => "deactivate",
            AdminCommand::Token { .. } => "token",
            AdminCommand::Devices { .. } => "devices",
            AdminCommand::Revoke { .. } => "revoke",
            AdminCommand::Psk { .. } => "psk",
            AdminCommand::Reports { .. } => "reports",
            AdminCommand::MediaList { .. } => "media_list",
            AdminCommand::MediaStats => "media_stats",
            AdminCommand::MediaPurge { .. } => "media_purge",
            AdminCommand::MediaQuarantine { .. } => "media_quarantine",
            AdminCommand::FederationDestinations => "federation_destinations",
            AdminCommand::AppserviceList => "appservice_list",
            AdminCommand::FederationQueueEdu { .. } => "federation_queue_edu",
            AdminCommand::FederationSendTransaction { .. } => "federation_send_transaction",
        }
    }
}

impl Services {
    /// Runs one admin command. The caller is the operator (authorized by
    /// access to the data directory), so there is no further check.
    pub async fn admin(&self, command: AdminCommand) -> Result<AdminOutcome> {
        match command {
            AdminCommand::CreateUser { name, password, admin } => {
                let user_id = self.accounts.create_user(&name, Some(&password), admin).await?;
                Ok(AdminOutcome::Created {
                    user_id: user_id.to_string(),
                })
            }
            AdminCommand::ListUsers => {
                let users = self
                    .store
                    .list_users()
                    .await?
                    .into_iter()
                    .map(|u| AdminUser {
                        user_id: u.user_id,
                        admin: u.admin,
                        deactivated: u.deactivated,
                    })
                    .collect();
                Ok(AdminOutcome::Users { users })
            }
            AdminCommand::ResetPassword { name, password } => {
                let user_id = self.existing_user(&name, false).await?;
                self.accounts.set_password(&user_id, &password).await?;
                Ok(AdminOutcome::PasswordChanged {
                    user_id: user_id.to_string(),
                })
            }
            AdminCommand::Deactivate { name } => {
                let user_id = self.existing_user(&name, false).await?;
                self.deactivate_account(&user_id).await?;
                Ok(AdminOutcome::Deactivated {
                    user_id: user_id.to_string(),
                })
            }
            AdminCommand::Token { name, device_id } => {
                let user_id = self.existing_user(&name, true).await?;
                let login = self
                    .accounts
                    .new_device(&user_id, device_id.as_deref(), Some("weft user token"))
                    .await?;
                Ok(AdminOutcome::Token {
                    user_id: login.user_id.to_string(),
                    device_id: login.device_id,
                    access_token: login.access_token,
                })
            }
            AdminCommand::Devices { name } => {
                let user_id = self.existing_user(&name, false).await?;
                let devices = self
                    .store
                    .list_devices(user_id.as_str())
                    .await?
                    .into_iter()
                    .map(|d| AdminDevice {
                        device_id: d.device_id,
                        display_name: d.display_name,
                        last_seen_ms: d.last_seen_ms,
                    })
                    .collect();
                Ok(AdminOutcome::Devices {
                    user_id: user_id.to_string(),
                    devices,
                })
            }
            AdminCommand::Revoke { name, device_id } => {
                let user_id = self.accounts.user_id_for(&name)?;
                let devices = self.store.list_devices(user_id.as_str()).await?;
                if !devices.iter().any(|d| d.device_id == device_id) {
                    return Err(Error::not_found(format!("{user_id} has no device {device_id}")));
                }
                self.accounts.revoke_device(&user_id, &device_id).await?;
                Ok(AdminOutcome::Revoked {
                    user_id: user_id.to_string(),
                    device_id,
                })
            }
            AdminCommand::Psk { name, device_id } => {
                let user_id = self.existing_user(&name, true).await?;
                let grant = self.accounts.mint_psk(&user_id, device_id.as_deref()).await?;
                Ok(AdminOutcome::Psk {
                    user_id: grant.user_id.to_string(),
                    device_id: grant.device_id,
                    identity: grant.identity,
                    key: grant.key,
                })
            }
            AdminCommand::Reports { limit } => Ok(AdminOutcome::Reports {
                reports: self.store.reports(limit).await?,
            }),
            AdminCommand::MediaList { user, limit } => {
                let uploader = match user {
                    Some(name) => Some(self.accounts.user_id_for(&name)?.to_string()),
                    None => None,
                };
                let media = self
                    .list_media(weft_store::MediaQuery {
                        uploader,
                        before_ms: None,
                        limit,
                    })
                    .await?
                    .into_iter()
                    .map(|m| AdminMedia {
                        mxc: self.mxc(&m.media_id),
                        uploader: m.uploader,
                        created_ms: m.created_ms,
                        size: m.content.as_ref().map(|c| c.size),
                        content_type: m.content.as_ref().and_then(|c| c.content_type.clone()),
                        filename: m.content.and_then(|c| c.filename),
                        quarantined: m.quarantined,
                    })
                    .collect();
                Ok(AdminOutcome::Media { media })
            }
            AdminCommand::MediaStats => Ok(AdminOutcome::MediaStats {
                stats: self.store.media_stats().await?,
            }),
            AdminCommand::MediaPurge { older_than_ms, user } => {
                let user = match user {
                    Some(name) => Some(self.accounts.user_id_for(&name)?.to_string()),
                    None => None,
                };
                Ok(AdminOutcome::MediaPurged {
                    deleted: self.purge_media(older_than_ms, user).await?,
                })
            }
            AdminCommand::MediaQuarantine { media, release } => {
                let id = self.local_media_id(&media)?;
                if !self.quarantine_media(&id, !release).await? {
                    return Err(Error::not_found(format!("no media {media}")));
                }
                Ok(AdminOutcome::MediaQuarantined {
                    mxc: self.mxc(&id),
                    quarantined: !release,
                })
            }
            AdminCommand::AppserviceList => Ok(AdminOutcome::Appservices {
                now_ms: weft_core::now_ms(),
                services: self.appservice_list().await?,
            }),
            AdminCommand::FederationDestinations => Ok(AdminOutcome::Destinations {
                now_ms: weft_core::now_ms(),
                destinations: self.federation_destinations().await?,
            }),
            AdminCommand::FederationQueueEdu {
                destination,
                edu_type,
                content,
            } => {
                let server = server_name(&destination)?;
                let content = serde_json::from_str(&content)
                    .map_err(|e| Error::bad_json(format!("The EDU content is not JSON: {e}")))?;
                self.queue_edu(&server, &edu_type, content).await?;
                Ok(AdminOutcome::EduQueued { destination })
            }
            AdminCommand::FederationSendTransaction {
                destination,
                txn_id,
                body,
            } => {
                let server = server_name(&destination)?;
                let response = self.send_transaction_now(&server, &txn_id, &body).await?;
                Ok(AdminOutcome::TransactionAnswer { destination, response })
            }
        }
    }

    /// The user ID for `name` if that user exists (and, with `active`, is
    /// not deactivated).
    async fn existing_user(&self, name: &str, active: bool) -> Result<ruma::OwnedUserId> {
        let user_id = self.accounts.user_id_for(name)?;
        match self.store.get_user(user_id.as_str()).await? {
            Some(u) if !(active && u.deactivated) => Ok(user_id),
            _ if active => Err(Error::not_found(format!("no such active user {user_id}"))),
            _ => Err(Error::not_found(format!("no such user {user_id}"))),
        }
    }

    /// Deactivates an account: leaves every room first, so other members
    /// see the account go, then logs out every device and refuses logins.
    /// The same for `POST /account/deactivate` and `weft user deactivate`.
    pub async fn deactivate_account(&self, user_id: &ruma::UserId) -> Result<()> {
        for room in self.joined_rooms(user_id).await? {
            if let Err(e) = self
                .set_membership(user_id, &room, user_id.as_str(), "leave", None)
                .await
            {
                tracing::warn!(%user_id, %room, "deactivation could not leave the room: {}", e.message);
            }
        }
        self.accounts.deactivate(user_id).await
    }
}

fn server_name(name: &str) -> Result<ruma::OwnedServerName> {
    ruma::OwnedServerName::try_from(name)
        .map_err(|e| Error::invalid_param(format!("Invalid server name {name:?}: {e}")))
}
