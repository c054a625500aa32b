//! The block sums a worker records for each relation file: read as it is
//! stored, taken from the reference, or from an interrupted run's copy.

use std::io;

use super::super::copy::ScanFile;
use super::Worker;
use crate::error::{Error, Kind, Result};
use crate::pg::relfile::RelFile;
use crate::repo::blockmap::{self, Ranges};
use crate::repo::blocksums::{self, BlockSum, SumsSink};

impl Worker {
    /// Records the block sums of relation file `rel`.
    pub(super) fn record_sums(&mut self, rel: &str, sums: &[BlockSum]) -> Result<()> {
        let err =
            |e: io::Error| Error::io_in(Kind::Internal, "keep block sums in a temporary file", &e);
        if self.sums.is_none() {
            self.sums = Some(SumsSink::new().map_err(err)?);
        }
        let sink = self.sums.as_mut().expect("sink was just ensured");
        sink.add(rel, sums).map_err(err)
    }

    /// Records the block sums of relation file `f`, reused from an
    /// interrupted run: unchanged since that run read it, so its blocks on
    /// disk are those stored — all of them, or only `blocks` over the
    /// reference's sums `base` (none without the reference's).
    pub(super) fn record_reused_sums(
        &mut self,
        f: &ScanFile,
        base: Option<Vec<BlockSum>>,
        blocks: Option<&Ranges>,
    ) -> Result<()> {
        if RelFile::parse(&f.rel).is_none() {
            return Ok(());
        }
        let Some(disk) = blocksums::sums_of_file(&f.abs)
            .map_err(|e| Error::io(Kind::InvalidInput, "read", f.abs.display(), &e))?
        else {
            return Ok(()); // vanished: replay recreates or drops it
        };
        let sums = match blocks {
            None => Some(disk),
            Some(blocks) => base.map(|all| {
                let read = blocks.iter().flat_map(|&(a, b)| a..=b).map(|b| {
                    disk.get(b as usize)
                        .copied()
                        .unwrap_or([0; blocksums::SUM_LEN])
                });
                merge_sums(all, f.size, blocks, read)
            }),
        };
        match sums {
            Some(s) => self.record_sums(&f.rel, &s),
            None => Ok(()),
        }
    }

    /// The blocks of `f` whose sums differ from the reference's `sums`
    /// (or that the reference does not have); `None` if it vanished.
    pub(super) fn changed_blocks(
        &mut self,
        f: &ScanFile,
        sums: &[BlockSum],
    ) -> Result<Option<Ranges>> {
        let read = blocksums::sums_of_file(&f.abs)
            .map_err(|e| Error::io(Kind::InvalidInput, "read", f.abs.display(), &e))?;
        let Some(disk) = read else {
            return Ok(None);
        };
        let n = blockmap::block_count(f.size);
        self.counts.compared_blocks += u64::from(n);
        let changed = (0..n).filter(|&b| {
            let i = b as usize;
            disk.get(i).is_none() || sums.get(i) != disk.get(i)
        });
        Ok(Some(blockmap::ranges_of(changed)))
    }
}

/// A file's block sums at this backup: `all` (the reference's) with the
/// sums `read` of the changed `blocks` put in their places, sized to `size`.
pub(super) fn merge_sums(
    mut all: Vec<BlockSum>,
    size: u64,
    blocks: &Ranges,
    read: impl IntoIterator<Item = BlockSum>,
) -> Vec<BlockSum> {
    all.resize(
        blockmap::block_count(size) as usize,
        [0; blocksums::SUM_LEN],
    );
    let at = blocks.iter().flat_map(|&(a, b)| a..=b);
    for (b, s) in at.zip(read) {
        if let Some(slot) = all.get_mut(b as usize) {
            *slot = s;
        }
    }
    all
}
