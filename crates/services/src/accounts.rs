//! Accounts, devices and access tokens. Passwords are hashed with argon2;
//! tokens are random, stored only as their SHA-256 (so a leaked database
//! holds no usable token), and looked up by that hash.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier, password_hash::SaltString};
use base64::Engine;
use parking_lot::Mutex;
use rand::Rng;
use ruma::{OwnedServerName, OwnedUserId, UserId};
use sha2::{Digest, Sha256};
use weft_core::config::{RateLimitConfig, RegistrationConfig, RegistrationMode};
use weft_core::{Error, ErrorKind, Result};
use weft_store::{NewUser, Store};

use crate::RateLimiter;
use crate::ratelimit::SharedLimiter;

/// An authenticated device.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: OwnedUserId,
    pub device_id: String,
    /// The application service acting (with its `as_token`), as itself or
    /// as a user of its namespace (docs/appservices.md).
    pub appservice: Option<String>,
}

/// What a login or registration hands back.
#[derive(Debug, Clone)]
pub struct LoginResult {
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub access_token: String,
}

/// A freshly minted DTLS pre-shared key.
#[derive(Debug, Clone)]
pub struct PskGrant {
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub identity: String,
    pub key: String,
}

/// How long a user-interactive auth session lives (an hour).
pub const UIA_SESSION_MS: u64 = 3_600_000;

pub struct Accounts {
    store: Arc<dyn Store>,
    server_name: OwnedServerName,
    registration: RegistrationConfig,
    /// Bumped by every revocation this process makes (logout, device
    /// deletion, deactivation), so open connections re-check at once
    /// (see [`crate::revocation::SessionWatch`]).
    pub(crate) revocations: tokio::sync::watch::Sender<u64>,
    /// Access tokens this process resolved lately (see [`TokenCache`]).
    tokens: Mutex<TokenCache>,
    /// When each device's last-seen time and address were last written, and
    /// the address written: (user, device) -> (address, when). Kept in this
    /// process's memory only, to write at most once per
    /// [`LAST_SEEN_INTERVAL_MS`] per device unless its address changes.
    last_seen: Mutex<HashMap<DeviceKey, (Option<IpAddr>, u64)>>,
    /// The general limiter (shared with the doors): unknown access tokens
    /// are charged to the client address's bucket.
    requests: Arc<RateLimiter>,
    /// Failed password logins, a bucket per address (`ip:…`) and per
    /// account (`user:…`), in the database: shared by every process.
    failed_logins: SharedLimiter,
}

/// (user ID, device ID).
type DeviceKey = (String, String);

/// How often a device's `last_seen_ts` is refreshed while it stays at the
/// same address.
pub const LAST_SEEN_INTERVAL_MS: u64 = 60_000;
/// Entries of the last-seen record beyond which old ones are dropped.
const LAST_SEEN_MAX_ENTRIES: usize = 100_000;

