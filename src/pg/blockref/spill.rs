//! Union of many [`ChangeSet`]s in bounded memory: [`UnionBuilder`].
//!
//! Forks are held in memory until they pass the budget; then they are
//! written, sorted, to a run file in the spill directory and memory starts
//! over. At the end the runs are merged (a k-way merge by fork, one entry per
//! run in memory) into one sorted file, read back once to check its CRC and
//! to build a sparse index (one key per 64 KiB), so a lookup reads at most
//! 64 KiB plus the fork's own entry. Tablespace, database and doubt entries
//! stay in memory: there are few of them.
//!
//! Memory is the budget plus, during the merge, one fork per run. A single
//! fork's set is at most 8 KiB per 512 MiB of that relation (a bitmap chunk),
//! so the largest relation bounds that part.

use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom};
use std::path::Path;

use super::codec::{BlockRefError, In, Out, CHANGE_SET_KIND};
use super::{state_of, ChangeSet, ForkChanges, ForkState, RelFork};

/// Bytes of merged file between two sparse index entries.
const INDEX_EVERY: u64 = 64 * 1024;

/// Unions change sets, spilling to disk past a memory budget.
pub struct UnionBuilder {
    budget: usize,
    dir: std::path::PathBuf,
    /// Forks, and every small section.
    mem: ChangeSet,
    /// Upper bound of `mem`'s size since it was last measured.
    estimate: usize,
    runs: Vec<File>,
}

impl UnionBuilder {
    /// `budget`: bytes of memory for forks before spilling to `spill_dir`.
    pub fn new(budget: usize, spill_dir: &Path) -> UnionBuilder {
        UnionBuilder {
            budget,
            dir: spill_dir.to_path_buf(),
            mem: ChangeSet::new(),
            estimate: 0,
            runs: Vec::new(),
        }
    }

    pub fn add(&mut self, set: ChangeSet) -> io::Result<()> {
        self.estimate += set.mem_bytes();
        self.mem.union_with(set);
        if self.estimate > self.budget {
            self.estimate = self.mem.mem_bytes();
            if self.estimate > self.budget {
                self.spill()?;
            }
        }
        Ok(())
    }

    /// Runs written so far.
    pub fn spilled_runs(&self) -> usize {
        self.runs.len()
    }

    fn spill(&mut self) -> io::Result<()> {
        let forks = std::mem::take(&mut self.mem.forks);
        let mut out = Out::new(BufWriter::new(tempfile::tempfile_in(&self.dir)?));
        out.header(CHANGE_SET_KIND)?;
        out.small_sections(&ChangeSet::new())?;
        for (k, f) in &forks {
            out.fork(k, f)?;
        }
        out.end_forks()?;
        let mut file = out.finish()?.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        self.runs.push(file);
        self.estimate = self.mem.mem_bytes();
        Ok(())
    }

    pub fn finish(mut self) -> Result<UnionResult, BlockRefError> {
        if self.runs.is_empty() {
            return Ok(UnionResult::Memory(self.mem));
        }
        self.spill()?;
        let small = std::mem::take(&mut self.mem);
        let merged = merge(self.runs, &self.dir)?;
        Ok(UnionResult::Spilled(SpilledChangeSet::open(merged, small)?))
    }
}

/// One run being merged: its reader and its current entry.
struct Run {
    inp: In<BufReader<File>>,
    head: Option<(RelFork, ForkChanges)>,
}

impl Run {
    fn open(file: File) -> Result<Run, BlockRefError> {
        let mut inp = In::new(BufReader::new(file));
        inp.header()?;
        inp.small_sections(&mut ChangeSet::new())?;
        let head = inp.fork()?;
        Ok(Run { inp, head })
    }
}

