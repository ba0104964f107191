//! The stream as every backend keeps it in memory: the writer's running
//! state for a batch ([`WriterCtx`]) and the newest part of the stream
//! ([`RecentChanges`]) that stream readers are served from.

use std::sync::Arc;

use crate::*;

/// The writer's running state handed to each job.
pub(crate) struct WriterCtx {
    /// Last stream position assigned.
    pub(crate) pos: i64,
    /// Lowest position assigned (to events off the stream; 0 or below).
    pub(crate) low: i64,
    /// Stream entries this batch adds, published after the commit.
    pub(crate) changes: Vec<(i64, StreamKey)>,
    /// Events this batch adds, for the in-memory tail after the commit.
    pub(crate) events: Vec<StoredEvent>,
    /// Redactions this batch applies: (target event ID, its redacted PDU
    /// JSON, the redaction's event ID).
    pub(crate) redactions: Vec<(String, String, String)>,
}

impl WriterCtx {
    /// Takes the next stream position for `key` alone (no event): a
    /// revocation, an MQTT client's claim or release, a destination's
    /// wake-up. Answers the position.
    pub(crate) fn announce(&mut self, key: StreamKey) -> i64 {
        self.pos += 1;
        self.changes.push((self.pos, key));
        self.pos
    }

    /// [`WriterCtx::announce`] of a wake-up for each destination, once
    /// each ([`StreamKey::Outbox`]).
    pub(crate) fn announce_destinations<'a>(&mut self, destinations: impl IntoIterator<Item = &'a str>) {
        let mut seen = std::collections::BTreeSet::new();
        for d in destinations {
            if seen.insert(d) {
                self.announce(StreamKey::Outbox(d.to_owned()));
            }
        }
    }

    /// Records a stored event for after the commit, the same on every
    /// backend: its redaction (for the tail), and either its place below
    /// the stream (off-stream events count down) or its stream position
    /// with the room's change and the event for the tail.
    pub(crate) fn record_event(&mut self, ev: &NewEvent, p: i64) {
        if let Some((target, redacted_json)) = &ev.redaction {
            self.redactions
                .push((target.clone(), redacted_json.clone(), ev.event_id.clone()));
        }
        if !ev.kind.on_stream() {
            self.low = p;
            return;
        }
        self.pos = p;
        self.changes.push((p, StreamKey::Room(ev.room_id.clone())));
        if ev.current_state.as_ref().is_some_and(|cs| !cs.changes.is_empty()) {
            self.changes.push((p, StreamKey::State(ev.room_id.clone())));
        }
        self.events.push(StoredEvent {
            position: p,
            event_id: ev.event_id.clone(),
            room_id: ev.room_id.clone(),
            event_type: ev.event_type.clone(),
            state_key: ev.state_key.clone(),
            sender: ev.sender.clone(),
            origin_server_ts: ev.origin_server_ts,
            pdu_json: ev.pdu_json.clone(),
            redacted_by: None,
            txn: ev.txn.clone(),
        });
    }
}

/// The newest part of the stream, kept in memory: every entry after
/// `floor` is in `entries`, and every event after `event_floor` is in
/// `events`. Readers that follow the stream (subscriptions, observers,
/// sync) mostly ask for just these, and get them without a query.
pub(crate) struct RecentChanges {
    pub(crate) floor: i64,
    pub(crate) entries: std::collections::VecDeque<(i64, StreamKey)>,
    pub(crate) event_floor: i64,
    /// Oldest first, as committed (redactions applied).
    pub(crate) events: std::collections::VecDeque<Arc<StoredEvent>>,
    /// Rough memory held by `events`.
    pub(crate) event_bytes: usize,
}

impl RecentChanges {
    pub(crate) fn new(position: i64) -> Self {
        Self {
            floor: position,
            entries: Default::default(),
            event_floor: position,
            events: Default::default(),
            event_bytes: 0,
        }
    }

    /// Takes in a committed batch, then forgets what exceeds the bounds.
    pub(crate) fn add(&mut self, ctx: &mut WriterCtx) {
        self.entries.extend(ctx.changes.drain(..));
        while self.entries.len() > RECENT_CHANGES {
            if let Some((p, _)) = self.entries.pop_front() {
                self.floor = p;
            }
        }
        for ev in ctx.events.drain(..) {
            self.event_bytes += event_size(&ev);
            self.events.push_back(Arc::new(ev));
        }
        for (target, json, by) in ctx.redactions.drain(..) {
            if let Some(slot) = self.events.iter_mut().rev().find(|e| e.event_id == target) {
                let mut redacted = StoredEvent::clone(slot);
                self.event_bytes = self.event_bytes + json.len() - redacted.pdu_json.len();
                redacted.pdu_json = json;
                redacted.redacted_by = Some(by);
                *slot = Arc::new(redacted);
            }
        }
        while self.events.len() > TAIL_EVENTS || self.event_bytes > TAIL_BYTES {
            let Some(ev) = self.events.pop_front() else { break };
            self.event_bytes -= event_size(&ev);
            self.event_floor = ev.position;
        }
    }

