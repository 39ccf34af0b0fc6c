//! Bearer tokens from the app, with a single-flight refresh on 401.

use std::fmt::Debug;
use std::sync::Arc;

use futures::future::BoxFuture;

/// Why the app could not supply a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no usable token: {0}")]
pub struct TokenError(pub String);

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
        self.provider.token().await
    }

    /// A token to retry with after `rejected` got a 401.
    pub(crate) async fn refreshed(&self, rejected: &str) -> Result<String, TokenError> {
        let _guard = self.refreshing.lock().await;
        let now = self.provider.token().await?;
        if now != rejected {
            // Someone else refreshed while we waited.
            return Ok(now);
        }
        self.provider.refresh().await
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

    #[test]
    fn static_token_is_never_printed() {
        assert_eq!(
            format!("{:?}", StaticToken::new("secret")),
            "StaticToken(***)"
        );
    }
}
