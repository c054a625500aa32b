//! Client-side encryption: the construction and the key hierarchy
//! (docs/encryption.md).
//!
//! - The **construction** is RustCrypto's STREAM (`aead::stream`, the
//!   online AEAD of Hoang, Reyhanitabar, Rogaway and Vizár) over
//!   XChaCha20-Poly1305, in segments of 64 KiB of plaintext: memory is one
//!   segment whatever the object's size; each segment is authenticated, its
//!   position is in its nonce and the last one is flagged, so a reordered,
//!   altered or truncated object fails to decrypt.
//! - A **master key** (the key-encryption key, KEK) comes from the user:
//!   `repo-cipher-key-file`, `PGVAULT_REPO_CIPHER_KEY` or the output of
//!   `repo-cipher-key-command`. Its id and its wrapping key are derived from
//!   it with HKDF-SHA-256; the key itself is never stored.
//! - **Data keys** (random, 256 bits) are stored only wrapped by master
//!   keys, in the stanza's small key objects (`repo::keys`); an object's
//!   header names the data key it was sealed with. Rotating master keys
//!   re-wraps the key objects and never touches data.
//! - Every **object** gets its own key and nonce prefix, derived with
//!   HKDF-SHA-256 from the data key and a random 24-byte salt stored in the
//!   object's header. The object's key in the repository (and its offset in
//!   a bundle) and its whole header are associated data of every segment:
//!   an object moved under another name fails, whatever its size.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::Arc;

use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

/// The `encryption` byte of an object's header for this construction.
pub const XCHACHA20POLY1305_STREAM: u8 = 1;
/// How `repo-cipher-type` names it.
pub const CIPHER_NAME: &str = "xchacha20-poly1305";
/// Plaintext bytes per STREAM segment.
pub const SEGMENT: usize = 64 * 1024;
const TAG: usize = 16;
/// One sealed segment and one byte more: what tells a middle segment from
/// the last.
const READ_AHEAD: usize = SEGMENT + TAG + 1;
/// Data key id (8) and salt (24), after the codec's 16-byte header.
pub const SEAL_HEADER_LEN: usize = 8 + SALT_LEN;
const SALT_LEN: usize = 24;
/// STREAM's BE32 nonce: the AEAD's 24 bytes less a 4-byte counter and a
/// last-segment flag.
const NONCE_PREFIX_LEN: usize = 19;
/// A master key shorter than this is refused: it is used as key material
/// directly (HKDF), not stretched as a password would have to be.
pub const MIN_MASTER_KEY_LEN: usize = 32;

/// 8 bytes naming a master key or a data key, shown as 16 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Option<KeyId> {
        let mut out = [0u8; 8];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(KeyId(out))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}

/// What is wrong with a key the user gave.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the key from {0} is empty")]
    Empty(String),
    #[error("the key from {from} is {len} bytes: at least {MIN_MASTER_KEY_LEN} are needed")]
    TooShort { from: String, len: usize },
}

/// A key-encryption key, as the user gave it. Never printed, never stored.
pub struct MasterKey {
    secret: Zeroizing<Vec<u8>>,
    id: KeyId,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({}, …)", self.id)
    }
}

fn hkdf_expand(ikm: &[u8], salt: Option<&[u8]>, info: &[u8], out: &mut [u8]) {
    Hkdf::<Sha256>::new(salt, ikm)
        .expand(info, out)
        .expect("HKDF-SHA-256 output of at most 255 × 32 bytes");
}

impl MasterKey {
    /// The key in `raw` (from `source`, named in errors): one line, its
    /// trailing end of line ignored (`echo` and most editors add one).
    pub fn from_bytes(raw: Vec<u8>, source: &str) -> Result<MasterKey, KeyError> {
        let mut raw = Zeroizing::new(raw);
        while raw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            raw.pop();
        }
        if raw.is_empty() {
            return Err(KeyError::Empty(source.to_string()));
        }
        if raw.len() < MIN_MASTER_KEY_LEN {
            return Err(KeyError::TooShort {
                from: source.to_string(),
                len: raw.len(),
            });
        }
        let mut id = [0u8; 8];
        hkdf_expand(&raw, None, b"pgvault master key id v1", &mut id);
        Ok(MasterKey {
            secret: raw,
            id: KeyId(id),
        })
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    fn wrapping_cipher(&self) -> XChaCha20Poly1305 {
        let mut k = Zeroizing::new([0u8; 32]);
        hkdf_expand(&self.secret, None, b"pgvault master key wrap v1", &mut *k);
        XChaCha20Poly1305::new((&*k).into())
    }

