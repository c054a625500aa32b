//! Chunked pieces: a relation file (or a part of one) of a megabyte or
//! more is stored as chunks of [`CHUNK_BLOCKS`] blocks (1 MiB raw), each
//! its own codec envelope — large enough to compress well, small enough to
//! fetch alone — so that `restore --delta` fetches, by ranged read, only
//! the chunks holding the blocks it must write.
//!
//! Layout of a chunked piece, at its offset in a data object:
//!
//! ```text
//! for each chunk:  u32 LE encoded length, the chunk's envelope
//! the index:       one envelope holding each chunk's offset in the piece (u64 LE)
//! u32 LE           the index envelope's length
//! ```
//!
//! A sequential reader walks the length prefixes; a random reader reads the
//! tail (the index) first. Every chunk's envelope carries the SHA-256 of
//! its raw bytes, and the piece's SHA-256 in the manifest covers them all.
//! A piece without `chunk_blocks` in the manifest (written before chunks,
//! or a small file in a bundle) is one envelope. Every envelope (each
//! chunk, the index) is bound, when sealed, to the object's key and its own
//! offset in the object, so a chunk moved elsewhere does not open.

use std::io::{self, Read, Write};
use std::ops::Range;

use super::codec::{
    self, Binding, Check, CodecError, Digest256, EncodeOptions, Encoder, HashingWriter,
};
use super::crypt::Keys;
use super::Backend;
use crate::error::{Error, Result};
use crate::pg::relfile::BLOCK_SIZE;

/// Blocks per chunk.
pub const CHUNK_BLOCKS: u32 = 128;

/// Writes a piece as chunks of `CHUNK_BLOCKS` blocks.
pub struct ChunkedEncoder<W: Write> {
    out: W,
    opts: EncodeOptions,
    keys: Keys,
    /// The object's key and the piece's offset in it.
    key: String,
    base: u64,
    buf: Vec<u8>,
    raw: HashingWriter<io::Sink>,
    /// Bytes of the piece written so far.
    pos: u64,
    offsets: Vec<u64>,
}

fn chunk_raw(chunk_blocks: u32) -> usize {
    chunk_blocks as usize * BLOCK_SIZE
}

impl<W: Write> ChunkedEncoder<W> {
    pub fn new(out: W, opts: EncodeOptions, keys: &Keys, bind: Binding<'_>) -> Self {
        ChunkedEncoder {
            out,
            // A chunk is compressed alone: zstd's worker threads would
            // only cost their start-up.
            opts: EncodeOptions { threads: 0, ..opts },
            keys: keys.clone(),
            key: bind.key.to_string(),
            base: bind.offset,
            buf: Vec::with_capacity(chunk_raw(CHUNK_BLOCKS)),
            raw: HashingWriter::new(io::sink()),
            pos: 0,
            offsets: Vec::new(),
        }
    }

    fn put(&mut self, envelope: &[u8]) -> io::Result<()> {
        let len = u32::try_from(envelope.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "chunk too large"))?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(envelope)?;
        self.pos += 4 + u64::from(len);
        Ok(())
    }

    /// Where the next envelope starts in the object, after its length.
    fn next_binding(&self) -> Binding<'_> {
        Binding::at(&self.key, self.base + self.pos + 4)
    }

    fn flush_chunk(&mut self) -> io::Result<()> {
        let env = codec::encode_bytes(&self.buf, self.opts, &self.keys, self.next_binding())?;
        self.offsets.push(self.pos);
        self.put(&env)?;
        self.buf.clear();
        Ok(())
    }

    /// Writes the last chunk and the index; returns the sink and the
    /// piece's raw size and SHA-256.
    pub fn finish(mut self) -> io::Result<(W, Digest256)> {
        if !self.buf.is_empty() {
            self.flush_chunk()?;
        }
        let index: Vec<u8> = self.offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        let bind = Binding::at(&self.key, self.base + self.pos);
        let env = codec::encode_bytes(&index, self.opts, &self.keys, bind)?;
        self.out.write_all(&env)?;
        let len = u32::try_from(env.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "index too large"))?;
        self.out.write_all(&len.to_le_bytes())?;
        let (_, digest) = self.raw.finish();
        Ok((self.out, digest))
    }
}

