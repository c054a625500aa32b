//! A large file written from a thread of its own: the worker decodes and
//! hashes the next megabyte while the last one is copied into the page
//! cache (and its writeback started). Without it, a restore of pgbench
//! data did everything for its largest relation file — a third of a
//! backup, or more — in one thread, one step after the other, while the
//! other CPU waited: `perf stat` showed 0.35 CPUs utilised (issue 14).
//!
//! The bytes and their order are those of a plain buffered write; only
//! who calls `write` changes. Durability is still the final `syncfs`'s.

use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use super::durable::StartWriteback;

/// Bytes handed to the writer thread at once.
const BUF_LEN: usize = 1 << 20;
/// Buffers waiting for the writer thread: with the one it writes and the
/// one being filled, at most four per large file being restored.
const QUEUED: usize = 2;

/// Files at least this large are written through a [`Piped`] writer;
/// smaller ones are not worth a thread.
pub(super) const PIPED_MIN_FILE: u64 = 8 << 20;

/// Writes what it is given, in order, from a thread of its own.
pub(super) struct Piped {
    tx: Option<SyncSender<Vec<u8>>>,
    /// Buffers the writer thread is done with, to fill again.
    back: Receiver<Vec<u8>>,
    buf: Vec<u8>,
    writer: Option<JoinHandle<io::Result<StartWriteback>>>,
}

impl Piped {
    pub(super) fn new(file: StartWriteback) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUED);
        let (back_tx, back) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("restore-write".into())
            .spawn(move || -> io::Result<StartWriteback> {
                let mut file = file;
                for mut b in rx {
                    file.write_all(&b)?;
                    b.clear();
                    // The worker may have finished: the buffer is then freed.
                    let _ = back_tx.send(b);
                }
                Ok(file)
            })?;
        Ok(Piped {
            tx: Some(tx),
            back,
            buf: Vec::with_capacity(BUF_LEN),
            writer: Some(writer),
        })
    }

    /// Hands the filled buffer to the writer thread; its error, if it
    /// stopped.
    fn hand_over(&mut self) -> io::Result<()> {
        let next = self
            .back
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BUF_LEN));
        let full = std::mem::replace(&mut self.buf, next);
        let sent = match &self.tx {
            Some(tx) => tx.send(full).is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The thread stopped at a failed write: its error.
            self.join().map(|_| ())
        }
    }

    fn join(&mut self) -> io::Result<StartWriteback> {
        self.tx = None;
        match self.writer.take() {
            Some(w) => w
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the restore's writer thread panicked"))),
            None => Err(io::Error::other("the restore's writer thread is gone")),
        }
    }

    /// Writes what is left and returns the file, once every byte given
    /// was written (or the first error).
    pub(super) fn finish(mut self) -> io::Result<StartWriteback> {
        if !self.buf.is_empty() {
            self.hand_over()?;
        }
        self.join()
    }
}

impl Write for Piped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(BUF_LEN - self.buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        if self.buf.len() == BUF_LEN {
            self.hand_over()?;
        }
        Ok(n)
    }

    /// Nothing: the bytes reach the file in [`Piped::finish`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Piped {
    /// Dropped unfinished (a decode error): stop the thread, let it end.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn writes_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let mut p = Piped::new(StartWriteback::new(file)).unwrap();
        let data: Vec<u8> = (0..(3 * BUF_LEN + 12_345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        for c in data.chunks(100_003) {
            p.write_all(c).unwrap();
        }
        drop(p.finish().unwrap().finish());
        let mut got = Vec::new();
        std::fs::File::open(&path)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert!(got == data, "the file differs from what was written");
    }
}
