//! The binary form of [`SegmentRefs`] and [`ChangeSet`], version
//! [`BLOCKREF_FORMAT`]. The repository wraps it in its own object header
//! (compression, SHA-256); this form checks itself too (a CRC-32C trailer)
//! because spill files of a large union are read back without that wrapper.
//!
//! ```text
//! magic   "PGVBREF" (7 bytes)   version u8 (1)   kind u8 (1 segment, 2 change set)
//! segment only: segment_start u64, seg_size u32, major u32, head piece, tail piece
//!   piece: present u8; then start u64, rem_len u32, len u64,
//!          raw (n, bytes), rest_crc u32, tail (n, bytes)
//! tablespaces: n, then (spc, flags u8)…
//! databases:   n, then (spc, db, flags u8)…
//! doubts:      n, then (lsn u64, scope, why (n, UTF-8 bytes))…
//!   scope: u8 0 all | 1 database: spc, db | 2 fork: spc, db, rel, fork u8
//! forks, in (spc, db, rel, fork) order, each: u8 1, spc, db, rel, fork u8,
//!   flags u8, limit + 1 (0: none), chunk count, chunks; then u8 0
//!   chunk: number (delta from the previous one), form u8 and its blocks:
//!     0 array:  n, then each low 16 bits as a delta (the first absolute,
//!               then minus the previous plus one)
//!     1 bitmap: 1024 u64
//!     2 runs:   n, then each (gap from the previous run's end, length - 1)
//! trailer: CRC-32C of every byte before it, u32
//! ```
//! Unmarked integers are LEB128 varints; fixed-width ones little-endian.

use std::io::{self, Read, Write};

use super::set::Container;
use super::{BlockSet, ChangeSet, Doubt, DoubtScope, Fork, ForkChanges, Piece, RelFileLocator};
use super::{RelFork, SegmentRefs};
use crate::pg::Lsn;