impl<W: Write> Write for ChunkedEncoder<W> {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        self.raw.write_all(buf)?;
        let max = chunk_raw(CHUNK_BLOCKS);
        while !buf.is_empty() {
            let take = (max - self.buf.len()).min(buf.len());
            self.buf.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.buf.len() == max {
                self.flush_chunk()?;
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Encodes a piece whole (one envelope) or in chunks.
pub enum PieceEncoder<W: Write> {
    Whole(Encoder<W>),
    Chunked(ChunkedEncoder<W>),
}

impl<W: Write> PieceEncoder<W> {
    pub fn new(
        out: W,
        opts: EncodeOptions,
        chunked: bool,
        keys: &Keys,
        bind: Binding<'_>,
    ) -> io::Result<Self> {
        Ok(match chunked {
            true => PieceEncoder::Chunked(ChunkedEncoder::new(out, opts, keys, bind)),
            false => PieceEncoder::Whole(Encoder::new(out, opts, keys, bind)?),
        })
    }

    pub fn finish(self) -> io::Result<(W, Digest256)> {
        match self {
            PieceEncoder::Whole(e) => e.finish(),
            PieceEncoder::Chunked(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for PieceEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            PieceEncoder::Whole(e) => e.write(buf),
            PieceEncoder::Chunked(e) => e.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            PieceEncoder::Whole(e) => e.flush(),
            PieceEncoder::Chunked(e) => e.flush(),
        }
    }
}

/// Decodes a piece of `length` stored bytes and `raw_size` raw ones from
/// `input` into `out`, each envelope checked; returns what was decoded
/// (the caller compares it with the manifest). `input` must end at the
/// piece's end.
pub fn decode_piece<R: Read, W: Write>(
    input: R,
    out: W,
    length: u64,
    raw_size: u64,
    chunk_blocks: Option<u32>,
    keys: &Keys,
    bind: Binding<'_>,
) -> std::result::Result<Digest256, CodecError> {
    let shape = (length, raw_size, chunk_blocks);
    decode_piece_with(input, out, shape, keys, bind, Check::Full)
}

/// [`decode_piece`] with the check of each chunk's envelope `chunk_check`
/// says: [`Check::SizeOnly`] for a restore, which hashes every byte once —
/// the piece's SHA-256, which the caller compares with the manifest,
/// covers the bytes each chunk's would (SHA-256 was a third of a restore's
/// CPU); `verify` checks every envelope in full. `shape`: the piece's
/// stored length, raw size and chunk size (blocks), as in the manifest.
pub fn decode_piece_with<R: Read, W: Write>(
    mut input: R,
    out: W,
    (length, raw_size, chunk_blocks): (u64, u64, Option<u32>),
    keys: &Keys,
    bind: Binding<'_>,
    chunk_check: Check,
) -> std::result::Result<Digest256, CodecError> {
    let Some(cb) = chunk_blocks else {
        return codec::decode_sized(input, out, length, keys, bind);
    };
    let mut sink = HashingWriter::new(out);
    let chunks = raw_size.div_ceil(chunk_raw(cb.max(1)) as u64);
    let mut pos = bind.offset;
    for _ in 0..chunks {
        let mut l = [0u8; 4];
        input.read_exact(&mut l).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => CodecError::Truncated,
            _ => CodecError::from(e),
        })?;
        let len = u32::from_le_bytes(l);
        let at = Binding::at(bind.key, pos + 4);
        codec::decode_checked(
            (&mut input).take(u64::from(len)),
            &mut sink,
            u64::from(len),
            keys,
            at,
            chunk_check,
        )?;
        pos += 4 + u64::from(len);
    }
    let (_, d) = sink.finish();
    Ok(d)
}

/// The stored byte ranges (within the object) of the chunks of a piece at
/// `offset`, `length` bytes long, in `key`: from its index; and the bytes
/// read to learn them.
pub async fn chunk_ranges(
    backend: &dyn Backend,
    keys: &Keys,
    key: &str,
    offset: u64,
    length: u64,
) -> Result<(Vec<Range<u64>>, u64)> {
    let what = format!("{}/{key}", backend.describe());
    let bad = |why: String| {
        Error::repository(format!(
            "{what}: chunk index of the piece at {offset}: {why}"
        ))
    };
    let end = offset + length;
    // The index of a 1 GiB file is 8 KiB: one read of the tail holds it.
    let tail_len = length.min(16 << 10);
    let tail = backend
        .get_range(key, end - tail_len..end)
        .await?
        .ok_or_else(|| Error::repository(format!("{what} is missing")))?;
    if tail.len() < 4 {
        return Err(bad("too short".into()));
    }
    let l = u32::from_le_bytes(tail[tail.len() - 4..].try_into().expect("4 bytes"));
    let index_start = end - 4 - u64::from(l);
    let mut read = tail_len;
    let env = if u64::from(l) + 4 <= tail_len {
        tail[tail.len() - 4 - l as usize..tail.len() - 4].to_vec()
    } else if index_start >= offset {
        read += u64::from(l);
        backend
            .get_range(key, index_start..end - 4)
            .await?
            .ok_or_else(|| Error::repository(format!("{what} is missing")))?
            .to_vec()
    } else {
        return Err(bad("its length points before the piece".into()));
    };
    let index = codec::decode_bytes(&env, keys, Binding::at(key, index_start))
        .map_err(|e| bad(e.to_string()))?;
    let offsets: Vec<u64> = index
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let mut out = Vec::with_capacity(offsets.len());
    for (i, &o) in offsets.iter().enumerate() {
        let next = offsets.get(i + 1).copied().unwrap_or(index_start - offset);
        if next < o + 4 || offset + next > index_start {
            return Err(bad(format!("chunk {i} out of order")));
        }
        out.push(offset + o + 4..offset + next);
    }
    Ok((out, read))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::codec::Compression;

    #[test]
    fn chunks_decode_in_sequence() {
        let raw: Vec<u8> = (0..(CHUNK_BLOCKS as usize * BLOCK_SIZE * 2 + 5000))
            .map(|i| (i / 7) as u8)
            .collect();
        let (keys, key) = (Keys::none(), "s/backup/L/data/0-0.pgv");
        let mut enc = ChunkedEncoder::new(
            Vec::new(),
            EncodeOptions::default(),
            &keys,
            Binding::object(key),
        );
        for c in raw.chunks(100_000) {
            enc.write_all(c).unwrap();
        }
        let (stored, d) = enc.finish().unwrap();
        assert_eq!(d.size, raw.len() as u64);
        let mut out = Vec::new();
        let got = decode_piece(
            &stored[..],
            &mut out,
            stored.len() as u64,
            raw.len() as u64,
            Some(CHUNK_BLOCKS),
            &keys,
            Binding::object(key),
        )
        .unwrap();
        assert_eq!(out, raw);
        assert_eq!(got.sha256, d.sha256);
        // Cut short: an error, never a short success.
        let cut = &stored[..stored.len() / 2];
        let bind = Binding::object(key);
        let got = decode_piece(
            cut,
            io::sink(),
            0,
            raw.len() as u64,
            Some(CHUNK_BLOCKS),
            &keys,
            bind,
        );
        assert!(got.is_err());
    }

    #[test]
    fn hashing_once_decodes_the_same_and_refuses_a_changed_byte() {
        let raw: Vec<u8> = (0..(3 * chunk_raw(CHUNK_BLOCKS) + 5000))
            .map(|i| (i % 253) as u8)
            .collect();
        let (keys, key) = (Keys::none(), "s/backup/L/data/0-0.pgv");
        let bind = Binding::object(key);
        let mut enc = ChunkedEncoder::new(Vec::new(), EncodeOptions::default(), &keys, bind);
        enc.write_all(&raw).unwrap();
        let (stored, d) = enc.finish().unwrap();
        let shape = (stored.len() as u64, raw.len() as u64, Some(CHUNK_BLOCKS));
        let once = |stored: &[u8], out: &mut Vec<u8>| {
            decode_piece_with(stored, out, shape, &keys, bind, Check::SizeOnly)
        };
        let mut out = Vec::new();
        let got = once(&stored, &mut out).unwrap();
        assert!(out == raw);
        assert_eq!((got.size, got.sha256), (d.size, d.sha256));
        // Stored uncompressed, a byte of the second chunk changed: its
        // envelope's SHA-256 is not computed, but the piece's (which the
        // caller compares with the manifest) differs.
        let opts = EncodeOptions {
            compression: Compression::None,
            ..EncodeOptions::default()
        };
        let mut enc = ChunkedEncoder::new(Vec::new(), opts, &keys, bind);
        enc.write_all(&raw).unwrap();
        let (mut stored, d) = enc.finish().unwrap();
        let at = chunk_raw(CHUNK_BLOCKS) + 100 + 2 * (4 + 16);
        stored[at] ^= 1;
        let shape = (stored.len() as u64, raw.len() as u64, Some(CHUNK_BLOCKS));
        let got = decode_piece_with(&stored[..], io::sink(), shape, &keys, bind, Check::SizeOnly);
        assert!(got.is_ok_and(|g| g.sha256 != d.sha256));
        // decode_piece (verify's) names the chunk's own mismatch.
        let got = decode_piece(
            &stored[..],
            io::sink(),
            shape.0,
            shape.1,
            shape.2,
            &keys,
            bind,
        );
        assert!(matches!(got, Err(CodecError::ChecksumMismatch { .. })));
    }
}
