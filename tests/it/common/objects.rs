//! The object envelope (docs/repository-format.md), written independently of
//! the crate: 16-byte header, payload (raw or one zstd frame), 48-byte trailer
//! (original size u64 LE, SHA-256, "PGVEND\0\0").

use sha2::{Digest, Sha256};

/// The original bytes of an object, or what is wrong with it.
pub fn try_decode_envelope(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if bytes.len() < 64 || &bytes[..8] != b"PGVAULT\0" {
        return Err("not a pgvault object".into());
    }
    let (payload, trailer) = bytes[16..].split_at(bytes.len() - 16 - 48);
    if &trailer[40..] != b"PGVEND\0\0" {
        return Err("trailer magic".into());
    }
    let data = match bytes[10] {
        0 => payload.to_vec(),
        1 => zstd::decode_all(payload).map_err(|e| format!("zstd payload: {e}"))?,
        c => return Err(format!("unknown compression {c}")),
    };
    let size = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
    if size != data.len() as u64 {
        return Err("trailer size".into());
    }
    if &trailer[8..40] != Sha256::digest(&data).as_slice() {
        return Err("trailer checksum".into());
    }
    Ok(data)
}

/// The original bytes of an object; panics naming what is wrong.
#[track_caller]
pub fn decode_envelope(bytes: &[u8]) -> Vec<u8> {
    try_decode_envelope(bytes).unwrap_or_else(|e| panic!("{e}"))
}

/// The file entries of the backup in directory `dir`, written
/// independently of the crate: manifest format 2 keeps them in `files.pgv`
/// (one JSON object a line), format 1 inline in the manifest (`files`).
pub fn backup_files(dir: &std::path::Path) -> Result<Vec<serde_json::Value>, String> {
    let read = |name: &str| -> Result<Vec<u8>, String> {
        let bytes = std::fs::read(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
        try_decode_envelope(&bytes).map_err(|e| format!("{name}: {e}"))
    };
    let m: serde_json::Value =
        serde_json::from_slice(&read("manifest.pgv")?).map_err(|e| e.to_string())?;
    if m.get("file_list").is_none() {
        return Ok(m["files"].as_array().cloned().unwrap_or_default());
    }
    String::from_utf8(read("files.pgv")?)
        .map_err(|e| format!("files.pgv: {e}"))?
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| format!("files.pgv: {e}")))
        .collect()
}

/// Encode `data` with the header of `like` (same format version and
/// compression).
pub fn encode_envelope(like: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = like[..16].to_vec();
    match like[10] {
        0 => out.extend_from_slice(data),
        1 => out.extend(zstd::encode_all(data, 3).expect("zstd")),
        c => panic!("unknown compression {c}"),
    }
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(Sha256::digest(data).as_slice());
    out.extend_from_slice(b"PGVEND\0\0");
    out
}
