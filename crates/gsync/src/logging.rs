//! The log subscriber every gsync command installs.

use std::io::IsTerminal as _;

use tracing::{Level, Metadata};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::EnvFilter;

/// Libraries whose records below info carry payloads or tokens: the
/// WebSocket library traces every frame (change payloads) and the client
/// handshake request (its `Authorization` header). Their debug and trace
/// records are dropped whatever `RUST_LOG` says.
const REDACTED_TARGETS: [&str; 2] = ["tungstenite", "tokio_tungstenite"];

/// Installs the stderr subscriber: `RUST_LOG`, or `default` without it;
/// colours only on a terminal and without `NO_COLOR`. A no-op if one is
/// installed already.
pub(crate) fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_env_filter(filter)
        .finish()
        .with(tracing_subscriber::filter::filter_fn(allowed))
        .try_init();
}

fn allowed(meta: &Metadata<'_>) -> bool {
    !redacted(meta.target(), *meta.level())
}

/// True for the records of [`REDACTED_TARGETS`] below info.
fn redacted(target: &str, level: Level) -> bool {
    level > Level::INFO
        && REDACTED_TARGETS.iter().any(|t| {
            target
                .strip_prefix(t)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_records_are_dropped_below_info() {
        assert!(redacted("tungstenite::protocol", Level::TRACE));
        assert!(redacted("tungstenite", Level::DEBUG));
        assert!(redacted("tokio_tungstenite::compat", Level::TRACE));
        assert!(!redacted("tungstenite::protocol", Level::WARN));
        assert!(!redacted("tungstenite::protocol", Level::INFO));
        assert!(!redacted("tungstenite_other", Level::TRACE));
        assert!(!redacted("guardian_sync::engine", Level::TRACE));
    }
}