/// Version of the binary form.
pub const BLOCKREF_FORMAT: u8 = 1;
const MAGIC: &[u8; 7] = b"PGVBREF";
const KIND_SEGMENT: u8 = 1;
const KIND_CHANGE_SET: u8 = 2;
/// Longest piece or doubt text accepted when reading (a piece is at most a
/// few KiB; anything larger is damage).
const MAX_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockRefError {
    #[error("not a pgvault block reference object (no PGVBREF magic)")]
    Magic,
    #[error(
        "block reference format version {0} is newer than this pgvault reads ({BLOCKREF_FORMAT})"
    )]
    Version(u8),
    #[error("block reference object ends early")]
    Truncated,
    #[error("block reference object fails its CRC-32C check")]
    Checksum,
    #[error("block reference object is invalid: {0}")]
    Invalid(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn invalid(what: impl Into<String>) -> BlockRefError {
    BlockRefError::Invalid(what.into())
}

/// A writer that keeps the CRC of what went through it.
pub(super) struct Out<W: Write> {
    w: W,
    crc: u32,
}

impl<W: Write> Out<W> {
    pub(super) fn new(w: W) -> Out<W> {
        Out { w, crc: 0 }
    }

    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, b);
        self.w.write_all(b)
    }

    fn u8(&mut self, v: u8) -> io::Result<()> {
        self.bytes(&[v])
    }

    fn var(&mut self, mut v: u64) -> io::Result<()> {
        let mut buf = [0u8; 10];
        let mut n = 0;
        loop {
            let byte = (v & 0x7F) as u8;
            v >>= 7;
            if v == 0 {
                buf[n] = byte;
                n += 1;
                break;
            }
            buf[n] = byte | 0x80;
            n += 1;
        }
        self.bytes(&buf[..n])
    }

    fn blob(&mut self, b: &[u8]) -> io::Result<()> {
        self.var(b.len() as u64)?;
        self.bytes(b)
    }

    pub(super) fn header(&mut self, kind: u8) -> io::Result<()> {
        self.bytes(MAGIC)?;
        self.u8(BLOCKREF_FORMAT)?;
        self.u8(kind)
    }

    pub(super) fn small_sections(&mut self, s: &ChangeSet) -> io::Result<()> {
        self.var(s.tablespaces.len() as u64)?;
        for (&spc, &f) in &s.tablespaces {
            self.var(spc.into())?;
            self.u8(f)?;
        }
        self.var(s.databases.len() as u64)?;
        for (&(spc, db), &f) in &s.databases {
            self.var(spc.into())?;
            self.var(db.into())?;
            self.u8(f)?;
        }
        self.var(s.doubts.len() as u64)?;
        for d in s.doubts.values() {
            self.bytes(&d.lsn.0.to_le_bytes())?;
            match d.scope {
                DoubtScope::All => self.u8(0)?,
                DoubtScope::Database { spc, db } => {
                    self.u8(1)?;
                    self.var(spc.into())?;
                    self.var(db.into())?;
                }
                DoubtScope::Fork(k) => {
                    self.u8(2)?;
                    self.key(&k)?;
                }
            }
            self.blob(d.why.as_bytes())?;
        }
        Ok(())
    }

    fn key(&mut self, k: &RelFork) -> io::Result<()> {
        self.var(k.loc.spc.into())?;
        self.var(k.loc.db.into())?;
        self.var(k.loc.rel.into())?;
        self.u8(k.fork as u8)
    }

    pub(super) fn fork(&mut self, k: &RelFork, f: &ForkChanges) -> io::Result<()> {
        self.u8(1)?;
        self.key(k)?;
        self.u8(f.flags)?;
        self.var(f.limit.map_or(0, |l| u64::from(l) + 1))?;
        let chunks = f.blocks.chunks();
        self.var(chunks.len() as u64)?;
        let mut prev_hi = 0u16;
        for (i, (hi, c)) in chunks.iter().enumerate() {
            self.var(u64::from(if i == 0 { *hi } else { hi - prev_hi }))?;
            prev_hi = *hi;
            match c {
                Container::Array(a) => {
                    self.u8(0)?;
                    self.var(a.len() as u64)?;
                    let mut next = 0u32;
                    for &v in a {
                        self.var(u64::from(u32::from(v) - next))?;
                        next = u32::from(v) + 1;
                    }
                }
                Container::Bitmap(b) => {
                    self.u8(1)?;
                    for w in b.iter() {
                        self.bytes(&w.to_le_bytes())?;
                    }
                }
                Container::Runs(r) => {
                    self.u8(2)?;
                    self.var(r.len() as u64)?;
                    let mut next = 0u32;
                    for &(f, l) in r {
                        self.var(u64::from(u32::from(f) - next))?;
                        self.var(u64::from(l - f))?;
                        next = u32::from(l) + 1;
                    }
                }
            }
        }
        Ok(())
    }

    pub(super) fn end_forks(&mut self) -> io::Result<()> {
        self.u8(0)
    }

    /// Writes the trailer and hands the writer back.
    pub(super) fn finish(mut self) -> io::Result<W> {
        let crc = self.crc;
        self.w.write_all(&crc.to_le_bytes())?;
        Ok(self.w)
    }

    fn piece(&mut self, p: Option<&Piece>) -> io::Result<()> {
        let Some(p) = p else {
            return self.u8(0);
        };
        self.u8(1)?;
        self.bytes(&p.start.0.to_le_bytes())?;
        self.bytes(&p.rem_len.to_le_bytes())?;
        self.bytes(&p.len.to_le_bytes())?;
        self.blob(&p.raw)?;
        self.bytes(&p.rest_crc.to_le_bytes())?;
        self.blob(&p.tail)
    }
}

fn write_change_set<W: Write>(out: &mut Out<W>, s: &ChangeSet) -> io::Result<()> {
    out.small_sections(s)?;
    for (k, f) in &s.forks {
        out.fork(k, f)?;
    }
    out.end_forks()
}

pub fn encode_change_set(s: &ChangeSet) -> Vec<u8> {
    let mut out = Out::new(Vec::new());
    let wrote: io::Result<Vec<u8>> = (|| {
        out.header(KIND_CHANGE_SET)?;
        write_change_set(&mut out, s)?;
        out.finish()
    })();
    wrote.expect("writing to a Vec cannot fail")
}

pub fn encode_segment(s: &SegmentRefs) -> Vec<u8> {
    let mut out = Out::new(Vec::new());
    let wrote: io::Result<Vec<u8>> = (|| {
        out.header(KIND_SEGMENT)?;
        out.bytes(&s.segment_start.0.to_le_bytes())?;
        out.bytes(&s.seg_size.to_le_bytes())?;
        out.bytes(&s.major.to_le_bytes())?;
        out.piece(s.head.as_ref())?;
        out.piece(s.tail.as_ref())?;
        write_change_set(&mut out, &s.changes)?;
        out.finish()
    })();
    wrote.expect("writing to a Vec cannot fail")
}

/// A reader that keeps the CRC of what it read.
pub(super) struct In<R: Read> {
    r: R,
    crc: u32,
}

impl<R: Read> In<R> {
    pub(super) fn new(r: R) -> In<R> {
        In { r, crc: 0 }
    }