/// Merges sorted runs into one sorted file, forks with equal keys unioned;
/// checks each run's CRC as it ends.
fn merge(runs: Vec<File>, dir: &Path) -> Result<File, BlockRefError> {
    let mut runs: Vec<Option<Run>> = runs
        .into_iter()
        .map(|f| Run::open(f).map(Some))
        .collect::<Result<_, _>>()?;
    // Min-heap of (key, run).
    let mut heap: BinaryHeap<std::cmp::Reverse<(RelFork, usize)>> = runs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some(std::cmp::Reverse((r.as_ref()?.head.as_ref()?.0, i))))
        .collect();
    let mut out = Out::new(BufWriter::new(tempfile::tempfile_in(dir)?));
    out.header(CHANGE_SET_KIND)?;
    out.small_sections(&ChangeSet::new())?;
    let mut current: Option<(RelFork, ForkChanges)> = None;
    while let Some(std::cmp::Reverse((key, i))) = heap.pop() {
        let run = runs[i].as_mut().expect("a run in the heap is open");
        let (k, f) = run.head.take().expect("a run in the heap has an entry");
        debug_assert_eq!(k, key);
        match run.inp.fork()? {
            Some(next) => {
                if next.0 <= key {
                    return Err(BlockRefError::Invalid(format!(
                        "spill run out of order at {}",
                        next.0
                    )));
                }
                heap.push(std::cmp::Reverse((next.0, i)));
                run.head = Some(next);
            }
            None => {
                let run = runs[i].take().expect("open");
                run.inp.finish()?;
            }
        }
        match &mut current {
            Some((ck, cf)) if *ck == k => cf.union_with(f),
            _ => {
                if let Some((ck, cf)) = current.replace((k, f)) {
                    out.fork(&ck, &cf)?;
                }
            }
        }
    }
    if let Some((ck, cf)) = current {
        out.fork(&ck, &cf)?;
    }
    out.end_forks()?;
    let mut file = out.finish()?.into_inner().map_err(|e| e.into_error())?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// Counts the bytes read through it, for the sparse index's offsets.
struct Counted<R> {
    r: R,
    at: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// A union too large for memory: forks in a sorted file, with a sparse index.
pub struct SpilledChangeSet {
    file: std::sync::Mutex<File>,
    /// (first key of a stretch, its offset).
    index: Vec<(RelFork, u64)>,
    small: ChangeSet,
    forks: u64,
}

impl SpilledChangeSet {
    fn open(file: File, small: ChangeSet) -> Result<SpilledChangeSet, BlockRefError> {
        let mut inp = In::new(Counted {
            r: BufReader::new(file),
            at: 0,
        });
        inp.header()?;
        inp.small_sections(&mut ChangeSet::new())?;
        let mut index = Vec::new();
        let mut forks = 0u64;
        let mut last_indexed: Option<u64> = None;
        loop {
            let at = inp.inner().at;
            let Some((k, _)) = inp.fork()? else {
                break;
            };
            forks += 1;
            if last_indexed.is_none_or(|l| at - l >= INDEX_EVERY) {
                index.push((k, at));
                last_indexed = Some(at);
            }
        }
        let file = inp.finish()?.r.into_inner();
        Ok(SpilledChangeSet {
            file: std::sync::Mutex::new(file),
            index,
            small,
            forks,
        })
    }

    /// Number of forks with an entry.
    pub fn fork_count(&self) -> u64 {
        self.forks
    }

    /// The tablespace, database and doubt entries.
    pub fn small_sections(&self) -> &ChangeSet {
        &self.small
    }

    /// One fork's entry, read from disk.
    pub fn fork(&self, key: &RelFork) -> Result<Option<ForkChanges>, BlockRefError> {
        let i = self.index.partition_point(|(k, _)| k <= key);
        let Some(&(_, offset)) = i.checked_sub(1).and_then(|i| self.index.get(i)) else {
            return Ok(None);
        };
        let mut file = self
            .file
            .lock()
            .map_err(|_| BlockRefError::Invalid("spill file lock poisoned".into()))?;
        file.seek(SeekFrom::Start(offset))?;
        let mut inp = In::new(BufReader::new(&mut *file));
        while let Some((k, f)) = inp.fork()? {
            match k.cmp(key) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => return Ok(Some(f)),
                std::cmp::Ordering::Greater => return Ok(None),
            }
        }
        Ok(None)
    }
}

/// A finished union: in memory, or spilled to disk.
pub enum UnionResult {
    Memory(ChangeSet),
    Spilled(SpilledChangeSet),
}

impl UnionResult {
    /// Calls `f` with what a backup must read of one fork
    /// ([`ChangeSet::fork_state`]).
    pub fn with_fork_state<T>(
        &self,
        key: &RelFork,
        f: impl FnOnce(ForkState<'_>) -> T,
    ) -> Result<T, BlockRefError> {
        match self {
            UnionResult::Memory(s) => Ok(f(s.fork_state(key))),
            UnionResult::Spilled(s) => {
                let entry = s.fork(key)?;
                let small = &s.small;
                Ok(f(state_of(
                    key,
                    small.doubt_for(key),
                    small.tablespaces.get(&key.loc.spc).copied(),
                    small.databases.get(&(key.loc.spc, key.loc.db)).copied(),
                    entry.as_ref(),
                )))
            }
        }
    }

    /// The tablespace, database and doubt entries.
    pub fn small_sections(&self) -> &ChangeSet {
        match self {
            UnionResult::Memory(s) => s,
            UnionResult::Spilled(s) => &s.small,
        }
    }
}
