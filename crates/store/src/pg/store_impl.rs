//! `Store` for [`PgStore`]: each method is in the module of its area.

use super::*;

#[async_trait::async_trait]
impl Store for PgStore {
    fn current_position(&self) -> i64 {
        self.current()
    }

    fn process_tag(&self) -> &str {
        &self.tag
    }

    fn subscribe_position(&self) -> tokio::sync::watch::Receiver<i64> {
        self.subscribe()
    }

    fn changes_since(&self, since: i64) -> Option<Vec<(i64, StreamKey)>> {
        self.recent().read().changes_since(since)
    }

    fn any_change(&self, since: i64, upto: i64, pred: &mut dyn FnMut(&StreamKey) -> bool) -> Option<bool> {
        self.recent().read().any_change(since, upto, pred)
    }

    fn on_foreign_room_writes(&self, hook: crate::ForeignRoomsHook) {
        self.foreign_room_writes(hook)
    }

    fn leadership(&self) -> tokio::sync::watch::Receiver<bool> {
        self.lease()
    }

    async fn create_user(&self, user: NewUser) -> Result<()> {
        accounts::create_user(self, user).await
    }

    async fn get_user(&self, user_id: &str) -> Result<Option<UserRecord>> {
        accounts::get_user(self, user_id).await
    }

    async fn list_users(&self) -> Result<Vec<UserRecord>> {
        accounts::list_users(self).await
    }

    async fn search_users(&self, requester: &str, term: &str, limit: usize) -> Result<Vec<UserRecord>> {
        misc::search_users(self, requester, term, limit).await
    }

    async fn add_report(&self, report: Report) -> Result<i64> {
        misc::add_report(self, report).await
    }

    async fn reports(&self, limit: usize) -> Result<Vec<Report>> {
        misc::reports(self, limit).await
    }

    async fn set_password_hash(&self, user_id: &str, hash: &str) -> Result<()> {
        accounts::set_password_hash(self, user_id, hash).await
    }

    async fn deactivate_user(&self, user_id: &str) -> Result<()> {
        accounts::deactivate_user(self, user_id).await
    }

    async fn set_profile_field(&self, user_id: &str, field: ProfileField, value: Option<String>) -> Result<()> {
        accounts::set_profile_field(self, user_id, field, value).await
    }

    async fn upsert_device(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
        token_hash: &[u8],
    ) -> Result<bool> {
        accounts::upsert_device(self, user_id, device_id, display_name, token_hash).await
    }

    async fn lookup_token(&self, token_hash: &[u8]) -> Result<Option<TokenOwner>> {
        accounts::lookup_token(self, token_hash).await
    }

    async fn list_devices(&self, user_id: &str) -> Result<Vec<DeviceRecord>> {
        accounts::list_devices(self, user_id).await
    }

    async fn touch_device(&self, user_id: &str, device_id: &str, ip: Option<&str>, ts_ms: u64) -> Result<()> {
        accounts::touch_device(self, user_id, device_id, ip, ts_ms).await
    }

    async fn set_device_display_name(
        &self,
        user_id: &str,
        device_id: &str,
        display_name: Option<&str>,
    ) -> Result<bool> {
        accounts::set_device_display_name(self, user_id, device_id, display_name).await
    }

    async fn delete_device(&self, user_id: &str, device_id: &str) -> Result<()> {
        accounts::delete_device(self, user_id, device_id).await
    }

    async fn delete_devices_except(&self, user_id: &str, keep: Option<&str>) -> Result<()> {
        accounts::delete_devices_except(self, user_id, keep).await
    }

    async fn set_device_psk(&self, user_id: &str, device_id: &str, identity: &str, psk: &[u8]) -> Result<()> {
        accounts::set_device_psk(self, user_id, device_id, identity, psk).await
    }

    async fn lookup_psk(&self, identity: &str) -> Result<Option<PskOwner>> {
        accounts::lookup_psk(self, identity).await
    }

