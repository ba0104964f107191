//! History visibility: which events of a room a user may see, per the
//! spec's algorithm (world_readable, membership at the event, shared,
//! invited).

use weft_core::Result;
use weft_store::{Store, StoredEvent};

/// A user's view of one room's history, loaded once and applied to many events.
pub struct Visibility {
    memberships: Vec<(i64, String)>,
    visibilities: Vec<(i64, String)>,
}

fn at(hist: &[(i64, String)], pos: i64, inclusive: bool) -> Option<&str> {
    let idx = hist.partition_point(|(p, _)| if inclusive { *p <= pos } else { *p < pos });
    idx.checked_sub(1).map(|i| hist[i].1.as_str())
}

impl Visibility {
    pub async fn load(store: &dyn Store, room_id: &str, user_id: &str) -> Result<Self> {
        Ok(Self {
            memberships: store.membership_history(room_id, user_id).await?,
            visibilities: store.visibility_history(room_id).await?,
        })
    }

    /// The user's membership just after the event at `pos`.
    pub fn membership_at(&self, pos: i64) -> Option<&str> {
        at(&self.memberships, pos, true)
    }

    /// May the user see the event at `pos`?
    pub fn can_see(&self, pos: i64) -> bool {
        let visibility = at(&self.visibilities, pos, false).unwrap_or("shared");
        if visibility == "world_readable" {
            return true;
        }
        let membership = self.membership_at(pos);
        if membership == Some("join") {
            return true;
        }
        if visibility == "shared" && self.memberships.iter().any(|(p, m)| *p > pos && m == "join") {
            return true;
        }
        visibility == "invited" && membership == Some("invite")
    }

    pub fn filter(&self, events: Vec<StoredEvent>) -> Vec<StoredEvent> {
        events.into_iter().filter(|e| self.can_see(e.position)).collect()
    }

    /// Whether the room is world-readable now.
    pub fn world_readable_now(&self) -> bool {
        self.visibilities
            .last()
            .map(|(_, v)| v == "world_readable")
            .unwrap_or(false)
    }
}