pub fn random_string(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(rand::distributions::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// How long a resolved access token is trusted without reading the store
/// again. Revocations empty the cache at once (this process's own, and other
/// processes' through the stream, see [`crate::revocation`]); this bound is
/// a safety net only.
const TOKEN_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// Past this many tokens the cache starts over.
const TOKEN_CACHE_MAX: usize = 100_000;

/// Access tokens resolved lately, by hash, so a request's authentication is
/// a map lookup rather than a database read (the hot path of every door).
/// Kept in this process's memory (docs/operations.md): valid while the
/// revocation counter it was filled under stands.
#[derive(Default)]
struct TokenCache {
    /// The revocation counter the entries were read under.
    generation: u64,
    entries: HashMap<Vec<u8>, (Session, std::time::Instant)>,
}

impl TokenCache {
    fn get(&mut self, hash: &[u8], generation: u64) -> Option<Session> {
        if self.generation != generation {
            return None;
        }
        match self.entries.get(hash) {
            Some((session, at)) if at.elapsed() < TOKEN_CACHE_TTL => Some(session.clone()),
            Some(_) => {
                self.entries.remove(hash);
                None
            }
            None => None,
        }
    }

    /// Keeps `session` for `hash`, read from the store under the revocation
    /// counter `read_under`; `now` is the counter after the read.
    fn put(&mut self, hash: Vec<u8>, session: Session, read_under: u64, now: u64) {
        if read_under != now {
            return;
        }
        if self.generation != now {
            self.entries.clear();
            self.generation = now;
        }
        if self.entries.len() >= TOKEN_CACHE_MAX {
            self.entries.clear();
        }
        self.entries.insert(hash, (session, std::time::Instant::now()));
    }

    fn clear(&mut self) {
        self.entries.clear();
    }
}

fn device_json(d: weft_store::DeviceRecord) -> serde_json::Value {
    let mut v = serde_json::json!({ "device_id": d.device_id, "display_name": d.display_name });
    if let Some(ts) = d.last_seen_ms {
        v["last_seen_ts"] = ts.into();
    }
    if let Some(ip) = d.last_seen_ip {
        v["last_seen_ip"] = ip.into();
    }
    v
}

/// What every access token starts with, and the length of the base64
/// (URL-safe, unpadded) of its 24 random bytes after it.
const TOKEN_PREFIX: &str = "wft_";
const TOKEN_BODY_LEN: usize = 32;

fn new_token() -> String {
    let bytes: [u8; 24] = rand::thread_rng().r#gen();
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Whether `token` could be one [`new_token`] made: anything else is
/// unknown without asking the database (a flood of garbage tokens costs
/// no query).
fn may_be_token(token: &str) -> bool {
    token.strip_prefix(TOKEN_PREFIX).is_some_and(|body| {
        body.len() == TOKEN_BODY_LEN
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// Argon2 takes ~19 MiB per hash: at most this many run at once, so a
/// burst of logins cannot balloon memory (or starve the other threads).
static HASHING: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    tokio::sync::Semaphore::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2))
});

async fn hash_password(password: String) -> Result<String> {
    let _permit = HASHING.acquire().await.map_err(Error::internal)?;
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| Error::internal(format!("password hashing: {e}")))
    })
    .await
    .map_err(Error::internal)?
}