    /// Wraps `dk` under this key: (nonce, ciphertext). The data key's and
    /// this key's ids are associated data, so a wrapped key cannot be
    /// passed off as another one.
    pub fn wrap(&self, dk: &DataKey) -> ([u8; 24], Vec<u8>) {
        let mut nonce = [0u8; 24];
        fill_random(&mut nonce);
        let aad = wrap_aad(dk.id, self.id);
        let ct = self
            .wrapping_cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &dk.key[..],
                    aad: &aad,
                },
            )
            .expect("XChaCha20-Poly1305 encrypts a 32-byte message");
        (nonce, ct)
    }

    /// The data key `id` from its wrapped form; `None` when this key did
    /// not wrap it (or the wrapped bytes were altered).
    pub fn unwrap(&self, id: KeyId, nonce: &[u8; 24], wrapped: &[u8]) -> Option<DataKey> {
        let aad = wrap_aad(id, self.id);
        let pt = Zeroizing::new(
            self.wrapping_cipher()
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: wrapped,
                        aad: &aad,
                    },
                )
                .ok()?,
        );
        let key: [u8; 32] = pt.as_slice().try_into().ok()?;
        Some(DataKey {
            id,
            key: Zeroizing::new(key),
        })
    }
}

fn wrap_aad(data: KeyId, master: KeyId) -> Vec<u8> {
    let mut aad = b"pgvault data key v1\0".to_vec();
    aad.extend_from_slice(&data.0);
    aad.extend_from_slice(&master.0);
    aad
}

pub fn fill_random(out: &mut [u8]) {
    use chacha20poly1305::aead::rand_core::RngCore;
    chacha20poly1305::aead::OsRng.fill_bytes(out);
}

/// A data key: what objects are sealed with. Never printed, never stored
/// unwrapped.
pub struct DataKey {
    id: KeyId,
    key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKey({}, …)", self.id)
    }
}

impl DataKey {
    pub fn generate() -> DataKey {
        let mut key = Zeroizing::new([0u8; 32]);
        fill_random(&mut *key);
        let mut id = [0u8; 8];
        fill_random(&mut id);
        DataKey { id: KeyId(id), key }
    }
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The object key and STREAM nonce prefix for one object's `salt`.
    fn object_cipher(&self, salt: &[u8]) -> (XChaCha20Poly1305, [u8; NONCE_PREFIX_LEN]) {
        let mut okm = Zeroizing::new([0u8; 32 + NONCE_PREFIX_LEN]);
        hkdf_expand(&*self.key, Some(salt), b"pgvault object v1", &mut *okm);
        let cipher = XChaCha20Poly1305::new(okm[..32].into());
        let mut prefix = [0u8; NONCE_PREFIX_LEN];
        prefix.copy_from_slice(&okm[32..]);
        (cipher, prefix)
    }
}

/// The data keys a master key unlocked, and the one new objects are sealed
/// with.
#[derive(Debug)]
pub struct Keyring {
    master: KeyId,
    data: Vec<DataKey>,
}

impl Keyring {
    pub fn new(master: KeyId, data: Vec<DataKey>) -> Option<Keyring> {
        (!data.is_empty()).then_some(Keyring { master, data })
    }
    pub fn master(&self) -> KeyId {
        self.master
    }
    pub fn data_keys(&self) -> &[DataKey] {
        &self.data
    }
    /// The newest data key: new objects are sealed with it.
    fn current(&self) -> &DataKey {
        self.data.last().expect("a keyring holds a data key")
    }
    fn find(&self, id: KeyId) -> Option<&DataKey> {
        self.data.iter().find(|k| k.id == id)
    }
}

