//! The archive: one tar file per tenant and run, members compressed with
//! zstd, the whole optionally encrypted (ChaCha20-Poly1305 in the STREAM
//! construction, so a large archive is sealed in 64 KiB chunks and any flipped
//! byte, truncation or wrong key is detected). Written atomically: a temporary
//! name, fsync, rename, fsync of the directory.
//!
//! Members: `manifest.json` (last), `catalog.json`, `ddl.sql`,
//! `data/<schema>.<table>.copy.zst` (COPY text format), `audit/log.copy.zst`,
//! `audit/chain.copy.zst`. The manifest lists every member with its size and
//! SHA-256 (of the member as stored) and, for tables, the row count and a
//! checksum of the sorted rows, to compare a restore with.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::aead::KeyInit;
use chacha20poly1305::{ChaCha20Poly1305, Key};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"LVQENC1\n";
const CHUNK: usize = 64 * 1024;

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Manifest {
    pub format: u32,
    pub levqor_version: String,
    pub sidecar_version: String,
    pub postgres_version_num: i32,
    pub tenant_id: String,
    pub slug: String,
    pub isolation: String,
    pub schema: Option<String>,
    pub snapshot_at: String,
    pub created_at: String,
    pub encrypted: bool,
    pub secrets_included: bool,
    pub tables: Vec<TableEntry>,
    pub members: Vec<Member>,
    pub audit_entries: u64,
    pub warning: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct TableEntry {
    pub table: String,
    pub schema: String,
    pub name: String,
    pub tenant_column: Option<String>,
    pub scope_column: Option<String>,
    pub columns: Vec<String>,
    pub file: String,
    pub rows: u64,
    /// SHA-256 of the table's rows sorted (COPY text lines), independent of
    /// their physical order: what a restore must reproduce.
    pub rows_sha256: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Member {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The checksum of a COPY text stream's rows in sorted order, and how many.
pub fn rows_checksum(copy: &[u8]) -> (u64, String) {
    let mut lines: Vec<&[u8]> = copy.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    lines.sort_unstable();
    let mut h = Sha256::new();
    for l in &lines {
        h.update(l);
        h.update(b"\n");
    }
    (lines.len() as u64, hex::encode(h.finalize()))
}

pub fn compress(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).expect("zstd in memory")
}

pub fn decompress(data: &[u8]) -> Result<Vec<u8>, String> {
    zstd::decode_all(data).map_err(|e| format!("not zstd data: {e}"))
}

/// A 32-byte key from the environment: 64 hex digits or base64.
pub fn parse_key(text: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    let t = text.trim();
    let bytes = hex::decode(t)
        .ok()
        .or_else(|| base64::engine::general_purpose::STANDARD.decode(t).ok())
        .ok_or("the backup key is neither hex nor base64")?;
    bytes.try_into().map_err(|_| "the backup key must be 32 bytes (64 hex digits)".to_string())
}

/// Builds an archive in memory member by member, then writes it atomically.
pub struct Writer {
    tar: tar::Builder<Vec<u8>>,
    members: Vec<Member>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer { tar: tar::Builder::new(Vec::new()), members: Vec::new() }
    }

    pub fn add(&mut self, name: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(0);
        header.set_cksum();
        self.tar.append_data(&mut header, name, data).expect("tar in memory");
        self.members.push(Member { name: name.into(), bytes: data.len() as u64, sha256: sha256_hex(data) });
    }

    /// Add the manifest (with every member listed) and finish.
    pub fn finish(mut self, mut manifest: Manifest) -> (Vec<u8>, Manifest) {
        manifest.members = self.members.clone();
        let json = serde_json::to_vec_pretty(&manifest).expect("json");
        let mut header = tar::Header::new_gnu();
        header.set_size(json.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(0);
        header.set_cksum();
        self.tar.append_data(&mut header, "manifest.json", json.as_slice()).expect("tar in memory");
        (self.tar.into_inner().expect("tar in memory"), manifest)
    }
}

pub fn encrypt(plain: &[u8], key: &[u8; 32]) -> Vec<u8> {
    let mut nonce = [0u8; 7];
    getrandom::getrandom(&mut nonce).expect("random nonce");
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let mut enc = EncryptorBE32::from_aead(cipher, (&nonce).into());
    let mut out = Vec::with_capacity(plain.len() + plain.len() / CHUNK * 16 + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&nonce);
    let mut chunks = plain.chunks(CHUNK).peekable();
    if chunks.peek().is_none() {
        out.extend(enc.encrypt_last(&[][..]).expect("encrypt"));
        return out;
    }
    while let Some(c) = chunks.next() {
        if chunks.peek().is_some() {
            out.extend(enc.encrypt_next(c).expect("encrypt"));
        } else {
            out.extend(enc.encrypt_last(c).expect("encrypt"));
            break;
        }
    }
    out
}

pub fn is_encrypted(data: &[u8]) -> bool {
    data.starts_with(MAGIC)
}

pub fn decrypt(data: &[u8], key: &[u8; 32]) -> Result<Vec<u8>, String> {
    if !is_encrypted(data) || data.len() < MAGIC.len() + 7 + 16 {
        return Err("not an encrypted levqor archive".into());
    }
    let nonce: [u8; 7] = data[8..15].try_into().unwrap();
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let mut dec = DecryptorBE32::from_aead(cipher, (&nonce).into());
    let body = &data[15..];
    let sealed = CHUNK + 16;
    let mut out = Vec::with_capacity(body.len());
    let mut chunks = body.chunks(sealed).peekable();
    let fail = || "the archive does not decrypt: wrong key, or it was altered or cut short".to_string();
    while let Some(c) = chunks.next() {
        if chunks.peek().is_some() {
            out.extend(dec.decrypt_next(c).map_err(|_| fail())?);
        } else {
            out.extend(dec.decrypt_last(c).map_err(|_| fail())?);
            return Ok(out);
        }
    }
    Err(fail())
}

/// Write `data` as `dir/name` atomically: never a half-written file under
/// the final name.
pub fn write_atomically(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let target = dir.join(name);
    {
        let mut f = BufWriter::new(File::create(&tmp)?);
        f.write_all(data)?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &target)?;
    File::open(dir)?.sync_all()?;
    Ok(target)
}

/// An archive read back: its members by name, and the manifest.
pub struct Opened {
    pub manifest: Manifest,
    pub members: std::collections::BTreeMap<String, Vec<u8>>,
}

/// Open and check an archive: decrypt (with `key` when it is encrypted),
/// parse the tar, and check every member against the manifest, every
/// table's row count and rows checksum. Nothing is written anywhere.
pub fn open(path: &Path, key: Option<&[u8; 32]>) -> Result<Opened, String> {
    let mut raw = Vec::new();
    BufReader::new(File::open(path).map_err(|e| format!("{}: {e}", path.display()))?)
        .read_to_end(&mut raw)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let plain = if is_encrypted(&raw) {
        let key = key.ok_or("the archive is encrypted: give the configuration with [backup] encryption_key_env")?;
        decrypt(&raw, key)?
    } else {
        raw
    };
    let mut members = std::collections::BTreeMap::new();
    let mut ar = tar::Archive::new(plain.as_slice());
    for entry in ar.entries().map_err(|e| format!("not a levqor archive: {e}"))? {
        let mut entry = entry.map_err(|e| format!("the archive is damaged: {e}"))?;
        let name = entry.path().map_err(|e| format!("the archive is damaged: {e}"))?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(|e| format!("the archive is damaged (truncated?): {e}"))?;
        members.insert(name, data);
    }
    let manifest: Manifest = serde_json::from_slice(members.get("manifest.json").ok_or("no manifest: not a complete levqor archive")?)
        .map_err(|e| format!("the manifest is damaged: {e}"))?;
    if manifest.format > FORMAT {
        return Err(format!("archive format {} is newer than this sidecar reads ({FORMAT})", manifest.format));
    }
    for m in &manifest.members {
        let data = members.get(&m.name).ok_or_else(|| format!("member {} is missing", m.name))?;
        if data.len() as u64 != m.bytes || sha256_hex(data) != m.sha256 {
            return Err(format!("member {} does not match its checksum: the archive is corrupt", m.name));
        }
    }
    for t in &manifest.tables {
        let data = decompress(members.get(&t.file).ok_or_else(|| format!("the data of {} is missing", t.table))?)?;
        let (rows, sum) = rows_checksum(&data);
        if rows != t.rows || sum != t.rows_sha256 {
            return Err(format!("the rows of {} do not match the manifest", t.table));
        }
    }
    Ok(Opened { manifest, members })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encryption_round_trips_and_detects_tampering() {
        let key = [7u8; 32];
        for size in [0, 10, CHUNK, CHUNK + 1, 3 * CHUNK + 5] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let sealed = encrypt(&data, &key);
            assert_eq!(decrypt(&sealed, &key).unwrap(), data, "{size}");
            assert!(decrypt(&sealed, &[8u8; 32]).is_err(), "wrong key, {size}");
            let mut flipped = sealed.clone();
            let at = flipped.len() - 3;
            flipped[at] ^= 1;
            assert!(decrypt(&flipped, &key).is_err(), "flipped byte, {size}");
            if sealed.len() > 40 {
                assert!(decrypt(&sealed[..sealed.len() - 20], &key).is_err(), "truncated, {size}");
            }
        }
        assert!(parse_key(&"ab".repeat(32)).is_ok());
        assert!(parse_key("short").is_err());
    }

    #[test]
    fn the_rows_checksum_ignores_order() {
        assert_eq!(rows_checksum(b"b\na\n"), rows_checksum(b"a\nb\n"));
        assert_ne!(rows_checksum(b"a\nb\n").1, rows_checksum(b"a\nc\n").1);
        assert_eq!(rows_checksum(b"").0, 0);
    }
}