/// Constant-time (argon2's own comparison) password check.
async fn verify_password(password: String, hash: String) -> bool {
    let Ok(_permit) = HASHING.acquire().await else {
        return false;
    };
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// Localparts the spec allows: `a-z 0-9 . _ = - / +`.
pub fn valid_localpart(localpart: &str) -> bool {
    !localpart.is_empty()
        && localpart
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
}

impl Accounts {
    pub fn new(
        store: Arc<dyn Store>,
        server_name: OwnedServerName,
        registration: RegistrationConfig,
        requests: Arc<RateLimiter>,
        rate_limit: &RateLimitConfig,
    ) -> Self {
        Self {
            failed_logins: SharedLimiter::failed_logins(store.clone(), rate_limit),
            store,
            server_name,
            registration,
            revocations: tokio::sync::watch::Sender::new(0),
            tokens: Mutex::new(TokenCache::default()),
            last_seen: Mutex::new(HashMap::new()),
            requests,
        }
    }

    /// Tells open connections that credentials may have been revoked, and
    /// forgets the access tokens resolved so far.
    pub(crate) fn revoked(&self) {
        self.revocations.send_modify(|n| *n = n.wrapping_add(1));
        self.tokens.lock().clear();
    }

    pub fn registration_mode(&self) -> RegistrationMode {
        self.registration.mode
    }

    /// The full user ID for a localpart (or an already full ID on this server).
    pub fn user_id_for(&self, name: &str) -> Result<OwnedUserId> {
        let localpart = if let Some(rest) = name.strip_prefix('@') {
            let (local, server) = rest
                .split_once(':')
                .ok_or_else(|| Error::new(ErrorKind::InvalidUsername, "User ID must be @localpart:server"))?;
            if server != self.server_name.as_str() {
                return Err(Error::new(ErrorKind::InvalidUsername, "User is not on this server"));
            }
            local
        } else {
            name
        };
        if !valid_localpart(localpart) {
            return Err(Error::new(
                ErrorKind::InvalidUsername,
                "User names may only contain a-z, 0-9, and . _ = - / +",
            ));
        }
        let id = format!("@{localpart}:{}", self.server_name);
        if id.len() > 255 {
            return Err(Error::new(ErrorKind::InvalidUsername, "User ID is too long"));
        }
        OwnedUserId::try_from(id).map_err(|e| Error::new(ErrorKind::InvalidUsername, e.to_string()))
    }

    fn check_password_strength(&self, password: &str) -> Result<()> {
        if password.chars().count() < self.registration.min_password_length {
            return Err(Error::new(
                ErrorKind::WeakPassword,
                format!(
                    "Password must be at least {} characters",
                    self.registration.min_password_length
                ),
            ));
        }
        Ok(())
    }

    /// Creates an account (used by registration and by the admin CLI).
    pub async fn create_user(&self, name: &str, password: Option<&str>, admin: bool) -> Result<OwnedUserId> {
        let user_id = self.user_id_for(name)?;
        let password_hash = match password {
            Some(p) => {
                self.check_password_strength(p)?;
                Some(hash_password(p.to_owned()).await?)
            }
            None => None,
        };
        self.store
            .create_user(NewUser {
                user_id: user_id.to_string(),
                password_hash,
                admin,
                created_ms: weft_core::now_ms(),
            })
            .await?;
        Ok(user_id)
    }

    pub async fn is_available(&self, name: &str) -> Result<bool> {
        let user_id = self.user_id_for(name)?;
        Ok(self.store.get_user(user_id.as_str()).await?.is_none())
    }

    /// Creates (or reuses, given its ID) a device with a fresh access token.
    pub async fn new_device(
        &self,
        user_id: &UserId,
        device_id: Option<&str>,
        display_name: Option<&str>,
    ) -> Result<LoginResult> {
        crate::text::check_opt_text("Device ID", device_id)?;
        crate::text::check_opt_text("Device display name", display_name)?;
        let device_id = match device_id {
            Some(d) if !d.is_empty() && d.len() <= 255 => d.to_owned(),
            Some(_) => return Err(Error::invalid_param("Invalid device_id")),
            None => random_string(10).to_uppercase(),
        };
        let access_token = new_token();
        let replaced = self
            .store
            .upsert_device(user_id.as_str(), &device_id, display_name, &token_hash(&access_token))
            .await?;
        if replaced {
            // The device's old access token no longer holds.
            self.revoked();
        }
        // A re-created device has no address recorded yet.
        self.last_seen
            .lock()
            .remove(&(user_id.as_str().to_owned(), device_id.clone()));
        Ok(LoginResult {
            user_id: user_id.to_owned(),
            device_id,
            access_token,
        })
    }

    /// Mints a DTLS pre-shared key for a device of `user_id` (a new device,
    /// or the named one, created if needed), replacing the device's old
    /// key. Identity and key are printable, so they can be typed into
    /// `coap-client -u IDENTITY -k KEY`; the key has about 190 bits.
    pub async fn mint_psk(&self, user_id: &UserId, device_id: Option<&str>) -> Result<PskGrant> {
        crate::text::check_opt_text("Device ID", device_id)?;
        let device_id = match device_id {
            Some(d) if !d.is_empty() && d.len() <= 255 => d.to_owned(),
            Some(_) => return Err(Error::invalid_param("Invalid device_id")),
            None => random_string(10).to_uppercase(),
        };
        let identity = format!("wpsk_{}", random_string(20));
        let key = random_string(32);
        self.store
            .set_device_psk(user_id.as_str(), &device_id, &identity, key.as_bytes())
            .await?;
        // The device's old key, if any, no longer holds.
        self.revoked();
        Ok(PskGrant {
            user_id: user_id.to_owned(),
            device_id,
            identity,
            key,
        })
    }

    /// The device a DTLS pre-shared key identity belongs to, with the key;
    /// `None` if the identity is unknown or revoked.
    pub async fn psk_owner(&self, identity: &str) -> Result<Option<(Session, Vec<u8>)>> {
        let Some(owner) = self.store.lookup_psk(identity).await? else {
            return Ok(None);
        };
        let user_id = OwnedUserId::try_from(owner.user_id).map_err(Error::internal)?;
        Ok(Some((
            Session {
                user_id,
                device_id: owner.device_id,
                appservice: None,
            },
            owner.psk,
        )))
    }

    /// Resolves an access token to its device. An unknown token costs the
    /// client address `ip` one request of the general rate limit, so a
    /// flood of made-up tokens gets `M_LIMIT_EXCEEDED` like anonymous
    /// requests do.
    pub async fn authenticate(&self, token: &str, ip: Option<IpAddr>) -> Result<Session> {
        if may_be_token(token) {
            let hash = token_hash(token);
            let generation = *self.revocations.borrow();
            if let Some(session) = self.tokens.lock().get(&hash, generation) {
                return Ok(session);
            }
            if let Some(owner) = self.store.lookup_token(&hash).await? {
                let session = Session {
                    user_id: OwnedUserId::try_from(owner.user_id).map_err(Error::internal)?,
                    device_id: owner.device_id,
                    appservice: None,
                };
                // Kept only if nothing was revoked while the store was read.
                let now = *self.revocations.borrow();
                self.tokens.lock().put(hash, session.clone(), generation, now);
                return Ok(session);
            }
        }
        if let Some(ip) = ip {
            self.requests.check(&format!("ip:{ip}"))?;
        }
        Err(Error::new(
            ErrorKind::UnknownToken { soft_logout: false },
            "Unknown access token",
        ))
    }

    /// Records that a session's device made a request, from `ip` if the door
    /// knows the client's address: its `last_seen_ts` and `last_seen_ip`
    /// (`GET /devices`). The database is written when the device is first
    /// seen by this process or changes address (and then awaited, so the
    /// answer to this very request already shows it), and otherwise at most
    /// once per [`LAST_SEEN_INTERVAL_MS`], in the background.
    pub async fn touch_device(&self, session: &Session, ip: Option<IpAddr>) {
        let now = weft_core::now_ms();
        let key = (session.user_id.as_str().to_owned(), session.device_id.clone());
        let wait = {
            let mut seen = self.last_seen.lock();
            let wait = match seen.get(&key) {
                None => true,
                Some((prev_ip, _)) if ip.is_some() && *prev_ip != ip => true,
                Some((_, at)) if now.saturating_sub(*at) >= LAST_SEEN_INTERVAL_MS => false,
                Some(_) => return,
            };
            if seen.len() >= LAST_SEEN_MAX_ENTRIES {
                seen.retain(|_, (_, at)| now.saturating_sub(*at) < LAST_SEEN_INTERVAL_MS);
            }
            let ip = ip.or_else(|| seen.get(&key).and_then(|(i, _)| *i));
            seen.insert(key.clone(), (ip, now));
            wait
        };
        let ip = ip.map(|i| i.to_canonical().to_string());
        let store = self.store.clone();
        // Bookkeeping only: a failed write is logged, never fails the request.
        let write = async move {
            if let Err(e) = store.touch_device(&key.0, &key.1, ip.as_deref(), now).await {
                tracing::warn!("recording a device's last-seen time: {}", e.message);
            }
        };
        if wait {
            write.await;
        } else {
            tokio::spawn(write);
        }
    }

    /// The session's user's devices as `GET /devices` lists them.
    pub async fn devices(&self, session: &Session) -> Result<Vec<serde_json::Value>> {
        let devices = self.store.list_devices(session.user_id.as_str()).await?;
        Ok(devices.into_iter().map(device_json).collect())
    }

    /// One of the session's user's devices (`GET /devices/{deviceId}`);
    /// another user's device, like a missing one, is `404 M_NOT_FOUND`.
    pub async fn device(&self, session: &Session, device_id: &str) -> Result<serde_json::Value> {
        let devices = self.store.list_devices(session.user_id.as_str()).await?;
        devices
            .into_iter()
            .find(|d| d.device_id == device_id)
            .map(device_json)
            .ok_or_else(|| Error::not_found("Device not found"))
    }

    /// Checks a password for a user; the error is the same whether the
    /// user exists or not. Every door's password login comes here, with
    /// the client's address when it has one: each attempt takes one from
    /// the address's and the account's failed-login buckets (given back
    /// if the password is right), and when either is empty the answer is
    /// `M_LIMIT_EXCEEDED` without checking the password.
    pub async fn check_password(&self, user: &str, password: &str, ip: Option<IpAddr>) -> Result<OwnedUserId> {
        let account = match self.user_id_for(user) {
            Ok(id) => format!("user:{id}"),
            // Not a user name here: still one bucket per name tried.
            Err(_) => format!("user:{}", user.chars().take(255).collect::<String>().to_lowercase()),
        };
        let address = ip.map(|ip| format!("ip:{ip}"));
        if let Some(a) = &address {
            self.failed_logins.check(a).await?;
        }
        if let Err(e) = self.failed_logins.check(&account).await {
            if let Some(a) = &address {
                self.failed_logins.refund(a).await?;
            }
            return Err(e);
        }
        let checked = self.verify_login(user, password).await;
        if checked.is_ok() {
            if let Some(a) = &address {
                self.failed_logins.refund(a).await?;
            }
            self.failed_logins.refund(&account).await?;
        }
        checked
    }

    async fn verify_login(&self, user: &str, password: &str) -> Result<OwnedUserId> {
        let wrong = || Error::forbidden("Invalid username or password");
        let user_id = self.user_id_for(user).map_err(|_| wrong())?;
        let Some(record) = self.store.get_user(user_id.as_str()).await? else {
            // Spend the same time as a real check, so existence does not leak.
            let _ = verify_password(password.to_owned(), DUMMY_HASH.to_owned()).await;
            return Err(wrong());
        };
        if record.deactivated {
            return Err(Error::new(
                ErrorKind::UserDeactivated,
                "This account has been deactivated",
            ));
        }
        let Some(hash) = record.password_hash else {
            return Err(wrong());
        };
        if verify_password(password.to_owned(), hash).await {
            Ok(user_id)
        } else {
            Err(wrong())
        }
    }

    pub async fn set_password(&self, user_id: &UserId, password: &str) -> Result<()> {
        self.check_password_strength(password)?;
        let hash = hash_password(password.to_owned()).await?;
        self.store.set_password_hash(user_id.as_str(), &hash).await
    }

    pub async fn logout(&self, session: &Session) -> Result<()> {
        self.revoke_device(&session.user_id, &session.device_id).await
    }

    /// Deletes a device: its token, keys and queued messages. Open
    /// connections of it end.
    pub async fn revoke_device(&self, user_id: &UserId, device_id: &str) -> Result<()> {
        let r = self.store.delete_device(user_id.as_str(), device_id).await;
        self.revoked();
        r
    }

    pub async fn logout_all(&self, user_id: &UserId) -> Result<()> {
        self.logout_all_except(user_id, None).await
    }

    /// Deletes every device of the user but `keep` (if given).
    pub async fn logout_all_except(&self, user_id: &UserId, keep: Option<&str>) -> Result<()> {
        let r = self.store.delete_devices_except(user_id.as_str(), keep).await;
        self.revoked();
        r
    }

    pub async fn deactivate(&self, user_id: &UserId) -> Result<()> {
        let r = self.store.deactivate_user(user_id.as_str()).await;
        self.revoked();
        r
    }

    // ---- user-interactive auth ----

    /// Starts or continues a UIA session; returns the 401 body to send when
    /// `auth` does not complete `flow`. `check` validates one stage.
    pub fn uia_body(&self, session: &str, flows: &[&[&str]], completed: &[String]) -> serde_json::Value {
        let flows: Vec<_> = flows.iter().map(|f| serde_json::json!({ "stages": f })).collect();
        serde_json::json!({ "flows": flows, "params": {}, "session": session, "completed": completed })
    }

    /// A new UIA session, stored in the database (so the next request of
    /// the flow may reach any process sharing it); it lives
    /// [`UIA_SESSION_MS`]. Older ones are deleted meanwhile.
    pub async fn new_uia_session(&self) -> Result<String> {
        let id = random_string(24);
        let now = weft_core::now_ms();
        self.store
            .create_uia_session(&id, now, now.saturating_sub(UIA_SESSION_MS))
            .await?;
        Ok(id)
    }

    /// Records `stage` as completed in the session; answers the stages
    /// completed (none for an unknown session).
    pub async fn uia_complete_stage(&self, session: &str, stage: &str) -> Result<Vec<String>> {
        self.store.uia_complete_stage(session, stage).await
    }

    /// Whether `session` is a UIA session this server issued (by any
    /// process), not finished and not expired.
    pub async fn uia_known(&self, session: &str) -> Result<bool> {
        let not_before = weft_core::now_ms().saturating_sub(UIA_SESSION_MS);
        Ok(self.store.uia_session(session, not_before).await?.is_some())
    }

    pub async fn uia_finish(&self, session: &str) -> Result<()> {
        self.store.delete_uia_session(session).await
    }

    /// Whether `token` is an accepted registration token.
    pub fn registration_token_valid(&self, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.registration
            .tokens
            .iter()
            .any(|t| t.as_bytes().ct_eq(token.as_bytes()).into())
    }
}

/// An argon2 hash of a random password, verified against when the user
/// does not exist.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$3l3Gd0G+gTrCCUFGJ9Yyj+o8PZ8Dg3w8Bq0l4mRi5Jg";

#[cfg(test)]
mod token_shape_tests {
    use super::*;

    #[test]
    fn every_made_token_has_the_shape_and_garbage_does_not() {
        for _ in 0..1000 {
            let t = new_token();
            assert!(may_be_token(&t), "{t}");
        }
        for bad in ["", "x", "wft_", "wft_short", "syt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"] {
            assert!(!may_be_token(bad), "{bad}");
        }
        let mut t = new_token();
        t.push('A');
        assert!(!may_be_token(&t), "one character too long");
        let t = new_token().replacen('_', "+", 2);
        assert!(!may_be_token(&t), "{t}");
    }
}
