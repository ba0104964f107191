//! Revocation of long-lived connections. A request is authenticated when
//! it comes; a connection that stays open (an MQTT session, a WebSocket
//! sync loop) holds a [`SessionWatch`] and asks it before it accepts or
//! delivers anything, and waits on [`SessionWatch::revoked`] to end at once
//! when its access token is logged out, its device deleted (`weft user
//! revoke`) or its user deactivated or logged out by a password change.
//!
//! The check is one indexed read of the token. It is made again when
//! anything was revoked since (a counter the watches follow, bumped by
//! every revocation through [`crate::Accounts`] in this process and, for
//! revocations of any process sharing the database, by
//! [`crate::Services::start_revocation_follower`] when the stream carries
//! a [`StreamKey::Revoked`] the revoking write added), before accepting or
//! delivering if the last check is older than [`RECHECK`], and by an idle
//! connection every [`IDLE_RECHECK`]. A revocation another process writes
//! is thus seen as soon as this process follows the stream past it
//! (milliseconds on PostgreSQL: the commit's notification; at most the
//! follower's one-second poll of the head if a notification was missed),
//! and the polling stays as a safety net (docs/operations.md).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use weft_core::{Error, ErrorKind, Result};
use weft_store::{Store, StreamKey};

use crate::Session;
use crate::accounts::token_hash;

/// A check younger than this is trusted before delivering or accepting,
/// unless this process revoked something since.
pub const RECHECK: Duration = Duration::from_secs(1);
/// An idle connection checks this often.
pub const IDLE_RECHECK: Duration = Duration::from_secs(30);

/// Whether one connection's credential still holds.
pub struct SessionWatch {
    store: Arc<dyn Store>,
    session: Session,
    credential: Held,
    revocations: watch::Receiver<u64>,
    state: Mutex<State>,
    /// Set once a check finds the credential revoked, so every waiter on
    /// [`SessionWatch::revoked`] learns of it, whoever checked.
    gone: watch::Sender<bool>,
}

struct State {
    /// The revocation counter at the last check.
    seen: u64,
    /// When the store was last asked (`None`: not yet).
    checked: Option<Instant>,
}

fn revoked_error() -> Error {
    Error::new(
        ErrorKind::UnknownToken { soft_logout: false },
        "The access token of this connection was revoked",
    )
}

/// What a connection authenticated with, as it is looked up again.
enum Held {
    /// The hash of an access token.
    TokenHash(Vec<u8>),
    /// The identity of a device's pre-shared key (a CoAP DTLS session).
    Psk(String),
    /// An application service's `as_token` (docs/appservices.md): it is
    /// never revoked while the server runs; the session holds while the
    /// user it acts as is registered and not deactivated (and the device
    /// it acts as, with MSC3202 device masquerading, exists).
    Appservice,
}

impl crate::Services {
    /// Follows the stream for revocations written by any process sharing
    /// the database ([`StreamKey::Revoked`]) and makes every open
    /// connection of this process check its credential again. Runs in
    /// every process (the server starts it once).
    pub fn start_revocation_follower(self: &Arc<Self>) {
        let s = self.clone();
        tokio::spawn(async move {
            let mut rx = s.store.subscribe_position();
            let mut seen = *rx.borrow_and_update();
            while rx.changed().await.is_ok() {
                let upto = *rx.borrow_and_update();
                let revoked = s.stream_touched(seen, upto, |k| matches!(k, StreamKey::Revoked(_)));
                seen = upto;
                if revoked {
                    s.accounts.revoked();
                }
            }
        });
    }

    /// A watch over `session`, authenticated with the access token `token`.
    pub fn watch_session(&self, session: &Session, token: &str) -> Arc<SessionWatch> {
        if session.appservice.is_some() {
            return self.watch(session, Held::Appservice);
        }
        self.watch(session, Held::TokenHash(token_hash(token)))
    }

    /// A watch over `session`, authenticated with the pre-shared key
    /// `identity` (revoked when the key is replaced or the device deleted).
    pub fn watch_psk_session(&self, session: &Session, identity: &str) -> Arc<SessionWatch> {
        self.watch(session, Held::Psk(identity.to_owned()))
    }

