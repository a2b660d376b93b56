//! Tenant API keys: `lvq_<key id>_<secret>`.
//!
//! The key id (16 hex digits) is public and finds the row; the whole key's
//! SHA-256 is what is stored and compared, in constant time. 256 bits of
//! secret from the operating system's CSPRNG, so no key can be guessed and a
//! stolen hash cannot be turned back into a key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use pgrx::prelude::*;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const PREFIX: &str = "lvq_";
const ID_LEN: usize = 16;
const SECRET_BYTES: usize = 32;
const SECRET_LEN: usize = 43; // base64url, no padding, of 32 bytes

pub struct NewKey {
    pub key_id: String,
    pub api_key: String,
    pub hash: [u8; 32],
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    if getrandom::getrandom(&mut buf).is_err() {
        crate::errors::raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "could not read random bytes from the operating system",
            None,
        );
    }
    buf
}

pub fn hash(api_key: &str) -> [u8; 32] {
    Sha256::digest(api_key.as_bytes()).into()
}

pub fn generate() -> NewKey {
    let id: [u8; ID_LEN / 2] = random_bytes();
    let secret: [u8; SECRET_BYTES] = random_bytes();
    let key_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let api_key = format!("{PREFIX}{key_id}_{}", URL_SAFE_NO_PAD.encode(secret));
    let hash = hash(&api_key);
    NewKey { key_id, api_key, hash }
}

/// The key id of a well-formed key, or None for anything else. Only shape is
/// checked here; nothing is looked up.
pub fn key_id(api_key: &str) -> Option<&str> {
    let rest = api_key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = id.len() == ID_LEN && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let secret_ok = secret.len() == SECRET_LEN
        && secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && secret_ok).then_some(id)
}

pub fn matches(api_key: &str, stored_hash: &[u8]) -> bool {
    stored_hash.len() == 32 && bool::from(hash(api_key).ct_eq(stored_hash))
}

/// Fresh key material for create_tenant / issue_key. Returns the key once;
/// only the hash is ever stored.
#[pg_extern(volatile, parallel_unsafe, name = "_new_api_key")]
fn new_api_key() -> TableIterator<
    'static,
    (name!(key_id, String), name!(api_key, String), name!(key_hash, Vec<u8>)),
> {
    let k = generate();
    TableIterator::once((k.key_id, k.api_key, k.hash.to_vec()))
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn generated_keys_parse_and_match() {
        let k = generate();
        assert_eq!(key_id(&k.api_key), Some(k.key_id.as_str()));
        assert!(matches(&k.api_key, &k.hash));
        let mut other = k.api_key.clone();
        other.pop();
        other.push(if k.api_key.ends_with('A') { 'B' } else { 'A' });
        assert!(!matches(&other, &k.hash));
        assert_ne!(generate().api_key, k.api_key);
    }

    #[pg_test]
    fn malformed_keys_have_no_id() {
        for bad in [
            "",
            "lvq_",
            "lvq__",
            "not-a-key",
            "lvq_0123456789abcdeg_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "lvq_0123456789abcdef_AAAA",
            "lvq_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA'",
            "LVQ_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(key_id(bad), None, "{bad}");
        }
        assert_eq!(
            key_id("lvq_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            Some("0123456789abcdef")
        );
    }
}
