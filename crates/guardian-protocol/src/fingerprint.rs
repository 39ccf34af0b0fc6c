//! The change fingerprint a feed reader sends with its cursor
//! (`since_fingerprint`), so a server can tell whether its change at that
//! cursor is the one the reader holds. A server restored from a backup
//! that then took new writes hands out the reader's cursors again for
//! other changes; without this the reader would resume after them.
//!
//! Wire format, computed identically by client and server from the
//! change's `type`, `id` and `version`: SHA-256 over
//! `u64be(len(type)) type u64be(len(id)) id u64be(version)` (lengths in
//! bytes of the UTF-8 text), of which the first 8 bytes are written as 16
//! lower-case hex digits. The length prefixes keep two different changes
//! from encoding to the same bytes whatever their text holds.

use sha2::{Digest, Sha256};

use crate::Change;

/// The query parameter of `GET /v1/changes` and `GET /v1/realtime` that
/// carries the fingerprint of the change the reader holds at `since`.
pub const SINCE_FINGERPRINT_PARAM: &str = "since_fingerprint";

/// Length of a fingerprint on the wire, in characters.
pub const CHANGE_FINGERPRINT_LEN: usize = 16;

/// A short fingerprint of one change of the feed (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChangeFingerprint([u8; CHANGE_FINGERPRINT_LEN / 2]);

/// Why a fingerprint's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FingerprintError {
    /// Not exactly 16 lower-case hex digits.
    #[error(
        "a change fingerprint is exactly {CHANGE_FINGERPRINT_LEN} lower-case hex digits, got {0}"
    )]
    Malformed(String),
}

impl ChangeFingerprint {
    /// The fingerprint of the change of `entity_type`/`id` at `version`.
    pub fn of(entity_type: &str, id: &str, version: u64) -> Self {
        let mut h = Sha256::new();
        for text in [entity_type, id] {
            h.update((text.len() as u64).to_be_bytes());
            h.update(text.as_bytes());
        }
        h.update(version.to_be_bytes());
        let digest = h.finalize();
        let mut out = [0u8; CHANGE_FINGERPRINT_LEN / 2];
        out.copy_from_slice(&digest[..CHANGE_FINGERPRINT_LEN / 2]);
        Self(out)
    }

    /// The fingerprint of `change`.
    pub fn of_change(change: &Change) -> Self {
        Self::of(&change.entity_type, &change.id, change.version)
    }

    /// Reads the wire form: exactly 16 lower-case hex digits.
    pub fn parse(text: &str) -> Result<Self, FingerprintError> {
        let bytes = text.as_bytes();
        let malformed = || {
            // Bounded: the text may be anything a client sent.
            let shown: String = text.chars().take(CHANGE_FINGERPRINT_LEN + 4).collect();
            let more = if shown.len() < text.len() { "…" } else { "" };
            FingerprintError::Malformed(format!("{shown:?}{more}"))
        };
        if bytes.len() != CHANGE_FINGERPRINT_LEN {
            return Err(malformed());
        }
        let mut out = [0u8; CHANGE_FINGERPRINT_LEN / 2];
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let (Some(hi), Some(lo)) = (hex_digit(pair[0]), hex_digit(pair[1])) else {
                return Err(malformed());
            };
            *o = (hi << 4) | lo;
        }
        Ok(Self(out))
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

impl std::fmt::Display for ChangeFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ChangeFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChangeFingerprint({self})")
    }
}

impl std::str::FromStr for ChangeFingerprint {
    type Err = FingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire form is pinned: client and server of different builds must
    /// agree on it, so a change here is a protocol change.
    #[test]
    fn the_wire_form_is_stable() {
        let fp = ChangeFingerprint::of("note", "n1", 3);
        let text = fp.to_string();
        // Computed independently: Python hashlib over the same bytes.
        assert_eq!(text, "7d764b93f01d354f");
        assert_eq!(ChangeFingerprint::parse(&text), Ok(fp));
    }

    #[test]
    fn every_field_counts_and_lengths_separate_them() {
        let base = ChangeFingerprint::of("note", "n1", 3);
        assert_ne!(base, ChangeFingerprint::of("note", "n1", 4));
        assert_ne!(base, ChangeFingerprint::of("note", "n2", 3));
        assert_ne!(base, ChangeFingerprint::of("notes", "n1", 3));
        assert_ne!(
            ChangeFingerprint::of("ab", "c", 1),
            ChangeFingerprint::of("a", "bc", 1)
        );
    }

    #[test]
    fn malformed_text_is_refused_without_echoing_it_whole() {
        for bad in [
            "",
            "ec6a3ed1bf56b8c",
            "ec6a3ed1bf56b8cb0",
            "EC6A3ED1BF56B8CB",
            "ec6a3ed1bf56b8cg",
            "ec6a3ed1bf56b8c\u{e9}",
            "+c6a3ed1bf56b8cb",
        ] {
            assert!(ChangeFingerprint::parse(bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(10_000);
        let Err(FingerprintError::Malformed(shown)) = ChangeFingerprint::parse(&long) else {
            panic!("accepted");
        };
        assert!(shown.len() < 40, "{shown}");
    }
}
