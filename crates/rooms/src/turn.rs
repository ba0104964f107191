//! Rooms' state turns ([`Store::room_turn`]): with several processes on
//! one database, their local state events for one room are built one
//! process at a time. Without turns, devices setting state in one room
//! through several processes at full speed keep refusing each other's
//! events ([`weft_core::ErrorKind::RoomMoved`]: each was built on a state
//! another changed meanwhile), and a send could give up after its
//! rebuilds. Any event refused because another process changed the
//! room's state is built again in a turn too (a message as well), so
//! that no other process's state change comes between again.
//!
//! One process's state events for a room share its turn: the first takes
//! it from the store (PostgreSQL: an advisory lock), later ones join it
//! for [`JOIN_WITHIN`], then wait until it is given back, so the other
//! processes, queued at the lock, get theirs. Each event's share is given
//! back as soon as the store answered for it (committed or refused), not
//! when its sender reads the answer: a door that queues several events
//! before reading their answers never waits on a turn it holds itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ruma::{OwnedRoomId, RoomId};
use weft_core::Result;
use weft_store::{RoomTurn, Store};

/// How long after a process took a room's turn its later state events
/// may still join it.
const JOIN_WITHIN: Duration = Duration::from_millis(10);

#[derive(Default)]
pub(crate) struct Turns {
    rooms: parking_lot::Mutex<HashMap<OwnedRoomId, Arc<Turn>>>,
    /// The store has no turns (one process writes it): none is taken.
    unneeded: AtomicBool,
}

#[derive(Default)]
struct Turn {
    state: parking_lot::Mutex<TurnState>,
    /// Woken when the turn is given back (or a take of it failed).
    freed: tokio::sync::Notify,
}

#[derive(Default)]
enum TurnState {
    #[default]
    Free,
    /// Being taken from the store.
    Taking,
    Held {
        hold: Option<RoomTurn>,
        since: Instant,
        shares: usize,
        /// Past [`JOIN_WITHIN`]: no new share until it is given back.
        closed: bool,
    },
}

/// One state event's share of its room's turn: given back when dropped.
pub(crate) struct TurnShare {
    turn: Arc<Turn>,
    room: OwnedRoomId,
    turns: Arc<Turns>,
}

impl Turns {
    /// A share of this process's turn at `room`'s state, waiting for it
    /// if need be, and whether the turn was taken from the store just now
    /// (another process may have had it: what this one knows of the room
    /// is stale). `None` if the store has no turns.
    pub(crate) async fn share(
        self: &Arc<Self>,
        store: &dyn Store,
        room: &RoomId,
    ) -> Result<Option<(Arc<TurnShare>, bool)>> {
        if self.unneeded.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let turn = self.rooms.lock().entry(room.to_owned()).or_default().clone();
        let share = |taken: bool| {
            Some((
                Arc::new(TurnShare {
                    turn: turn.clone(),
                    room: room.to_owned(),
                    turns: self.clone(),
                }),
                taken,
            ))
        };
        loop {
            let freed = turn.freed.notified();
            tokio::pin!(freed);
            let taker = {
                let mut state = turn.state.lock();
                match &mut *state {
                    TurnState::Free => {
                        *state = TurnState::Taking;
                        true
                    }
                    TurnState::Held {
                        since, shares, closed, ..
                    } if !*closed && since.elapsed() < JOIN_WITHIN => {
                        *shares += 1;
                        return Ok(share(false));
                    }
                    TurnState::Held { closed, .. } => {
                        *closed = true;
                        freed.as_mut().enable();
                        false
                    }
                    TurnState::Taking => {
                        freed.as_mut().enable();
                        false
                    }
                }
            };
            if !taker {
                freed.await;
                continue;
            }
            // Take it from the store. Should this future be dropped
            // meanwhile, `Untake` frees the turn again.
            let untake = Untake(&turn);
            let taken = store.room_turn(room.as_str()).await;
            std::mem::forget(untake);
            let mut state = turn.state.lock();
            return match taken {
                Ok(Some(hold)) => {
                    *state = TurnState::Held {
                        hold: Some(hold),
                        since: Instant::now(),
                        shares: 1,
                        closed: false,
                    };
                    // Those waiting while it was taken may join it.
                    turn.freed.notify_waiters();
                    Ok(share(true))
                }
                Ok(None) => {
                    self.unneeded.store(true, Ordering::Relaxed);
                    *state = TurnState::Free;
                    turn.freed.notify_waiters();
                    Ok(None)
                }
                Err(e) => {
                    *state = TurnState::Free;
                    turn.freed.notify_waiters();
                    Err(e)
                }
            };
        }
    }
}

/// Frees a turn whose taking was abandoned.
struct Untake<'a>(&'a Turn);

impl Drop for Untake<'_> {
    fn drop(&mut self) {
        *self.0.state.lock() = TurnState::Free;
        self.0.freed.notify_waiters();
    }
}

impl Drop for TurnShare {
    fn drop(&mut self) {
        let hold = {
            let mut state = self.turn.state.lock();
            let TurnState::Held { hold, shares, .. } = &mut *state else {
                return;
            };
            *shares -= 1;
            if *shares > 0 {
                return;
            }
            let hold = hold.take();
            *state = TurnState::Free;
            hold
        };
        // Given back to the store (PostgreSQL: unlocked on a thread of its own).
        drop(hold);
        self.turn.freed.notify_waiters();
        // Forget the room unless someone waits for its turn (each waiter
        // holds the `Turn`, as does the map): memory stays bounded.
        let mut rooms = self.turns.rooms.lock();
        if let Some(t) = rooms.get(&self.room)
            && Arc::ptr_eq(t, &self.turn)
            && Arc::strong_count(&self.turn) == 2
            && matches!(*self.turn.state.lock(), TurnState::Free)
        {
            rooms.remove(&self.room);
        }
    }
}

/// `pending`, with `share` given back as soon as the store answers it.
pub(crate) fn give_back_on_answer(
    pending: weft_store::Pending<i64>,
    share: Option<Arc<TurnShare>>,
) -> weft_store::Pending<i64> {
    let Some(share) = share else { return pending };
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let answer = pending.await;
        drop(share);
        // A writer that stopped without answering drops `tx` unanswered.
        if let Ok(answer) = answer {
            let _ = tx.send(answer);
        }
    });
    rx
}
