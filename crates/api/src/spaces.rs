//! `GET /rooms/{roomId}/hierarchy`: the rooms below a space.

use ruma::api::client::space::get_hierarchy;
use weft_core::Error;

use crate::AppState;
use crate::endpoint::{Ruma, convert};

fn usize_of(n: ruma::UInt) -> usize {
    usize::try_from(u64::from(n)).unwrap_or(usize::MAX)
}

pub async fn hierarchy(
    s: AppState,
    req: Ruma<get_hierarchy::v1::Request>,
) -> Result<get_hierarchy::v1::Response, Error> {
    let b = &req.body;
    let page = s
        .hierarchy(
            &req.caller,
            b.room_id.as_str(),
            b.from.as_deref(),
            b.limit.map(usize_of),
            b.max_depth.map(usize_of),
            b.suggested_only,
        )
        .await?;
    let mut r = get_hierarchy::v1::Response::new();
    r.rooms = convert(&page.rooms)?;
    r.next_batch = page.next_batch;
    Ok(r)
}