    async fn create_backup_version(&self, user_id: &str, algorithm_json: &str) -> Result<i64> {
        accounts::create_backup_version(self, user_id, algorithm_json).await
    }

    async fn backup_version(&self, user_id: &str, version: Option<i64>) -> Result<Option<BackupVersion>> {
        accounts::backup_version(self, user_id, version).await
    }

    async fn update_backup_version(&self, user_id: &str, version: i64, algorithm_json: &str) -> Result<bool> {
        accounts::update_backup_version(self, user_id, version, algorithm_json).await
    }

    async fn delete_backup_version(&self, user_id: &str, version: i64) -> Result<bool> {
        accounts::delete_backup_version(self, user_id, version).await
    }

    async fn put_backup_keys(&self, user_id: &str, version: i64, keys: Vec<BackupKey>) -> Result<BackupWrite> {
        accounts::put_backup_keys(self, user_id, version, keys).await
    }

    async fn backup_keys(
        &self,
        user_id: &str,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<Vec<BackupKey>> {
        accounts::backup_keys(self, user_id, version, room_id, session_id).await
    }

    async fn delete_backup_keys(
        &self,
        user_id: &str,
        version: i64,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<BackupWrite> {
        accounts::delete_backup_keys(self, user_id, version, room_id, session_id).await
    }

    async fn upload_keys(
        &self,
        user_id: &str,
        device_id: &str,
        upload: KeyUpload,
    ) -> Result<std::collections::BTreeMap<String, u64>> {
        accounts::upload_keys(self, user_id, device_id, upload).await
    }

    async fn get_device_keys(&self, user_id: &str, device_ids: &[String]) -> Result<Vec<DeviceKeysRecord>> {
        accounts::get_device_keys(self, user_id, device_ids).await
    }

    async fn one_time_key_counts(
        &self,
        user_id: &str,
        device_id: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>> {
        accounts::one_time_key_counts(self, user_id, device_id).await
    }

    async fn unused_fallback_key_types(&self, user_id: &str, device_id: &str) -> Result<Vec<String>> {
        accounts::unused_fallback_key_types(self, user_id, device_id).await
    }

    async fn claim_keys(&self, wanted: Vec<(String, String, String)>) -> Result<Vec<ClaimedKey>> {
        accounts::claim_keys(self, wanted).await
    }

    async fn device_list_changes(&self, user_id: &str, since: i64, upto: i64) -> Result<Vec<String>> {
        accounts::device_list_changes(self, user_id, since, upto).await
    }

    async fn device_list_left(&self, user_id: &str, since: i64, upto: i64) -> Result<Vec<String>> {
        accounts::device_list_left(self, user_id, since, upto).await
    }

    async fn send_to_device(
        &self,
        sender: &str,
        sender_device: &str,
        event_type: &str,
        txn_id: &str,
        messages: Vec<NewToDevice>,
    ) -> Result<bool> {
        accounts::send_to_device(self, sender, sender_device, event_type, txn_id, messages).await
    }

    async fn to_device_messages(
        &self,
        user_id: &str,
        device_id: &str,
        after: i64,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<ToDeviceMessage>> {
        accounts::to_device_messages(self, user_id, device_id, after, upto, limit).await
    }

    async fn ack_to_device(&self, user_id: &str, device_id: &str, upto: i64) -> Result<()> {
        accounts::ack_to_device(self, user_id, device_id, upto).await
    }

    async fn put_cross_signing_keys(&self, user_id: &str, keys: Vec<(String, String)>) -> Result<()> {
        accounts::put_cross_signing_keys(self, user_id, keys).await
    }

    async fn get_cross_signing_keys(&self, user_id: &str) -> Result<Vec<(String, String)>> {
        accounts::get_cross_signing_keys(self, user_id).await
    }

    async fn add_key_signatures(&self, signatures: Vec<KeySignature>) -> Result<()> {
        accounts::add_key_signatures(self, signatures).await
    }

    async fn key_signatures(&self, user_id: &str) -> Result<Vec<KeySignature>> {
        accounts::key_signatures(self, user_id).await
    }

    async fn put_filter(&self, user_id: &str, filter_json: &str) -> Result<String> {
        accounts::put_filter(self, user_id, filter_json).await
    }

    async fn get_filter(&self, user_id: &str, filter_id: &str) -> Result<Option<String>> {
        accounts::get_filter(self, user_id, filter_id).await
    }

    fn put_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
        content_json: &str,
    ) -> Pending<i64> {
        ephemeral::put_account_data(self, user_id, room_id, data_type, content_json)
    }

    fn edit_account_data(
        &self,
        user_id: &str,
        room_id: Option<&str>,
        data_type: &str,
        edit: AccountDataEdit,
    ) -> Pending<i64> {
        ephemeral::edit_account_data(self, user_id, room_id, data_type, edit)
    }

    async fn get_account_data(&self, user_id: &str, room_id: Option<&str>, data_type: &str) -> Result<Option<String>> {
        ephemeral::get_account_data(self, user_id, room_id, data_type).await
    }

    async fn account_data_since(&self, user_id: &str, since: i64, upto: i64) -> Result<Vec<AccountDataRecord>> {
        ephemeral::account_data_since(self, user_id, since, upto).await
    }

    fn put_receipt(&self, receipt: ReceiptRecord) -> Pending<i64> {
        ephemeral::put_receipt(self, receipt)
    }

    async fn receipts_since(&self, room_id: &str, since: i64, upto: i64) -> Result<Vec<ReceiptRecord>> {
        ephemeral::receipts_since(self, room_id, since, upto).await
    }

    fn add_notifications(&self, rows: Vec<NewNotification>, evaluated: i64) -> Pending<()> {
        ephemeral::add_notifications(self, rows, evaluated)
    }

    async fn unread_counts(&self, user_id: &str, room_id: Option<&str>) -> Result<Vec<UnreadCount>> {
        ephemeral::unread_counts(self, user_id, room_id).await
    }

    async fn notifications(
        &self,
        user_id: &str,
        before: Option<i64>,
        limit: usize,
        only_highlight: bool,
    ) -> Result<Vec<NotificationRecord>> {
        ephemeral::notifications(self, user_id, before, limit, only_highlight).await
    }

    async fn notifications_after(&self, user_id: &str, after: i64, limit: usize) -> Result<Vec<NotificationRecord>> {
        ephemeral::notifications_after(self, user_id, after, limit).await
    }

    async fn set_pusher(&self, pusher: PusherRecord, append: bool) -> Result<()> {
        ephemeral::set_pusher(self, pusher, append).await
    }

    async fn delete_pusher(&self, user_id: &str, app_id: &str, pushkey: &str) -> Result<bool> {
        ephemeral::delete_pusher(self, user_id, app_id, pushkey).await
    }

    async fn pushers(&self, user_id: Option<&str>) -> Result<Vec<PusherRecord>> {
        ephemeral::pushers(self, user_id).await
    }

    async fn pusher_sent(&self, user_id: &str, app_id: &str, pushkey: &str, position: i64) -> Result<()> {
        ephemeral::pusher_sent(self, user_id, app_id, pushkey, position).await
    }

    async fn events_after(&self, after: i64, upto: i64, limit: usize) -> Result<Vec<StoredEvent>> {
        ephemeral::events_after(self, after, upto, limit).await
    }

    fn set_typing(&self, room_id: &str, user_id: &str, expires_ms: Option<u64>) -> Pending<Option<i64>> {
        ephemeral::set_typing(self, room_id, user_id, expires_ms)
    }

    async fn typing(&self, room_id: &str, now_ms: u64) -> Result<(Vec<String>, i64)> {
        ephemeral::typing(self, room_id, now_ms).await
    }

    fn expire_typing(&self, now_ms: u64) -> Pending<Vec<String>> {
        ephemeral::expire_typing(self, now_ms)
    }

    async fn presence(&self, user_id: &str) -> Result<Option<PresenceRecord>> {
        ephemeral::presence(self, user_id).await
    }

    fn edit_presence(&self, user_id: &str, edit: PresenceEdit) -> Pending<Option<i64>> {
        ephemeral::edit_presence(self, user_id, edit)
    }

    async fn presence_since(&self, viewer: &str, since: i64, upto: i64) -> Result<Vec<PresenceRecord>> {
        ephemeral::presence_since(self, viewer, since, upto).await
    }

    async fn share_room(&self, a: &str, b: &str) -> Result<bool> {
        ephemeral::share_room(self, a, b).await
    }

    fn expire_presence(&self, now_ms: u64, idle_ms: u64) -> Pending<Vec<String>> {
        ephemeral::expire_presence(self, now_ms, idle_ms)
    }

    async fn next_ephemeral_deadline(&self, idle_ms: Option<u64>) -> Result<Option<u64>> {
        ephemeral::next_ephemeral_deadline(self, idle_ms).await
    }

    fn persist_event(&self, event: NewEvent) -> Pending<i64> {
        rooms::persist_event(self, storable_event(event))
    }

    async fn room_info(&self, room_id: &str) -> Result<Option<RoomRecord>> {
        rooms::room_info(self, room_id).await
    }

    async fn get_event(&self, event_id: &str) -> Result<Option<StoredEvent>> {
        rooms::get_event(self, event_id).await
    }

    async fn current_state(&self, room_id: &str) -> Result<Vec<StoredEvent>> {
        rooms::current_state(self, room_id).await
    }

    async fn state_at(&self, room_id: &str, pos: i64) -> Result<Vec<StoredEvent>> {
        rooms::state_at(self, room_id, pos).await
    }

    async fn state_changes(&self, room_id: &str, after: i64, upto: i64) -> Result<Vec<StoredEvent>> {
        rooms::state_changes(self, room_id, after, upto).await
    }

    async fn room_events(
        &self,
        room_id: &str,
        from: i64,
        to: i64,
        dir: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        rooms::room_events(self, room_id, from, to, dir, limit).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn relations(
        &self,
        room_id: &str,
        parent: &str,
        rel_type: Option<&str>,
        event_type: Option<&str>,
        from: i64,
        to: i64,
        dir: Direction,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        rooms::relations(self, room_id, parent, rel_type, event_type, from, to, dir, limit).await
    }

    async fn threads(
        &self,
        room_id: &str,
        user: &str,
        only_participated: bool,
        before: i64,
        limit: usize,
    ) -> Result<Vec<ThreadRecord>> {
        rooms::threads(self, room_id, user, only_participated, before, limit).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn search_events(
        &self,
        rooms: &[String],
        query: &str,
        keys: &[SearchKey],
        by_rank: bool,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<(StoredEvent, f64)>, u64)> {
        rooms::search_events(self, rooms, query, keys, by_rank, offset, limit).await
    }

    async fn rooms_changed(&self, since: i64, upto: i64) -> Result<Vec<(String, i64)>> {
        rooms::rooms_changed(self, since, upto).await
    }

    async fn user_memberships(&self, user_id: &str) -> Result<Vec<MembershipRecord>> {
        rooms::user_memberships(self, user_id).await
    }

    async fn membership_history(&self, room_id: &str, user_id: &str) -> Result<Vec<(i64, String)>> {
        rooms::membership_history(self, room_id, user_id).await
    }

    async fn visibility_history(&self, room_id: &str) -> Result<Vec<(i64, String)>> {
        rooms::visibility_history(self, room_id).await
    }

    async fn txn_event(
        &self,
        user_id: &str,
        device_id: &str,
        room_id: &str,
        event_type: &str,
        txn_id: &str,
    ) -> Result<Option<String>> {
        rooms::txn_event(self, user_id, device_id, room_id, event_type, txn_id).await
    }

    async fn forget_room(&self, user_id: &str, room_id: &str) -> Result<()> {
        rooms::forget_room(self, user_id, room_id).await
    }

    async fn is_forgotten(&self, user_id: &str, room_id: &str) -> Result<bool> {
        rooms::is_forgotten(self, user_id, room_id).await
    }

    async fn public_rooms(&self) -> Result<Vec<String>> {
        misc::public_rooms(self).await
    }

    async fn set_room_public(&self, room_id: &str, public: bool) -> Result<()> {
        misc::set_room_public(self, room_id, public).await
    }

    async fn create_alias(&self, alias: &str, room_id: &str, creator: &str) -> Result<bool> {
        misc::create_alias(self, alias, room_id, creator).await
    }

    async fn resolve_alias(&self, alias: &str) -> Result<Option<AliasRecord>> {
        misc::resolve_alias(self, alias).await
    }

    async fn delete_alias(&self, alias: &str) -> Result<bool> {
        misc::delete_alias(self, alias).await
    }

    async fn room_aliases(&self, room_id: &str) -> Result<Vec<String>> {
        misc::room_aliases(self, room_id).await
    }

    async fn sliding_connection(&self, user_id: &str, device_id: &str, conn_id: &str) -> Result<Option<String>> {
        misc::sliding_connection(self, user_id, device_id, conn_id).await
    }

    async fn put_sliding_connection(
        &self,
        user_id: &str,
        device_id: &str,
        conn_id: &str,
        state_json: &str,
    ) -> Result<()> {
        misc::put_sliding_connection(self, user_id, device_id, conn_id, state_json).await
    }

    async fn create_uia_session(&self, session_id: &str, now_ms: u64, prune_before_ms: u64) -> Result<()> {
        misc::create_uia_session(self, session_id, now_ms, prune_before_ms).await
    }

    async fn uia_session(&self, session_id: &str, not_before_ms: u64) -> Result<Option<Vec<String>>> {
        misc::uia_session(self, session_id, not_before_ms).await
    }

    async fn uia_complete_stage(&self, session_id: &str, stage: &str) -> Result<Vec<String>> {
        misc::uia_complete_stage(self, session_id, stage).await
    }

    async fn delete_uia_session(&self, session_id: &str) -> Result<()> {
        misc::delete_uia_session(self, session_id).await
    }

    async fn room_turn(&self, room_id: &str) -> Result<Option<RoomTurn>> {
        Ok(Some(RoomTurn(Box::new(self.room_turn_lock(room_id).await?))))
    }

    async fn take_rate_token(&self, bucket: &str, interval_us: i64, tolerance_us: i64) -> Result<Option<u64>> {
        misc::take_rate_token(self, bucket, interval_us, tolerance_us).await
    }

    async fn refund_rate_token(&self, bucket: &str, interval_us: i64) -> Result<()> {
        misc::refund_rate_token(self, bucket, interval_us).await
    }

    async fn prune_rate_buckets(&self) -> Result<u64> {
        misc::prune_rate_buckets(self).await
    }

    fn claim_mqtt_client(&self, key: &str, owner: &str) -> Pending<Option<String>> {
        misc::claim_mqtt_client(self, key, owner)
    }

    fn release_mqtt_client(&self, key: &str, owner: &str) -> Pending<()> {
        misc::release_mqtt_client(self, key, owner)
    }

    async fn get_meta(&self, key: &str) -> Result<Option<String>> {
        misc::get_meta(self, key).await
    }

    async fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        misc::set_meta(self, key, value).await
    }

    async fn init_meta(&self, key: &str, value: &str) -> Result<bool> {
        misc::init_meta(self, key, value).await
    }
}
