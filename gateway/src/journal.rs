//! The usage journal: every usage row is appended to a file of this process's own as the request
//! records it, before it joins the writer's queue, and the file is deleted once the writer has
//! put every row in it into PostgreSQL (or the spool). A process killed with rows in its queue
//! (SIGKILL, the OOM killer) leaves them in its journal, and whoever starts next on the spool
//! directory replays them with the spool's segments (the insert skips rows already there).
//!
//! Files are `journal-<instance>-<seq>.jsonl` in the spool directory, in the spool's line format,
//! each held under an exclusive lock while this process lives, so neither a peer on a shared
//! volume nor this process's own spool replays a journal still in use. The rows reach the
//! kernel with one `write` each and are not synced to disk: the journal covers a process dying,
//! not the machine; the spool (synced) covers PostgreSQL being away.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use tollgate_core::sync::lock;

use crate::usage::UsageRow;

/// A journal file is closed and another begun past this size, even while rows in it still wait
/// for the writer (closed files are deleted once they are all written).
const FILE_BYTES: u64 = 4 * 1024 * 1024;

pub struct Journal {
    dir: PathBuf,
    instance: String,
    state: Mutex<State>,
}

struct Open {
    path: PathBuf,
    file: File,
    bytes: u64,
    /// The last row written to it.
    last: u64,
}

#[derive(Default)]
struct State {
    /// Rows numbered from 1 in the order they were written (and queued).
    written: u64,
    /// Every row up to this one is in PostgreSQL or the spool.
    done: u64,
    seq: u64,
    current: Option<Open>,
    /// Files closed with rows still waiting for the writer, oldest first.
    closed: VecDeque<Open>,
}

impl Journal {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), instance: uuid::Uuid::new_v4().simple().to_string(), state: Mutex::default() }
    }

    /// A row as the journal (and the spool) writes it: one JSON line.
    pub fn encode(row: &UsageRow) -> Option<Vec<u8>> {
        let mut line = Vec::with_capacity(384);
        serde_json::to_writer(&mut line, row).ok()?;
        line.push(b'\n');
        Some(line)
    }

    /// Writes a row's `line` ([`Journal::encode`]) to the journal and hands the row's number to
    /// `queue` while the journal is held, so that rows reach the writer's queue in the order of
    /// their numbers. A row the journal cannot take (a full disk) is queued all the same, with
    /// number 0; the second value says whether it was journaled.
    pub fn record<T>(&self, line: Option<&[u8]>, queue: impl FnOnce(u64) -> T) -> (T, bool) {
        let mut state = lock(&self.state);
        let written = line.is_some_and(|line| self.write(&mut state, line).is_ok());
        let n = if written { state.written } else { 0 };
        (queue(n), written)
    }

    fn write(&self, state: &mut State, line: &[u8]) -> std::io::Result<()> {
        if state.current.as_ref().is_some_and(|c| c.bytes >= FILE_BYTES) {
            if let Some(full) = state.current.take() {
                state.closed.push_back(full);
            }
        }
        if state.current.is_none() {
            state.seq += 1;
            let path = self.dir.join(format!("journal-{}-{:010}.jsonl", self.instance, state.seq));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            file.try_lock().map_err(|e| std::io::Error::other(format!("locking {}: {e}", path.display())))?;
            state.current = Some(Open { path, file, bytes: 0, last: 0 });
        }
        let n = state.written + 1;
        let Some(current) = state.current.as_mut() else { return Ok(()) };
        if let Err(e) = current.file.write_all(line) {
            // A torn line is quarantined when the file is replayed; start a fresh file.
            if let Some(broken) = state.current.take() {
                state.closed.push_back(broken);
            }
            return Err(e);
        }
        current.bytes += line.len() as u64;
        current.last = n;
        state.written = n;
        Ok(())
    }

    /// Every row numbered up to `n` is in PostgreSQL or the spool: the files holding only such
    /// rows are deleted.
    pub fn done_through(&self, n: u64) {
        let mut state = lock(&self.state);
        if n <= state.done {
            return;
        }
        state.done = n;
        while state.closed.front().is_some_and(|f| f.last <= n) {
            if let Some(file) = state.closed.pop_front() {
                remove(&file.path);
            }
        }
        if state.current.as_ref().is_some_and(|c| c.last <= n) {
            if let Some(file) = state.current.take() {
                remove(&file.path);
            }
        }
    }
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(file = %path.display(), error = %e, "could not remove a usage journal file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<std::path::PathBuf> {
        crate::spool::files(dir, &["journal-"])
    }

    #[test]
    fn rows_stay_until_the_writer_is_done_with_them() {
        let dir = std::env::temp_dir().join(format!("tollgate-journal-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let journal = Journal::new(&dir);
        let row = UsageRow {
            request_id: "r-1".into(),
            created_at: chrono::Utc::now(),
            key_id: uuid::Uuid::new_v4(),
            user_id: uuid::Uuid::new_v4(),
            team_id: uuid::Uuid::new_v4(),
            model_id: "m".into(),
            subscription_id: None,
            endpoint: "/v1/chat/completions".into(),
            status: 200,
            prompt_tokens: 3,
            completion_tokens: 4,
            cost: rust_decimal::Decimal::new(11, 6),
            latency_ms: 12,
            ttfb_ms: Some(5),
            stream: false,
            error_kind: None,
        };
        let line = Journal::encode(&row).unwrap();
        let numbers: Vec<u64> = (0..3).map(|_| journal.record(Some(&line), |n| n).0).collect();
        assert_eq!(numbers, [1, 2, 3]);
        let on_disk = std::fs::read_to_string(&files(&dir)[0]).unwrap();
        assert_eq!(on_disk.lines().count(), 3);
        assert_eq!(serde_json::from_str::<UsageRow>(on_disk.lines().next().unwrap()).unwrap(), row);
        // The file is locked while this process holds it: nobody else replays it.
        let other = File::open(&files(&dir)[0]).unwrap();
        assert!(other.try_lock().is_err());
        journal.done_through(2);
        assert_eq!(files(&dir).len(), 1, "row 3 still waits");
        journal.done_through(3);
        assert!(files(&dir).is_empty());
        // The next row starts a new file.
        assert_eq!(journal.record(Some(&line), |n| n).0, 4);
        assert_eq!(files(&dir).len(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