    pub(super) fn inner(&self) -> &R {
        &self.r
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), BlockRefError> {
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => BlockRefError::Truncated,
            _ => BlockRefError::Io(e),
        })?;
        self.crc = crc32c::crc32c_append(self.crc, buf);
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, BlockRefError> {
        let mut b = [0u8; 1];
        self.fill(&mut b)?;
        Ok(b[0])
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], BlockRefError> {
        let mut b = [0u8; N];
        self.fill(&mut b)?;
        Ok(b)
    }

    fn var(&mut self) -> Result<u64, BlockRefError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(invalid("varint longer than 64 bits"))
    }

    fn var_u32(&mut self, what: &str) -> Result<u32, BlockRefError> {
        u32::try_from(self.var()?).map_err(|_| invalid(format!("{what} above 2^32")))
    }

    fn blob(&mut self, what: &str) -> Result<Vec<u8>, BlockRefError> {
        let n = self.var()?;
        if n > MAX_BYTES {
            return Err(invalid(format!("{what} of {n} bytes")));
        }
        let mut b = vec![0u8; n as usize];
        self.fill(&mut b)?;
        Ok(b)
    }

    /// Reads the magic, version and kind.
    pub(super) fn header(&mut self) -> Result<u8, BlockRefError> {
        let magic: [u8; 7] = self.fixed().map_err(|e| match e {
            BlockRefError::Truncated => BlockRefError::Magic,
            e => e,
        })?;
        if &magic != MAGIC {
            return Err(BlockRefError::Magic);
        }
        let version = self.u8()?;
        if version != BLOCKREF_FORMAT {
            return Err(BlockRefError::Version(version));
        }
        self.u8()
    }

    fn key(&mut self) -> Result<RelFork, BlockRefError> {
        let loc = RelFileLocator {
            spc: self.var_u32("tablespace")?,
            db: self.var_u32("database")?,
            rel: self.var_u32("relation")?,
        };
        let n = self.u8()?;
        let fork = Fork::from_number(n).ok_or_else(|| invalid(format!("fork number {n}")))?;
        Ok(RelFork { loc, fork })
    }

    /// The tablespace, database and doubt sections, into an empty set.
    pub(super) fn small_sections(&mut self, s: &mut ChangeSet) -> Result<(), BlockRefError> {
        for _ in 0..self.var()? {
            let spc = self.var_u32("tablespace")?;
            let f = self.u8()?;
            s.tablespaces.insert(spc, f);
        }
        for _ in 0..self.var()? {
            let spc = self.var_u32("tablespace")?;
            let db = self.var_u32("database")?;
            let f = self.u8()?;
            s.databases.insert((spc, db), f);
        }
        for _ in 0..self.var()? {
            let lsn = Lsn(u64::from_le_bytes(self.fixed()?));
            let scope = match self.u8()? {
                0 => DoubtScope::All,
                1 => DoubtScope::Database {
                    spc: self.var_u32("tablespace")?,
                    db: self.var_u32("database")?,
                },
                2 => DoubtScope::Fork(self.key()?),
                t => return Err(invalid(format!("doubt scope {t}"))),
            };
            let why = String::from_utf8(self.blob("doubt text")?)
                .map_err(|_| invalid("doubt text is not UTF-8"))?;
            s.doubts.insert(scope, Doubt { lsn, scope, why });
        }
        Ok(())
    }

    /// The next fork entry, or None at the end of the forks.
    pub(super) fn fork(&mut self) -> Result<Option<(RelFork, ForkChanges)>, BlockRefError> {
        match self.u8()? {
            0 => return Ok(None),
            1 => {}
            t => return Err(invalid(format!("fork entry tag {t}"))),
        }
        let key = self.key()?;
        let flags = self.u8()?;
        let limit = match self.var()? {
            0 => None,
            l => Some(u32::try_from(l - 1).map_err(|_| invalid("limit block above 2^32"))?),
        };
        let n = self.var()?;
        if n > 1 << 16 {
            return Err(invalid(format!("{key}: {n} chunks")));
        }
        let mut chunks = Vec::with_capacity(n as usize);
        let mut hi = 0u32;
        for i in 0..n {
            let d = self.var()?;
            let h = if i == 0 {
                d
            } else if d == 0 {
                return Err(invalid(format!("{key}: chunk numbers out of order")));
            } else {
                u64::from(hi) + d
            };
            if h > 0xFFFF {
                return Err(invalid(format!("{key}: chunk number {h}")));
            }
            hi = h as u32;
            let c = self.container(&key)?;
            chunks.push((hi as u16, c));
        }
        Ok(Some((
            key,
            ForkChanges {
                blocks: BlockSet::from_chunks(chunks),
                limit,
                flags,
            },
        )))
    }

    fn container(&mut self, key: &RelFork) -> Result<Container, BlockRefError> {
        let bad = |what: &str| invalid(format!("{key}: {what}"));
        match self.u8()? {
            0 => {
                let n = self.var()?;
                if n == 0 || n > 1 << 16 {
                    return Err(bad("array size"));
                }
                let mut a = Vec::with_capacity(n as usize);
                let mut next = 0u64;
                for _ in 0..n {
                    let v = next + self.var()?;
                    if v > 0xFFFF {
                        return Err(bad("array block beyond its chunk"));
                    }
                    a.push(v as u16);
                    next = v + 1;
                }
                Ok(Container::Array(a))
            }
            1 => {
                let mut b = Box::new([0u64; 1024]);
                for w in b.iter_mut() {
                    *w = u64::from_le_bytes(self.fixed()?);
                }
                if b.iter().all(|w| *w == 0) {
                    return Err(bad("empty bitmap"));
                }
                Ok(Container::Bitmap(b))
            }
            2 => {
                let n = self.var()?;
                if n == 0 || n > 1 << 15 {
                    return Err(bad("run count"));
                }
                let mut r = Vec::with_capacity(n as usize);
                let mut next = 0u64;
                for _ in 0..n {
                    let f = next + self.var()?;
                    let l = f + self.var()?;
                    if l > 0xFFFF {
                        return Err(bad("run beyond its chunk"));
                    }
                    r.push((f as u16, l as u16));
                    next = l + 1;
                }
                Ok(Container::Runs(r))
            }
            t => Err(bad(&format!("chunk form {t}"))),
        }
    }

    /// Checks the trailer against everything read before it.
    pub(super) fn finish(mut self) -> Result<R, BlockRefError> {
        let want = self.crc;
        let got = u32::from_le_bytes(self.fixed()?);
        if got != want {
            return Err(BlockRefError::Checksum);
        }
        Ok(self.r)
    }

    fn piece(&mut self) -> Result<Option<Piece>, BlockRefError> {
        if self.u8()? == 0 {
            return Ok(None);
        }
        Ok(Some(Piece {
            start: Lsn(u64::from_le_bytes(self.fixed()?)),
            rem_len: u32::from_le_bytes(self.fixed()?),
            len: u64::from_le_bytes(self.fixed()?),
            raw: self.blob("piece")?,
            rest_crc: u32::from_le_bytes(self.fixed()?),
            tail: self.blob("piece tail")?,
        }))
    }
}

