//! Bearer-token authentication: each token belongs to one tenant.
//!
//! Tokens are never logged, and never compared as given: the server
//! compares SHA-256 digests, so the time a comparison takes tells a guesser
//! neither a token's length nor how much of a guess was right.

use std::collections::HashMap;
use std::sync::Arc;

use axum::http::{header, HeaderMap};

/// The tenant of the authenticated request (a request extension).
#[derive(Debug, Clone)]
pub(crate) struct Tenant(pub(crate) Arc<str>);

/// The token of an `Authorization: Bearer <token>` header; none when the
/// header is given twice (which one a proxy on the way used is unknown).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The SHA-256 digest of a secret.
pub(crate) type Digest = [u8; 32];

pub(crate) fn digest(secret: &str) -> Digest {
    use sha2::Digest as _;
    sha2::Sha256::digest(secret.as_bytes()).into()
}

/// Whether `given` is the secret whose digest is `expected`. The time it
/// takes depends on the length of `given` (the caller's own) and on nothing
/// of the secret: the secret's digest is made once, beforehand.
pub(crate) fn secret_eq(given: &str, expected: &Digest) -> bool {
    let given = digest(given);
    given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The tenants by their tokens' digests: a lookup hashes the digest, whose
/// bytes a guesser cannot steer, so its timing says nothing of the tokens.
pub(crate) fn tenants_by_digest(tokens: &HashMap<String, Arc<str>>) -> HashMap<Digest, Arc<str>> {
    tokens
        .iter()
        .map(|(token, tenant)| (digest(token), Arc::clone(tenant)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_by_content_whatever_their_lengths() {
        let secret = digest("s3cret");
        assert!(secret_eq("s3cret", &secret));
        for wrong in ["s3cre", "s3cret!", "", "S3cret"] {
            assert!(!secret_eq(wrong, &secret), "{wrong:?}");
        }
    }

    #[test]
    fn tenants_are_found_by_their_tokens_digest() {
        let tokens = HashMap::from([("tok-a".to_owned(), Arc::from("a"))]);
        let map = tenants_by_digest(&tokens);
        assert_eq!(map.get(&digest("tok-a")).map(|t| &**t), Some("a"));
        assert!(!map.contains_key(&digest("tok-b")));
    }
}