/// What a process seals and opens objects with: nothing (plaintext; an
/// encrypted object cannot be read), or a keyring.
#[derive(Debug, Clone, Default)]
pub struct Keys(Option<Arc<Keyring>>);

impl Keys {
    pub fn none() -> Keys {
        Keys(None)
    }
    pub fn with(ring: Keyring) -> Keys {
        Keys(Some(Arc::new(ring)))
    }
    pub fn keyring(&self) -> Option<&Keyring> {
        self.0.as_deref()
    }
    pub fn encrypts(&self) -> bool {
        self.0.is_some()
    }
}

/// What an object is bound to: its key in the repository and, for a file
/// bundled in a larger object, its offset there. Both are associated data
/// of every segment.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub key: &'a str,
    pub offset: u64,
}

impl<'a> Binding<'a> {
    pub fn object(key: &'a str) -> Self {
        Binding { key, offset: 0 }
    }
    pub fn at(key: &'a str, offset: u64) -> Self {
        Binding { key, offset }
    }
}

fn associated_data(header: &[u8], seal: &[u8], bind: Binding<'_>) -> Vec<u8> {
    let mut aad = Vec::with_capacity(32 + header.len() + seal.len() + bind.key.len());
    aad.extend_from_slice(b"pgvault object v1\0");
    aad.extend_from_slice(header);
    aad.extend_from_slice(seal);
    aad.extend_from_slice(&bind.offset.to_le_bytes());
    aad.extend_from_slice(bind.key.as_bytes());
    aad
}

/// Why an object could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("encrypted, and no key is configured (repo-cipher-type = none)")]
    NoKey,
    #[error("encrypted with data key {0}, which the configured key does not unlock")]
    UnknownDataKey(KeyId),
    #[error(
        "corrupt object: decryption failed (altered, truncated, or stored under another name)"
    )]
    Failed,
}

impl OpenError {
    /// A key problem rather than damage to the object.
    pub fn is_key_problem(&self) -> bool {
        !matches!(self, OpenError::Failed)
    }
    pub fn hint(&self) -> &'static str {
        match self {
            OpenError::NoKey => "set repo-cipher-type and repo-cipher-key-file (or PGVAULT_REPO_CIPHER_KEY, or repo-cipher-key-command) to the repository's key",
            OpenError::UnknownDataKey(_) => "the repository was sealed under a key this one cannot unwrap: use a key `pgvault key list` shows",
            OpenError::Failed => "run `pgvault verify`; if every object fails, the key object or the configured key is not this repository's",
        }
    }
}

