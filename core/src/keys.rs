//! API key format, generation, hashing and display prefix.
//!
//! A key is `sk-tg-` followed by 43 base62 characters (at least 256 random bits). Only the
//! SHA-256 of the whole key is ever stored; `key_prefix` (first 12 and last 4 characters) is what
//! users see afterwards. Hash comparisons are constant-time.

use rand::{rngs::OsRng, Rng};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const KEY_PREFIX: &str = "sk-tg-";
pub const KEY_BODY_LEN: usize = 43;
pub const KEY_LEN: usize = KEY_PREFIX.len() + KEY_BODY_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// SHA-256 of a whole key, the only form in which keys are stored.
pub type KeyHash = [u8; 32];

/// Generates a new random key. 43 base62 characters carry log2(62) * 43 ≈ 256 bits.
pub fn generate_key() -> String {
    let mut rng = OsRng;
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(KEY_PREFIX);
    for _ in 0..KEY_BODY_LEN {
        key.push(BASE62[rng.gen_range(0..BASE62.len())] as char);
    }
    key
}

/// Whether `s` has the shape of a Tollgate key (prefix, length, alphabet).
pub fn is_well_formed(s: &str) -> bool {
    s.len() == KEY_LEN
        && s.starts_with(KEY_PREFIX)
        && s.as_bytes()[KEY_PREFIX.len()..].iter().all(u8::is_ascii_alphanumeric)
}

pub fn hash_key(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// What a user sees of a key after creation: the first 12 and last 4 characters.
pub fn display_prefix(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 16 {
        return "*".repeat(chars.len());
    }
    let (head, tail): (String, String) = (chars[..12].iter().collect(), chars[chars.len() - 4..].iter().collect());
    format!("{head}...{tail}")
}

/// Constant-time equality of two hashes (or any byte strings of equal length).
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_well_formed_and_distinct() {
        let a = generate_key();
        let b = generate_key();
        assert!(is_well_formed(&a), "{a}");
        assert_eq!(a.len(), 49);
        assert_ne!(a, b);
    }

    #[test]
    fn malformed_keys_are_recognised() {
        assert!(!is_well_formed("sk-tg-short"));
        assert!(!is_well_formed(&format!("sk-xx-{}", "a".repeat(43))));
        assert!(!is_well_formed(&format!("sk-tg-{}!", "a".repeat(42))));
        assert!(is_well_formed(&format!("sk-tg-{}", "a".repeat(43))));
    }

    #[test]
    fn hash_is_sha256_of_the_whole_key() {
        // SHA-256("abc"), a published test vector.
        assert_eq!(hex::encode(hash_key("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn prefix_shows_first_twelve_and_last_four() {
        let key = format!("sk-tg-{}", "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ");
        assert_eq!(display_prefix(&key), "sk-tg-abcdef...NOPQ");
    }

    #[test]
    fn constant_time_compare() {
        let h = hash_key("x");
        assert!(hashes_equal(&h, &hash_key("x")));
        assert!(!hashes_equal(&h, &hash_key("y")));
        assert!(!hashes_equal(&h, &h[..31]));
    }

    proptest::proptest! {
        #[test]
        fn any_string_is_judged_and_shown_without_panicking(s in "\\PC{0,64}") {
            let well_formed = is_well_formed(&s);
            proptest::prop_assert!(!well_formed || s.starts_with(KEY_PREFIX));
            let shown = display_prefix(&s);
            // Never more than the 16 characters it shows of the key itself.
            let revealed = shown.chars().filter(|c| *c != '*' && *c != '.').count();
            proptest::prop_assert!(revealed <= 16);
        }
    }
}
