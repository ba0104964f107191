//! Rows of end-to-end encryption across servers: the log of local device
//! changes other servers are told of, the cached device lists and
//! cross-signing keys of other servers' users, and OpenID tokens.

use async_trait::async_trait;

use crate::Result;

/// One logged change of a local device (see `device_list_log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceListChange {
    pub stream_id: i64,
    /// The user's change logged before this one, if any.
    pub prev_id: Option<i64>,
    pub device_id: String,
    pub deleted: bool,
}

/// A device of another server's user as its server described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDevice {
    pub device_id: String,
    /// The device keys JSON (`None`: a device without keys).
    pub keys_json: Option<String>,
    pub display_name: Option<String>,
}

/// The cached device list of another server's user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDeviceList {
    pub user_id: String,
    /// The stream ID of the newest update applied; `None`: unknown.
    pub stream_id: Option<i64>,
    /// Known to be out of date (an update could not be applied).
    pub stale: bool,
    pub fetched_ms: u64,
    pub devices: Vec<RemoteDevice>,
    /// (`master` | `self_signing`, key JSON).
    pub cross_signing: Vec<(String, String)>,
}

/// One `m.device_list_update` EDU's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteDeviceUpdate {
    pub user_id: String,
    pub device_id: String,
    pub stream_id: i64,
    pub prev_ids: Vec<i64>,
    pub deleted: bool,
    pub keys_json: Option<String>,
    pub display_name: Option<String>,
}

/// What became of a [`RemoteDeviceUpdate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceUpdateOutcome {
    /// Applied to the cached list (its `prev_id` was the list's stream ID).
    Applied,
    /// Not applied: the cached list missed an update and is now marked stale.
    Stale,
    /// The user's list is not cached; nothing stored.
    NotCached,
    /// Already applied (a repeat).
    Old,
}

#[async_trait]
pub trait E2eeFederationStore: Send + Sync + 'static {
    /// The changes of `user_id`'s devices logged at stream position
    /// `position`, by stream ID.
    async fn device_list_log(&self, user_id: &str, position: i64) -> Result<Vec<DeviceListChange>>;
    /// The stream ID of `user_id`'s newest logged device change (0: none).
    async fn device_list_stream_id(&self, user_id: &str) -> Result<i64>;

    /// The cached device list of another server's user.
    async fn remote_device_list(&self, user_id: &str) -> Result<Option<RemoteDeviceList>>;
    /// Replaces the cached device list (devices and cross-signing keys) of
    /// another server's user, not stale. With `announce`, the change gets a
    /// stream position (`StreamKey::DeviceKeys`) as local changes do.
    async fn put_remote_device_list(&self, list: RemoteDeviceList, announce: bool) -> Result<()>;
    /// Applies one device update to a cached list when its `prev_ids` hold
    /// the list's stream ID; otherwise marks the list stale. Applied and
    /// stale updates, and updates of lists not cached, get a stream
    /// position (`StreamKey::DeviceKeys`).
    async fn apply_remote_device_update(&self, update: RemoteDeviceUpdate) -> Result<DeviceUpdateOutcome>;
    /// Sets cross-signing keys of another server's user (replacing those
    /// of the same type) if their list is cached, and announces the change
    /// (stream position). Answers whether the list was cached.
    async fn put_remote_cross_signing_keys(&self, user_id: &str, keys: Vec<(String, String)>) -> Result<bool>;
    /// Marks the cached device list of another server's user stale.
    async fn mark_remote_device_list_stale(&self, user_id: &str) -> Result<()>;

    /// Stores an OpenID token of a local user, valid until `expires_ms`.
    async fn put_openid_token(&self, token: &str, user_id: &str, expires_ms: u64) -> Result<()>;
    /// The user of an OpenID token not expired at `now_ms`.
    async fn openid_token_user(&self, token: &str, now_ms: u64) -> Result<Option<String>>;
}