/// An `io::Error` carrying an [`OpenError`], so that it passes readers
/// and decompressors unchanged and the codec can tell it from a transfer
/// failure.
pub fn open_error(e: OpenError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

pub fn as_open_error(e: &io::Error) -> Option<&OpenError> {
    e.get_ref().and_then(|i| i.downcast_ref::<OpenError>())
}

/// Starts sealing an object: the bytes that follow the codec's header
/// (data key id and salt) and the writer of the ciphertext.
pub fn seal<W: Write>(
    ring: &Keyring,
    header: &[u8],
    bind: Binding<'_>,
    out: W,
) -> ([u8; SEAL_HEADER_LEN], SealWriter<W>) {
    let dk = ring.current();
    let mut seal = [0u8; SEAL_HEADER_LEN];
    seal[..8].copy_from_slice(&dk.id.0);
    fill_random(&mut seal[8..]);
    let (cipher, prefix) = dk.object_cipher(&seal[8..]);
    let writer = SealWriter {
        inner: out,
        stream: Some(EncryptorBE32::from_aead(cipher, (&prefix).into())),
        aad: associated_data(header, &seal, bind),
        buf: Vec::with_capacity(SEGMENT + TAG),
    };
    (seal, writer)
}

/// Starts opening an object whose header is `header` followed by `seal`;
/// `size_hint` (the object's size, when known) keeps the buffer of a small
/// one small: restoring many small files must not allocate a segment each.
pub fn open<R: Read>(
    keys: &Keys,
    header: &[u8],
    seal: &[u8; SEAL_HEADER_LEN],
    bind: Binding<'_>,
    input: R,
    size_hint: usize,
) -> Result<OpenReader<R>, OpenError> {
    let ring = keys.keyring().ok_or(OpenError::NoKey)?;
    let id = KeyId(seal[..8].try_into().expect("8 bytes"));
    let dk = ring.find(id).ok_or(OpenError::UnknownDataKey(id))?;
    let (cipher, prefix) = dk.object_cipher(&seal[8..]);
    Ok(OpenReader {
        inner: input,
        stream: Some(DecryptorBE32::from_aead(cipher, (&prefix).into())),
        aad: associated_data(header, seal, bind),
        ct: vec![0u8; size_hint.saturating_add(1).min(READ_AHEAD)],
        have: 0,
        pt: Vec::new(),
        pos: 0,
    })
}

/// Encrypts what is written to it, one segment at a time; [`SealWriter::finish`]
/// seals the last segment.
pub struct SealWriter<W: Write> {
    inner: W,
    stream: Option<EncryptorBE32<XChaCha20Poly1305>>,
    aad: Vec<u8>,
    /// Plaintext of the current segment; a full one is sealed only when
    /// more bytes follow (the last segment is flagged as such).
    buf: Vec<u8>,
}

impl<W: Write> SealWriter<W> {
    fn seal_full(&mut self) -> io::Result<()> {
        let stream = self.stream.as_mut().expect("not finished");
        stream
            .encrypt_next_in_place(&self.aad, &mut self.buf)
            .map_err(|_| io::Error::other("encrypt a segment: STREAM counter exhausted"))?;
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<W> {
        let stream = self.stream.take().expect("finished once");
        stream
            .encrypt_last_in_place(&self.aad, &mut self.buf)
            .map_err(|_| io::Error::other("encrypt the last segment"))?;
        self.inner.write_all(&self.buf)?;
        Ok(self.inner)
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for SealWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        if self.buf.len() == SEGMENT {
            self.seal_full()?;
        }
        let n = data.len().min(SEGMENT - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Decrypts and authenticates an object's segments as they are read;
/// nothing of a segment is handed on before its tag was checked.
pub struct OpenReader<R: Read> {
    inner: R,
    stream: Option<DecryptorBE32<XChaCha20Poly1305>>,
    aad: Vec<u8>,
    /// Ciphertext read ahead: one whole segment and one more byte tell a
    /// middle segment from the last.
    ct: Vec<u8>,
    have: usize,
    pt: Vec<u8>,
    pos: usize,
}

impl<R: Read> OpenReader<R> {
    /// Reads the next segment into `pt`; `false` once the last was read.
    fn next_segment(&mut self) -> io::Result<bool> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(false);
        };
        while self.have < READ_AHEAD {
            if self.have == self.ct.len() {
                // Larger than the hint said.
                self.ct.resize(READ_AHEAD, 0);
            }
            match self.inner.read(&mut self.ct[self.have..]) {
                Ok(0) => break,
                Ok(n) => self.have += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.pt.clear();
        self.pos = 0;
        if self.have == READ_AHEAD {
            let seg = SEGMENT + TAG;
            self.pt.extend_from_slice(&self.ct[..seg]);
            stream
                .decrypt_next_in_place(&self.aad, &mut self.pt)
                .map_err(|_| open_error(OpenError::Failed))?;
            self.ct.copy_within(seg..self.have, 0);
            self.have -= seg;
        } else {
            if self.have < TAG {
                return Err(open_error(OpenError::Failed));
            }
            self.pt.extend_from_slice(&self.ct[..self.have]);
            self.have = 0;
            let stream = self.stream.take().expect("checked above");
            stream
                .decrypt_last_in_place(&self.aad, &mut self.pt)
                .map_err(|_| open_error(OpenError::Failed))?;
        }
        Ok(true)
    }
}

impl<R: Read> Read for OpenReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.pt.len() {
            if !self.next_segment()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.pt.len() - self.pos);
        out[..n].copy_from_slice(&self.pt[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn test_keys() -> Keys {
        let mk = MasterKey::from_bytes(vec![7u8; 32], "test").unwrap();
        Keys::with(Keyring::new(mk.id(), vec![DataKey::generate()]).unwrap())
    }

    fn seal_all(keys: &Keys, data: &[u8], bind: Binding<'_>) -> ([u8; SEAL_HEADER_LEN], Vec<u8>) {
        let (hdr, mut w) = seal(keys.keyring().unwrap(), b"H", bind, Vec::new());
        for chunk in data.chunks(1000) {
            w.write_all(chunk).unwrap();
        }
        (hdr, w.finish().unwrap())
    }

    fn open_all(
        keys: &Keys,
        hdr: &[u8; SEAL_HEADER_LEN],
        ct: &[u8],
        bind: Binding<'_>,
    ) -> io::Result<Vec<u8>> {
        // A small hint: the buffer grows as the object turns out larger.
        let mut r = open(keys, b"H", hdr, bind, ct, 10).map_err(open_error)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_segment_edges() {
        let keys = test_keys();
        for len in [
            0,
            1,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            3 * SEGMENT,
            3 * SEGMENT + 5,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let (hdr, ct) = seal_all(&keys, &data, Binding::object("k"));
            assert_eq!(ct.len(), len + TAG * len.div_ceil(SEGMENT).max(1));
            assert_eq!(
                open_all(&keys, &hdr, &ct, Binding::object("k")).unwrap(),
                data
            );
        }
    }

    #[test]
    fn truncation_reordering_and_other_names_fail() {
        let keys = test_keys();
        let data = vec![42u8; 3 * SEGMENT + 10];
        let (hdr, ct) = seal_all(&keys, &data, Binding::at("k", 5));
        let fails = |ct: &[u8], bind| {
            let e = open_all(&keys, &hdr, ct, bind).unwrap_err();
            assert_eq!(as_open_error(&e), Some(&OpenError::Failed));
        };
        // Cut at a segment boundary: the last segment read was not sealed as last.
        fails(&ct[..2 * (SEGMENT + TAG)], Binding::at("k", 5));
        fails(&ct[..ct.len() - 1], Binding::at("k", 5));
        fails(&ct, Binding::at("other", 5));
        fails(&ct, Binding::at("k", 6));
        let mut swapped = ct.clone();
        let seg = SEGMENT + TAG;
        let (a, b) = swapped.split_at_mut(seg);
        a.swap_with_slice(&mut b[..seg]);
        fails(&swapped, Binding::at("k", 5));
        let mut flipped = ct.clone();
        flipped[SEGMENT + 100] ^= 1;
        fails(&flipped, Binding::at("k", 5));
        // Another keyring does not hold the data key.
        let e = open(&test_keys(), b"H", &hdr, Binding::at("k", 5), &ct[..], 0).err();
        assert!(matches!(e, Some(OpenError::UnknownDataKey(_))));
        assert!(matches!(
            open(&Keys::none(), b"H", &hdr, Binding::at("k", 5), &ct[..], 0).err(),
            Some(OpenError::NoKey)
        ));
    }

    #[test]
    fn wrapping_needs_the_same_master_key() {
        let a = MasterKey::from_bytes(b"a-key-that-is-long-enough-for-pgvault\n".to_vec(), "a")
            .unwrap();
        let b =
            MasterKey::from_bytes(b"b-key-that-is-long-enough-for-pgvault".to_vec(), "b").unwrap();
        assert_ne!(a.id(), b.id());
        let dk = DataKey::generate();
        let (nonce, wrapped) = a.wrap(&dk);
        let back = a.unwrap(dk.id(), &nonce, &wrapped).unwrap();
        assert_eq!(*back.key, *dk.key);
        assert!(b.unwrap(dk.id(), &nonce, &wrapped).is_none());
        assert!(a.unwrap(KeyId([0; 8]), &nonce, &wrapped).is_none());
        assert!(MasterKey::from_bytes(b"short".to_vec(), "f").is_err());
        assert!(!format!("{a:?} {dk:?}").contains("long-enough"));
    }
}
