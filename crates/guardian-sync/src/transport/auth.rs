//! Bearer tokens from the app, with a single-flight refresh on 401.

use std::fmt::Debug;
use std::sync::Arc;

use futures::future::BoxFuture;

/// Why the app could not supply a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no usable token: {0}")]
pub struct TokenError(pub String);

/// Refuses a token that no request could carry as a bearer token
/// ([`guardian_protocol::is_bearer_token`]). Such a token would fail every
/// send as if the network were down, or answer 401 for good; refused, it
/// pauses the runner for a usable one instead. The message never quotes
/// the token.
pub fn check_token(token: &str) -> Result<(), TokenError> {
    if token.is_empty() {
        return Err(TokenError("the token is empty".into()));
    }
    if !guardian_protocol::is_bearer_token(token) {
        return Err(TokenError(
            "the token holds a space, a control character or non-ASCII text".into(),
        ));
    }
    Ok(())
}

/// Supplies bearer tokens; implemented by the app.
///
/// The engine reads the token at send time and never stores it on an op or
/// in the outbox, so a rotated token takes effect on the next request.
pub trait TokenProvider: Send + Sync + Debug {
    /// The token to use now.
    fn token(&self) -> BoxFuture<'_, Result<String, TokenError>>;
    /// Called after a 401: obtain a fresh token (for example with a refresh
    /// token). Concurrent 401s share one call.
    fn refresh(&self) -> BoxFuture<'_, Result<String, TokenError>>;
}

/// A fixed token (tests, scripts, `gsync run --token`); refresh returns it unchanged.
#[derive(Clone)]
pub struct StaticToken(Arc<str>);

impl StaticToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(Arc::from(token.into()))
    }
}

impl Debug for StaticToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.write_str("StaticToken(***)")
    }
}

impl TokenProvider for StaticToken {
    fn token(&self) -> BoxFuture<'_, Result<String, TokenError>> {
        Box::pin(async move { Ok(self.0.to_string()) })
    }

    fn refresh(&self) -> BoxFuture<'_, Result<String, TokenError>> {
        self.token()
    }
}

/// Serializes refreshes: when many requests get a 401 with the same token,
/// only the first calls [`TokenProvider::refresh`]; the others wait for it
/// and use its result.
#[derive(Debug)]
pub(crate) struct Auth {
    provider: Arc<dyn TokenProvider>,
    refreshing: tokio::sync::Mutex<()>,
}

impl Auth {
    pub(crate) fn new(provider: Arc<dyn TokenProvider>) -> Self {
        Self {
            provider,
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) async fn token(&self) -> Result<String, TokenError> {
        // Wait while a refresh runs, so we don't send a token known to be stale.
        drop(self.refreshing.lock().await);
        let token = self.provider.token().await?;
        check_token(&token)?;
        Ok(token)
    }

    /// A token to retry with after `rejected` got a 401.
    pub(crate) async fn refreshed(&self, rejected: &str) -> Result<String, TokenError> {
        let _guard = self.refreshing.lock().await;
        let now = self.provider.token().await?;
        if now != rejected {
            // Someone else refreshed while we waited.
            check_token(&now)?;
            return Ok(now);
        }
        let fresh = self.provider.refresh().await?;
        check_token(&fresh)?;
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Debug)]
    struct Counting {
        token: Mutex<String>,
        refreshes: AtomicUsize,
    }

    impl TokenProvider for Counting {
        fn token(&self) -> BoxFuture<'_, Result<String, TokenError>> {
            Box::pin(async move { Ok(self.token.lock().unwrap().clone()) })
        }
        fn refresh(&self) -> BoxFuture<'_, Result<String, TokenError>> {
            Box::pin(async move {
                tokio::task::yield_now().await;
                let n = self.refreshes.fetch_add(1, Ordering::SeqCst) + 1;
                let t = format!("t{n}");
                *self.token.lock().unwrap() = t.clone();
                Ok(t)
            })
        }
    }

    #[tokio::test]
    async fn concurrent_401s_share_one_refresh() {
        let provider = Arc::new(Counting {
            token: Mutex::new("t0".into()),
            refreshes: AtomicUsize::new(0),
        });
        let auth = Arc::new(Auth::new(provider.clone()));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let auth = auth.clone();
                tokio::spawn(async move { auth.refreshed("t0").await.unwrap() })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), "t1");
        }
        assert_eq!(provider.refreshes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_token_no_header_can_carry_is_refused_without_quoting_it() {
        for bad in [
            "",
            "abc\r\nX-Evil: 1",
            "nul\0x",
            "bell\x07",
            "tab\tbed",
            " spaced",
            "trailing ",
            "é",
        ] {
            let auth = Auth::new(Arc::new(StaticToken::new(bad)));
            let e = auth.token().await.unwrap_err().to_string();
            assert!(!e.contains("Evil") && !e.contains("bell"), "{e}");
            assert!(auth.refreshed("other").await.is_err(), "{bad:?}");
        }
        let auth = Auth::new(Arc::new(StaticToken::new("eyJhbGciOi.J9-_~+/=")));
        assert_eq!(auth.token().await.unwrap(), "eyJhbGciOi.J9-_~+/=");
    }

    #[test]
    fn static_token_is_never_printed() {
        assert_eq!(
            format!("{:?}", StaticToken::new("secret")),
            "StaticToken(***)"
        );
    }
}