    /// The room's events strictly between positions `lo` and `hi`, in
    /// `dir` order, at most `limit`; `None` if the tail does not hold all
    /// of them (`lo` is below its floor).
    pub(crate) fn room_events(
        &self,
        room: &str,
        lo: i64,
        hi: i64,
        dir: Direction,
        limit: usize,
    ) -> Option<Vec<StoredEvent>> {
        if lo < self.event_floor {
            return None;
        }
        let start = self.events.partition_point(|e| e.position <= lo);
        let end = self.events.partition_point(|e| e.position < hi);
        let range = self.events.range(start..end.max(start));
        let pick = |e: &&Arc<StoredEvent>| e.room_id == room;
        Some(match dir {
            Direction::Forward => range.filter(pick).take(limit).map(|e| StoredEvent::clone(e)).collect(),
            Direction::Backward => range
                .rev()
                .filter(pick)
                .take(limit)
                .map(|e| StoredEvent::clone(e))
                .collect(),
        })
    }
}

impl RecentChanges {
    /// What the stream carried after `since`: which rooms and users each
    /// position touched. `None` when `since` is below what is kept.
    pub(crate) fn changes_since(&self, since: i64) -> Option<Vec<(i64, StreamKey)>> {
        if since < self.floor {
            return None;
        }
        let start = self.entries.partition_point(|(p, _)| *p <= since);
        Some(self.entries.range(start..).cloned().collect())
    }

    /// See [`crate::Store::any_change`].
    pub(crate) fn any_change(&self, since: i64, upto: i64, pred: &mut dyn FnMut(&StreamKey) -> bool) -> Option<bool> {
        if since < self.floor {
            return None;
        }
        let start = self.entries.partition_point(|(p, _)| *p <= since);
        Some(
            self.entries
                .range(start..)
                .take_while(|(p, _)| *p <= upto)
                .any(|(_, k)| pred(k)),
        )
    }

    /// Every event with a position after `lo` and up to `hi`, oldest
    /// first, at most `limit`; `None` if the tail does not hold all of
    /// them (`lo` is below its floor).
    pub(crate) fn events_after(&self, lo: i64, hi: i64, limit: usize) -> Option<Vec<StoredEvent>> {
        if lo < self.event_floor {
            return None;
        }
        let start = self.events.partition_point(|e| e.position <= lo);
        let end = self.events.partition_point(|e| e.position <= hi);
        Some(
            self.events
                .range(start..end.max(start))
                .take(limit)
                .map(|e| StoredEvent::clone(e))
                .collect(),
        )
    }
}

fn event_size(ev: &StoredEvent) -> usize {
    std::mem::size_of::<StoredEvent>() + ev.pdu_json.len() + ev.event_id.len() + ev.room_id.len() + 64
}

/// How many recent stream entries are kept in memory for waiters.
const RECENT_CHANGES: usize = 65_536;
/// How many recent events are kept in memory for stream readers, and in
/// how many bytes at most.
const TAIL_EVENTS: usize = 4_096;
const TAIL_BYTES: usize = 4 << 20;

/// When a stream reader's position (`meta` `push_evaluated`,
/// `federation_queued`) was last written. A batch of the reader that
/// produced no rows need not write it more than once a second: after a
/// crash the reader reads those events again and, as before, makes no row
/// of them; a batch with rows always writes it (with them, so they are
/// never made twice). Without this each batch of events cost the reader's
/// own transaction, and its commit, on top of the events' (on PostgreSQL
/// a round trip and an fsync each).
#[derive(Default)]
pub(crate) struct ReaderMark(std::sync::atomic::AtomicU64);

impl ReaderMark {
    /// Whether the position must be written now (`rows`: the batch made
    /// some); records the write when it must.
    pub(crate) fn must_write(&self, rows: bool) -> bool {
        let now = weft_core::now_ms();
        let last = self.0.load(std::sync::atomic::Ordering::Relaxed);
        if rows || now.saturating_sub(last) >= 1000 {
            self.0.store(now, std::sync::atomic::Ordering::Relaxed);
            return true;
        }
        false
    }
}

/// An answer already given (a write that was not needed).
pub(crate) fn done<T: Send + 'static>(value: T) -> crate::Pending<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _ = tx.send(Ok(value));
    rx
}
