//! The usage spool: where usage rows wait while PostgreSQL is away (or the queue to the writer is
//! full), so that no row is ever lost. Rows are appended to segment files
//! (`usage-<instance>-<seq>.jsonl`, one instance id per process, so replicas can share a volume)
//! on a thread of the spool's own, never on a request's or the support runtime's. A segment is
//! replayed whole and deleted only once its rows are committed (a crash at any point leaves it to
//! replay again; the insert skips rows already there). The segment being written is held under
//! an exclusive file lock: another process on the same directory replays only segments nobody
//! writes, such as those a stopped replica left. Unreadable lines go to `quarantine-usage.jsonl`,
//! counted; rows that cannot be written (a full disk, or the spool at `spool_max_bytes`) wait in
//! memory, bounded, counted, and are written when they can be.

use std::{
    collections::{HashSet, VecDeque},
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc as std_mpsc, Arc,
    },
    time::SystemTime,
};

use tokio::sync::oneshot;

use crate::{metrics::Metrics, usage::UsageRow};

/// A segment is closed and a new one begun past this size.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// Rows kept in memory while they cannot be written; beyond it the oldest are dropped, counted.
const MEMORY_ROWS: usize = 100_000;
const QUARANTINE: &str = "quarantine-usage.jsonl";

/// The rows of one segment, handed to the writer to insert.
pub struct Segment {
    pub path: PathBuf,
    pub rows: Vec<UsageRow>,
}

enum Command {
    Append(Vec<UsageRow>),
    /// The oldest segment nobody writes or replays, with its rows (closing the one being
    /// written first, so that its rows can be replayed too).
    Next(oneshot::Sender<Option<Segment>>),
    /// The segment's rows are in PostgreSQL: delete it.
    Committed(PathBuf),
    /// They are not: leave it for a later try.
    Failed(PathBuf),
    /// Answers once everything sent before is written (or kept in memory).
    Sync(oneshot::Sender<()>),
}

/// The requests' and the writer's side of the spool: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Spool {
    tx: std_mpsc::Sender<Command>,
    /// Whether any segment may be waiting (checked before asking for one).
    waiting: Arc<AtomicBool>,
}

impl Spool {
    /// Opens the spool in `dir` (created if missing) and starts its thread.
    pub fn start(dir: &str, max_bytes: u64, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let dir = PathBuf::from(dir);
        let waiting = Arc::new(AtomicBool::new(!replayable(&dir).is_empty()));
        let (tx, rx) = std_mpsc::channel();
        let mut thread = SpoolThread {
            instance: uuid::Uuid::new_v4().simple().to_string(),
            dir,
            max_bytes,
            current: None,
            seq: 0,
            claimed: Vec::new(),
            memory: VecDeque::new(),
            waiting: waiting.clone(),
            metrics,
        };
        thread.measure();
        std::thread::Builder::new().name("tollgate-spool".into()).spawn(move || thread.run(rx))?;
        Ok(Self { tx, waiting })
    }

    pub fn append(&self, rows: Vec<UsageRow>) {
        if !rows.is_empty() {
            self.waiting.store(true, Ordering::Release);
            // The thread lives as long as the process: a send cannot fail while it runs.
            let _ = self.tx.send(Command::Append(rows));
        }
    }

    /// The next segment to replay, if any.
    pub async fn next(&self) -> Option<Segment> {
        if !self.waiting.load(Ordering::Acquire) {
            return None;
        }
        let (done, answer) = oneshot::channel();
        self.tx.send(Command::Next(done)).ok()?;
        answer.await.ok().flatten()
    }

    pub fn committed(&self, path: PathBuf) {
        let _ = self.tx.send(Command::Committed(path));
    }

    pub fn failed(&self, path: PathBuf) {
        let _ = self.tx.send(Command::Failed(path));
    }

    /// Waits until every row appended before this call is on disk (or, if it cannot be, held).
    pub async fn sync(&self) {
        let (done, answer) = oneshot::channel();
        if self.tx.send(Command::Sync(done)).is_ok() {
            let _ = answer.await;
        }
    }
}

/// Usage segment files in `dir`, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    files(dir, &["usage-"])
}

/// Files to replay: segments, and the usage journals processes left (see journal.rs; a live
/// process holds its own locked).
fn replayable(dir: &Path) -> Vec<PathBuf> {
    files(dir, &["usage-", "journal-"])
}

/// `.jsonl` files in `dir` whose names start with one of `prefixes`, oldest first.
pub(crate) fn files(dir: &Path, prefixes: &[&str]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            prefixes.iter().any(|p| name.starts_with(p)) && name.ends_with(".jsonl")
        })
        .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH), e.path()))
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

struct Current {
    file: File,
    bytes: u64,
}

struct SpoolThread {
    instance: String,
    dir: PathBuf,
    max_bytes: u64,
    /// The segment being written, locked.
    current: Option<Current>,
    seq: u64,
    /// Segments handed to the writer, locked until committed or failed.
    claimed: Vec<(PathBuf, File)>,
    /// Rows that could not be written yet.
    memory: VecDeque<UsageRow>,
    waiting: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl SpoolThread {
    fn run(&mut self, rx: std_mpsc::Receiver<Command>) {
        while let Ok(command) = rx.recv() {
            match command {
                Command::Append(rows) => self.append(rows),
                Command::Next(answer) => {
                    let _ = answer.send(self.next());
                }
                Command::Committed(path) => {
                    self.release(&path);
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!(file = %path.display(), error = %e, "could not remove a replayed spool segment");
                    }
                    self.measure();
                }
                Command::Failed(path) => self.release(&path),
                Command::Sync(answer) => {
                    self.write_memory();
                    let _ = answer.send(());
                }
            }
        }
    }