fn read_change_set<R: Read>(inp: &mut In<R>) -> Result<ChangeSet, BlockRefError> {
    let mut s = ChangeSet::new();
    inp.small_sections(&mut s)?;
    let mut prev: Option<RelFork> = None;
    while let Some((k, f)) = inp.fork()? {
        if prev.is_some_and(|p| p >= k) {
            return Err(invalid(format!("fork {k} out of order")));
        }
        prev = Some(k);
        s.forks.insert(k, f);
    }
    Ok(s)
}

fn expect_end(bytes: &[u8]) -> Result<(), BlockRefError> {
    if bytes.is_empty() {
        Ok(())
    } else {
        Err(invalid(format!("{} bytes after the trailer", bytes.len())))
    }
}

pub fn decode_change_set(bytes: &[u8]) -> Result<ChangeSet, BlockRefError> {
    let mut inp = In::new(bytes);
    if inp.header()? != KIND_CHANGE_SET {
        return Err(invalid(
            "a segment's object where a change set was expected",
        ));
    }
    let s = read_change_set(&mut inp)?;
    expect_end(inp.finish()?)?;
    Ok(s)
}

pub fn decode_segment(bytes: &[u8]) -> Result<SegmentRefs, BlockRefError> {
    let mut inp = In::new(bytes);
    if inp.header()? != KIND_SEGMENT {
        return Err(invalid(
            "a change set where a segment's object was expected",
        ));
    }
    let segment_start = Lsn(u64::from_le_bytes(inp.fixed()?));
    let seg_size = u32::from_le_bytes(inp.fixed()?);
    let major = u32::from_le_bytes(inp.fixed()?);
    let head = inp.piece()?;
    let tail = inp.piece()?;
    let changes = read_change_set(&mut inp)?;
    expect_end(inp.finish()?)?;
    Ok(SegmentRefs {
        segment_start,
        seg_size,
        major,
        changes,
        head,
        tail,
    })
}

pub(super) const CHANGE_SET_KIND: u8 = KIND_CHANGE_SET;