    fn watch(&self, session: &Session, credential: Held) -> Arc<SessionWatch> {
        let revocations = self.accounts.revocations.subscribe();
        let seen = *revocations.borrow();
        Arc::new(SessionWatch {
            store: self.store.clone(),
            session: session.clone(),
            credential,
            state: Mutex::new(State {
                seen,
                // The first check asks the store: the session may have been
                // revoked between its authentication and now.
                checked: None,
            }),
            gone: watch::Sender::new(false),
            revocations,
        })
    }
}

impl SessionWatch {
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// `Err(M_UNKNOWN_TOKEN)` once the credential is revoked. Cheap: asks
    /// the store only if this process revoked something since the last
    /// check or that is older than [`RECHECK`].
    pub async fn check(&self) -> Result<()> {
        let now = *self.revocations.borrow();
        if *self.gone.borrow() {
            return Err(revoked_error());
        }
        {
            let st = self.state.lock();
            if st.seen == now && st.checked.is_some_and(|t| t.elapsed() < RECHECK) {
                return Ok(());
            }
        }
        self.check_store(now).await
    }

    async fn check_store(&self, counter: u64) -> Result<()> {
        let owner = match &self.credential {
            Held::TokenHash(hash) => self
                .store
                .lookup_token(hash)
                .await
                .map(|o| o.map(|o| (o.user_id, o.device_id))),
            Held::Psk(identity) => self
                .store
                .lookup_psk(identity)
                .await
                .map(|o| o.map(|o| (o.user_id, o.device_id))),
            Held::Appservice => self.appservice_owner().await,
        };
        let owner = match owner {
            Ok(o) => o,
            Err(e) => {
                // The store failing is no revocation: check again later.
                tracing::warn!("checking a session failed: {}", e.message);
                let mut st = self.state.lock();
                st.seen = counter;
                st.checked = Some(Instant::now());
                return Ok(());
            }
        };
        let valid = owner
            .is_some_and(|(user, device)| user == self.session.user_id.as_str() && device == self.session.device_id);
        {
            let mut st = self.state.lock();
            st.seen = counter;
            st.checked = Some(Instant::now());
        }
        if !valid {
            self.gone.send_replace(true);
            return Err(revoked_error());
        }
        Ok(())
    }

    /// Who an application service's session still is: its user and
    /// device while they exist (the user not deactivated).
    async fn appservice_owner(&self) -> Result<Option<(String, String)>> {
        let user = self.session.user_id.as_str();
        if self.store.get_user(user).await?.is_none_or(|u| u.deactivated) {
            return Ok(None);
        }
        let device = &self.session.device_id;
        let acts_as_device = self.session.appservice.as_deref().map(|id| format!("appservice:{id}"));
        if acts_as_device.as_deref() != Some(device.as_str())
            && !self
                .store
                .list_devices(user)
                .await?
                .iter()
                .any(|d| &d.device_id == device)
        {
            return Ok(None);
        }
        Ok(Some((user.to_owned(), device.clone())))
    }

    /// Resolves (with the error to report) once the credential is revoked:
    /// checks whenever this process revokes something and every
    /// [`IDLE_RECHECK`]. Dropping and re-creating the future loses nothing.
    pub async fn revoked(&self) -> Error {
        let mut rx = self.revocations.clone();
        let mut gone = self.gone.subscribe();
        loop {
            let now = *rx.borrow_and_update();
            if *gone.borrow_and_update() {
                return revoked_error();
            }
            let next = {
                let st = self.state.lock();
                match st.checked {
                    Some(t) if st.seen == now => Some(t + IDLE_RECHECK),
                    _ => None,
                }
            };
            match next {
                Some(at) if at > Instant::now() => {
                    tokio::select! {
                        changed = rx.changed() => {
                            if changed.is_err() {
                                // No more revocations can come from this process.
                                sleep_until(at).await;
                            }
                        }
                        _ = sleep_until(at) => {}
                        _ = gone.changed() => {}
                    }
                }
                _ => {
                    if let Err(e) = self.check_store(now).await {
                        return e;
                    }
                }
            }
        }
    }
}