    fn release(&mut self, path: &Path) {
        // Closing the file releases its lock.
        self.claimed.retain(|(p, _)| p != path);
    }

    /// Total bytes of the segments in the directory, for the gauge and the cap.
    fn measure(&self) -> u64 {
        let bytes: u64 = segments(&self.dir).iter().filter_map(|p| p.metadata().ok()).map(|m| m.len()).sum();
        self.metrics.usage_spool_bytes.set(bytes as i64);
        bytes
    }

    fn append(&mut self, rows: Vec<UsageRow>) {
        self.memory.extend(rows);
        self.write_memory();
    }

    /// Writes the rows held in memory to the current segment; what cannot be written stays.
    fn write_memory(&mut self) {
        if self.memory.is_empty() {
            return;
        }
        let spooled = self.metrics.usage_spool_bytes.get().max(0) as u64;
        let result = if spooled >= self.max_bytes {
            Err(std::io::Error::other(format!("the spool holds {spooled} bytes, its limit (spool_max_bytes)")))
        } else {
            let rows = self.memory.make_contiguous().to_vec();
            self.write(rows)
        };
        match result {
            Ok(written) => {
                self.metrics.usage_rows_spooled.inc_by(self.memory.len() as u64);
                self.memory.clear();
                self.metrics.usage_spool_bytes.add(written as i64);
            }
            Err(e) => {
                self.metrics.usage_spool_write_errors.inc();
                tracing::error!(error = %e, rows = self.memory.len(), "usage spool write failed; rows held in memory");
                while self.memory.len() > MEMORY_ROWS {
                    self.memory.pop_front();
                    self.metrics.usage_rows_dropped.inc();
                }
            }
        }
        self.metrics.usage_spool_memory_rows.set(self.memory.len() as i64);
    }

    /// Appends `rows` to the current segment (a new one past its size) and syncs it.
    fn write(&mut self, rows: Vec<UsageRow>) -> std::io::Result<u64> {
        let mut buf = Vec::with_capacity(rows.len() * 320);
        for row in &rows {
            serde_json::to_writer(&mut buf, row)?;
            buf.push(b'\n');
        }
        if self.current.as_ref().is_some_and(|c| c.bytes >= SEGMENT_BYTES) {
            self.current = None;
        }
        if self.current.is_none() {
            self.seq += 1;
            let path = self.dir.join(format!("usage-{}-{:010}.jsonl", self.instance, self.seq));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            file.try_lock().map_err(|e| std::io::Error::other(format!("locking {}: {e}", path.display())))?;
            self.current = Some(Current { file, bytes: 0 });
        }
        let Some(current) = self.current.as_mut() else { return Ok(0) };
        if let Err(e) = current.file.write_all(&buf).and_then(|()| current.file.sync_data()) {
            // A half-written line is quarantined when the segment is replayed.
            self.current = None;
            return Err(e);
        }
        current.bytes += buf.len() as u64;
        self.waiting.store(true, Ordering::Release);
        Ok(buf.len() as u64)
    }

    /// The oldest segment no process writes or replays, read whole.
    fn next(&mut self) -> Option<Segment> {
        self.write_memory();
        // The segment being written is replayed too: close it, the next rows start another.
        self.current = None;
        let claimed: HashSet<PathBuf> = self.claimed.iter().map(|(p, _)| p.clone()).collect();
        for path in replayable(&self.dir).into_iter().filter(|p| !claimed.contains(p)) {
            let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) else { continue };
            if file.try_lock().is_err() {
                continue; // written or replayed by another process
            }
            let rows = self.read(&file, &path);
            if rows.is_empty() {
                // Nothing to replay (only quarantined lines, or empty): done with it.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            self.claimed.push((path.clone(), file));
            return Some(Segment { path, rows });
        }
        self.waiting.store(!self.memory.is_empty(), Ordering::Release);
        self.measure();
        None
    }

    /// A segment's rows; unreadable lines are moved to the quarantine file, counted.
    fn read(&self, file: &File, path: &Path) -> Vec<UsageRow> {
        let mut rows = Vec::new();
        let mut bad = Vec::new();
        for line in BufReader::new(file).split(b'\n') {
            let Ok(line) = line else { break };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<UsageRow>(&line) {
                Ok(row) => rows.push(row),
                Err(_) => bad.push(line),
            }
        }
        if !bad.is_empty() {
            self.metrics.usage_spool_corrupt_lines.inc_by(bad.len() as u64);
            tracing::error!(file = %path.display(), lines = bad.len(), quarantine = QUARANTINE, "unreadable usage spool lines quarantined");
            let quarantined =
                OpenOptions::new().create(true).append(true).open(self.dir.join(QUARANTINE)).and_then(|mut f| {
                    for line in &bad {
                        f.write_all(line)?;
                        f.write_all(b"\n")?;
                    }
                    f.sync_data()
                });
            if let Err(e) = quarantined {
                tracing::error!(error = %e, "could not write the usage spool quarantine");
            }
        }
        rows
    }
}
