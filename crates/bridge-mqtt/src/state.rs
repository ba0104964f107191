//! What the bridge keeps on disk: its rooms (device → room), the topics it
//! learnt from Home Assistant discovery, and a delivery log giving every
//! MQTT message a transaction ID that survives a restart.
//!
//! - `<state_file>` (JSON, rewritten whole through a temporary file and a
//!   rename when a room is made or a topic learnt);
//! - `<state_file>.log`: one line per message taken from the broker,
//!   `counter pkid hash`, appended and synced before the event is sent.
//!   A message the broker sends again (DUP flag set, same packet ID, same
//!   topic and payload) gets the transaction ID it had the first time, so
//!   the homeserver stores it once.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::mapping::{Device, Route};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Saved {
    /// Random, made when the file is first written: part of every
    /// transaction ID, so a lost state file never reuses an old ID.
    pub epoch: String,
    /// Device key → its room.
    pub rooms: BTreeMap<String, DeviceRoom>,
    /// Topics learnt from Home Assistant discovery.
    pub learnt: BTreeMap<String, Route>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRoom {
    pub room_id: String,
    pub device: Device,
}

/// How many recent log entries are kept in memory (far above any broker's
/// in-flight window).
const RECENT: usize = 4096;
/// Past this many lines the log is cut down to the recent ones.
const COMPACT_AT: usize = 100_000;

pub struct State {
    path: PathBuf,
    pub saved: Saved,
    log: Arc<File>,
    log_lines: usize,
    counter: u64,
    /// pkid → (counter, hash) of its latest message.
    recent: HashMap<u16, (u64, String)>,
    order: std::collections::VecDeque<(u16, u64, String)>,
}

fn log_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".log");
    PathBuf::from(p)
}

impl State {
    pub fn open(path: &Path) -> Result<State> {
        let saved = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("reading {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved {
                epoch: format!("{:016x}", rand::random::<u64>()),
                ..Saved::default()
            },
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let lp = log_path(path);
        let mut order = std::collections::VecDeque::new();
        let mut counter = 0;
        let mut lines = 0;
        if let Ok(f) = File::open(&lp) {
            for line in BufReader::new(f).lines() {
                let line = line?;
                let mut it = line.split(' ');
                let (Some(c), Some(p), Some(h)) = (it.next(), it.next(), it.next()) else {
                    continue; // a line cut short by a crash
                };
                let (Ok(c), Ok(p)) = (c.parse::<u64>(), p.parse::<u16>()) else {
                    continue;
                };
                lines += 1;
                counter = counter.max(c + 1);
                order.push_back((p, c, h.to_string()));
                if order.len() > RECENT {
                    order.pop_front();
                }
            }
        }
        let recent = order.iter().map(|(p, c, h)| (*p, (*c, h.clone()))).collect();
        let log = Arc::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&lp)
                .with_context(|| format!("opening {}", lp.display()))?,
        );
        let s = State {
            path: path.to_path_buf(),
            saved,
            log,
            log_lines: lines,
            counter,
            recent,
            order,
        };
        s.save()?;
        Ok(s)
    }

    pub fn save(&self) -> Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(&self.saved)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path).with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }

    /// The transaction ID for a message from the broker: the one it had
    /// before when the broker sends it again (`dup`), else a new one,
    /// written to the log before it is returned, with the log file to
    /// sync (`sync_data`) before the ID is used: syncs are left to the
    /// caller so that several devices' share one flush instead of queuing
    /// behind this lock.
    pub fn txn_id(&mut self, pkid: u16, dup: bool, topic: &str, payload: &[u8]) -> Result<(String, Option<Arc<File>>)> {
        let mut h = Sha256::new();
        h.update(topic.as_bytes());
        h.update([0]);
        h.update(payload);
        let hash: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
        if dup
            && pkid != 0
            && let Some((c, old)) = self.recent.get(&pkid)
            && *old == hash
        {
            return Ok((format!("{}.{c}", self.saved.epoch), None));
        }
        let c = self.counter;
        self.counter += 1;
        writeln!(&*self.log, "{c} {pkid} {hash}")?;
        self.log_lines += 1;
        self.recent.insert(pkid, (c, hash.clone()));
        self.order.push_back((pkid, c, hash));
        if self.order.len() > RECENT {
            self.order.pop_front();
        }
        if self.log_lines > COMPACT_AT {
            self.compact()?;
        }
        Ok((format!("{}.{c}", self.saved.epoch), Some(self.log.clone())))
    }

    fn compact(&mut self) -> Result<()> {
        let lp = log_path(&self.path);
        let tmp = lp.with_extension("log.tmp");
        let mut f = File::create(&tmp)?;
        for (p, c, h) in &self.order {
            writeln!(f, "{c} {p} {h}")?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &lp)?;
        self.log = Arc::new(OpenOptions::new().append(true).open(&lp)?);
        self.log_lines = self.order.len();
        Ok(())
    }

    /// The device whose room this is.
    pub fn device_of_room(&self, room_id: &str) -> Option<&DeviceRoom> {
        self.saved.rooms.values().find(|r| r.room_id == room_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_keep_their_transaction_id_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let (a, b) = {
            let mut s = State::open(&p).unwrap();
            (
                s.txn_id(1, false, "t", b"x").unwrap().0,
                s.txn_id(2, false, "t", b"y").unwrap().0,
            )
        };
        assert_ne!(a, b);
        let mut s = State::open(&p).unwrap();
        // Sent again by the broker: same ID.
        assert_eq!(s.txn_id(1, true, "t", b"x").unwrap().0, a);
        // A new message reusing packet ID 1: a new ID.
        let c = s.txn_id(1, false, "t", b"x").unwrap().0;
        assert!(c != a && c != b);
        // A DUP with another payload is not the same message.
        assert_ne!(s.txn_id(2, true, "t", b"z").unwrap().0, b);
    }
}
