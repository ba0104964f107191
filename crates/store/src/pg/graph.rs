//! PostgreSQL: the `RoomGraphStore` area.

use super::*;

#[async_trait::async_trait]
impl RoomGraphStore for PgStore {
    async fn max_state_group(&self) -> Result<i64> {
        Err(not_yet("max_state_group"))
    }

    async fn extremities(&self, room_id: &str) -> Result<Vec<(String, i64)>> {
        let _ = (room_id,);
        Err(not_yet("extremities"))
    }

    async fn room_state_group(&self, room_id: &str) -> Result<Option<(i64, i64)>> {
        let _ = (room_id,);
        Err(not_yet("room_state_group"))
    }

    async fn state_group(&self, group: i64) -> Result<StateMap> {
        let _ = (group,);
        Err(not_yet("state_group"))
    }

    async fn event_place(&self, event_id: &str) -> Result<Option<EventPlace>> {
        let _ = (event_id,);
        Err(not_yet("event_place"))
    }

    async fn state_group_chain(&self, group: i64) -> Result<Option<i64>> {
        let _ = (group,);
        Err(not_yet("state_group_chain"))
    }

    async fn auth_chain(&self, event_ids: Vec<String>) -> Result<Vec<String>> {
        let _ = (event_ids,);
        Err(not_yet("auth_chain"))
    }

    async fn events_by_id(&self, event_ids: Vec<String>) -> Result<Vec<crate::StoredEvent>> {
        let _ = (event_ids,);
        Err(not_yet("events_by_id"))
    }

    async fn prev_events(&self, event_id: &str) -> Result<Vec<String>> {
        let _ = (event_id,);
        Err(not_yet("prev_events"))
    }

    fn remote_membership(
        &self,
        event: crate::NewEvent,
        user_id: String,
        membership: String,
        stripped_state: Option<String>,
    ) -> crate::Pending<i64> {
        let _ = (event, user_id, membership, stripped_state);
        self.write(|_, _| Err(not_yet("remote_membership")))
    }

    async fn remote_invite_state(&self, room_id: &str, user_id: &str) -> Result<Option<String>> {
        let _ = (room_id, user_id);
        Err(not_yet("remote_invite_state"))
    }
}
