//! Server settings and the [`ServerBuilder`] that binds a [`crate::RunningServer`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{SharedClock, SystemClock};
use crate::faults::{Faults, FaultsError};
use crate::proxy::{IpNet, TrustedProxies};
use crate::store::{Storage, StoreError, Synchronous};

/// A per-tenant token bucket: `burst` requests at once, refilled at
/// `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second per tenant.
    pub per_second: f64,
    /// Requests allowed at once.
    pub burst: u32,
}

/// Everything the server needs to know, fixed at bind time (faults excepted).
#[derive(Debug, Clone)]
pub(crate) struct ServerConfig {
    /// Token → tenant.
    pub(crate) tokens: HashMap<String, Arc<str>>,
    pub(crate) storage: Storage,
    pub(crate) synchronous: Synchronous,
    pub(crate) require_if_match: bool,
    pub(crate) applied_log: bool,
    pub(crate) idempotency_retention: Duration,
    pub(crate) feed_retention: Duration,
    pub(crate) purge_interval: Duration,
    pub(crate) body_limit: usize,
    pub(crate) body_budget: usize,
    pub(crate) answer_budget: usize,
    pub(crate) tenant_share_percent: u8,
    pub(crate) max_batch_ops: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) concurrency_limit: usize,
    pub(crate) rate_limit: Option<RateLimit>,
    pub(crate) ws_ping_interval: Duration,
    pub(crate) ws_idle_timeout: Duration,
    pub(crate) header_read_timeout: Duration,
    /// `None`: derived from the open-file limit at bind time.
    pub(crate) max_connections: Option<usize>,
    pub(crate) max_connections_per_peer: usize,
    pub(crate) trusted_proxies: TrustedProxies,
    pub(crate) faults: Faults,
    pub(crate) admin_token: Option<String>,
    pub(crate) clock: SharedClock,
    pub(crate) fleet_limits: crate::fleet::FleetLimits,
    pub(crate) alert_rules: crate::fleet::alerts::AlertRules,
    pub(crate) alert_webhook: Option<String>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// A setting is invalid.
    #[error("invalid server setting: {0}")]
    Config(String),
    /// The fault settings are invalid.
    #[error("invalid faults: {0}")]
    Faults(#[from] FaultsError),
    /// The database could not be opened.
    #[error("cannot open the server database: {0}")]
    Store(#[from] StoreError),
    /// The address could not be bound.
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds and binds a server.
///
/// ```no_run
/// # async fn demo() -> Result<(), guardian_server::BindError> {
/// let server = guardian_server::ServerBuilder::new()
///     .token("acme", "secret-token")
///     .in_memory()
///     .bind("127.0.0.1:0")
///     .await?;
/// println!("listening on {}", server.url());
/// server.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    pub(crate) config: ServerConfig,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerBuilder {
    /// Defaults: in memory, no tokens, 24 h idempotency retention, 7 d feed
    /// retention, 1 MiB bodies and 256 MiB of them at once, 1000 ops per batch, 30 s request timeout,
    /// 256 concurrent requests, no rate limit, WebSocket ping every 15 s and
    /// close after 45 s of silence, the applied-mutations log kept, 10 s to send a request's headers, at
    /// most 64 connections per peer address and a total connection cap
    /// derived from the open-file limit (see
    /// [`max_connections`](Self::max_connections)), no trusted proxies, no
    /// faults, no admin route.
    pub fn new() -> Self {
        Self {
            config: ServerConfig {
                tokens: HashMap::new(),
                storage: Storage::Memory,
                synchronous: Synchronous::Full,
                require_if_match: false,
                applied_log: true,
                idempotency_retention: Duration::from_secs(24 * 3600),
                feed_retention: Duration::from_secs(7 * 24 * 3600),
                purge_interval: Duration::from_secs(60),
                body_limit: guardian_protocol::DEFAULT_BODY_LIMIT,
                body_budget: DEFAULT_BODY_BUDGET,
                answer_budget: DEFAULT_ANSWER_BUDGET,
                tenant_share_percent: DEFAULT_TENANT_SHARE_PERCENT,
                max_batch_ops: 1000,
                request_timeout: Duration::from_secs(30),
                concurrency_limit: 256,
                rate_limit: None,
                ws_ping_interval: Duration::from_secs(15),
                ws_idle_timeout: Duration::from_secs(45),
                header_read_timeout: Duration::from_secs(10),
                max_connections: None,
                max_connections_per_peer: 64,
                trusted_proxies: TrustedProxies::default(),
                faults: Faults::default(),
                admin_token: None,
                clock: Arc::new(SystemClock),
                fleet_limits: crate::fleet::FleetLimits::default(),
                alert_rules: crate::fleet::alerts::AlertRules::default(),
                alert_webhook: None,
            },
        }
    }

    /// Accepts `token` as a bearer token of `tenant`: non-empty text
    /// without control characters (checked at bind).
    #[must_use]
    pub fn token(mut self, tenant: impl Into<String>, token: impl Into<String>) -> Self {
        self.config
            .tokens
            .insert(token.into(), Arc::from(tenant.into()));
        self
    }

    /// Stores data in a SQLite file (WAL mode), created if missing.
    #[must_use]
    pub fn database(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.storage = Storage::File(path.into());
        self
    }

    /// Stores data in PostgreSQL (`postgres://user[:password]@host[:port]/dbname`
    /// or key=value form). Several servers given the same database behave
    /// as one: any of them may take any request. The tables (`guardian_*`)
    /// are created if missing; a database whose tables of those names are
    /// not the server's is refused and left as it is.
    #[must_use]
    pub fn postgres(mut self, url: impl Into<String>) -> Self {
        self.config.storage = Storage::Postgres(url.into());
        self
    }

    /// Stores data in memory (lost at shutdown). The default.
    #[must_use]
    pub fn in_memory(mut self) -> Self {
        self.config.storage = Storage::Memory;
        self
    }

    /// Commit durability of the database file.
    #[must_use]
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.config.synchronous = synchronous;
        self
    }

    /// Answers 428 to updates and deletes without `If-Match`.
    #[must_use]
    pub fn require_if_match(mut self, yes: bool) -> Self {
        self.config.require_if_match = yes;
        self
    }

    /// Keeps the applied-mutations log (on by default): a row per mutation
    /// that took effect, never purged, which tests and the demo read to
    /// prove exactly-once (see [`RunningServer::applied_log`]). A server
    /// nobody audits that way turns it off and writes one row less per op.
    ///
    /// [`RunningServer::applied_log`]: crate::RunningServer::applied_log
    #[must_use]
    pub fn applied_log(mut self, yes: bool) -> Self {
        self.config.applied_log = yes;
        self
    }

    /// How long a stored idempotent response is kept.
    #[must_use]
    pub fn idempotency_retention(mut self, d: Duration) -> Self {
        self.config.idempotency_retention = d;
        self
    }

    /// How long changes stay in the feed.
    #[must_use]
    pub fn feed_retention(mut self, d: Duration) -> Self {
        self.config.feed_retention = d;
        self
    }

    /// How often expired records are purged in the background.
    #[must_use]
    pub fn purge_interval(mut self, d: Duration) -> Self {
        self.config.purge_interval = d;
        self
    }

    /// Largest accepted request body in bytes (413 beyond).
    #[must_use]
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }

    /// Most bytes of request bodies held at once, all requests together
    /// (default 256 MiB: the concurrency limit times the default body
    /// limit). Bodies are read before a request takes a concurrency slot,
    /// so this, not that limit, bounds their memory; a body that would
    /// cross it gets 503 `unavailable` with `Retry-After`. At least the
    /// body limit.
    #[must_use]
    pub fn body_budget(mut self, bytes: usize) -> Self {
        self.config.body_budget = bytes;
        self
    }

    /// Most bytes of feed pages held at once (default 256 MiB): a feed read
    /// reserves its page's largest size before reading it (503 with
    /// `Retry-After` when it cannot, without waiting) and holds what its
    /// answer needs until the answer is sent; a realtime backlog page
    /// waits for its reservation (within the request timeout) and holds it
    /// while its frames are sent. Apart from the body budget and taken by
    /// reads only, so clients that stall their reads keep no write out.
    /// At least the largest page (the feed page bound plus the body limit).
    #[must_use]
    pub fn answer_budget(mut self, bytes: usize) -> Self {
        self.config.answer_budget = bytes;
        self
    }

    /// Most of the body budget and of the answer budget one tenant may
    /// hold at once, in percent of each (default 50; 100: no share), and
    /// never less than one body of the body limit and one largest page:
    /// one tenant's stalled clients then leave the rest to the others.
    /// From 1 to 100.
    #[must_use]
    pub fn tenant_share(mut self, percent: u8) -> Self {
        self.config.tenant_share_percent = percent;
        self
    }

    /// Most ops in one batch (413 beyond).
    #[must_use]
    pub fn max_batch_ops(mut self, n: usize) -> Self {
        self.config.max_batch_ops = n;
        self
    }

    /// Longest time a request may take before a 503 `timeout` problem. A
    /// mutation whose transaction has started gets as long again, then is
    /// answered 503 with its outcome unknown (its transaction still runs to
    /// its end); on PostgreSQL it also bounds each statement of a write.
    #[must_use]
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.config.request_timeout = d;
        self
    }

    /// Most requests handled at once; more wait for a slot.
    #[must_use]
    pub fn concurrency_limit(mut self, n: usize) -> Self {
        self.config.concurrency_limit = n;
        self
    }

    /// Per-tenant rate limit (429 with `Retry-After` beyond); `None` for none.
    #[must_use]
    pub fn rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.config.rate_limit = limit;
        self
    }

    /// Interval of server pings on WebSockets.
    #[must_use]
    pub fn ws_ping_interval(mut self, d: Duration) -> Self {
        self.config.ws_ping_interval = d;
        self
    }

    /// A WebSocket peer silent this long (no pong, no frame) is closed.
    #[must_use]
    pub fn ws_idle_timeout(mut self, d: Duration) -> Self {
        self.config.ws_idle_timeout = d;
        self
    }

    /// Longest time a client may take to send a request's headers, counted
    /// from when the server starts waiting for them (a new connection, or
    /// an idle kept-alive one); the connection is closed when it expires.
    #[must_use]
    pub fn header_read_timeout(mut self, d: Duration) -> Self {
        self.config.header_read_timeout = d;
        self
    }

    /// Most connections open at once (WebSockets included). Beyond it, new
    /// connections wait in the listen backlog until one closes. Without
    /// this setting: three quarters of the process's open-file limit,
    /// between 16 and 4096, so that slow clients cannot exhaust the
    /// descriptors.
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.config.max_connections = Some(n);
        self
    }

    /// Most connections open at once from one IP address; more are closed
    /// as soon as they are accepted. A [trusted proxy](Self::trusted_proxies)
    /// has no such cap.
    #[must_use]
    pub fn max_connections_per_peer(mut self, n: usize) -> Self {
        self.config.max_connections_per_peer = n;
        self
    }

    /// Trusts `X-Forwarded-For` on connections from `proxies` (a reverse
    /// proxy or load balancer in front of the server; none by default). A
    /// request through them is counted under the right-most forwarded
    /// address that is not one of them (the admin lockout), and their own
    /// connections are bounded only by the total cap, not the per-peer one.
    #[must_use]
    pub fn trusted_proxies(mut self, proxies: impl IntoIterator<Item = IpNet>) -> Self {
        self.config.trusted_proxies = TrustedProxies::new(proxies.into_iter().collect());
        self
    }

    /// Initial fault settings.
    #[must_use]
    pub fn faults(mut self, faults: Faults) -> Self {
        self.config.faults = faults;
        self
    }

    /// Enables the `/admin` routes, guarded by this bearer token.
    #[must_use]
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        self.config.admin_token = Some(token.into());
        self
    }

    /// The wall clock (retention, `updated_at`, HTTP dates).
    #[must_use]
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.config.clock = clock;
        self
    }

    /// Bounds of the in-memory telemetry store (`/v1/telemetry`).
    #[must_use]
    pub fn fleet_limits(mut self, limits: crate::fleet::FleetLimits) -> Self {
        self.config.fleet_limits = limits;
        self
    }

    /// When fleet alerts fire (default: [`AlertRules::default`](crate::AlertRules::default)).
    #[must_use]
    pub fn alert_rules(mut self, rules: crate::fleet::alerts::AlertRules) -> Self {
        self.config.alert_rules = rules;
        self
    }

    /// Where alert events are POSTed as JSON (none by default).
    #[must_use]
    pub fn alert_webhook(mut self, url: impl Into<String>) -> Self {
        self.config.alert_webhook = Some(url.into());
        self
    }

    pub(crate) fn validate(&self) -> Result<(), BindError> {
        let c = &self.config;
        self.config.faults.validate()?;
        let bad = |what: &str| Err(BindError::Config(what.to_owned()));
        if c.body_limit == 0 {
            return bad("body limit must be positive");
        }
        if c.body_budget < c.body_limit {
            return bad("the body budget must be at least the body limit");
        }
        if c.answer_budget < largest_page(c.body_limit) {
            return bad("the answer budget must hold the largest feed page (the page bound plus the body limit)");
        }
        if !(1..=100).contains(&c.tenant_share_percent) {
            return bad("the tenant share is a percentage from 1 to 100");
        }
        if c.max_batch_ops == 0 {
            return bad("max batch ops must be positive");
        }
        if c.concurrency_limit == 0 {
            return bad("concurrency limit must be positive");
        }
        if c.max_connections == Some(0) || c.max_connections_per_peer == 0 {
            return bad("connection caps must be positive");
        }
        if c.header_read_timeout.is_zero() || c.request_timeout.is_zero() {
            return bad("the header read and request timeouts must be positive");
        }
        if c.ws_ping_interval.is_zero() || c.purge_interval.is_zero() {
            return bad("intervals must be positive");
        }
        if let Some(r) = c.rate_limit {
            if !(r.per_second > 0.0 && r.per_second.is_finite()) || r.burst == 0 {
                return bad("rate limit needs a positive rate and burst");
            }
        }
        let f = c.fleet_limits;
        if f.devices_per_tenant == 0 || f.devices_total == 0 || f.history == 0 {
            return bad("fleet limits must be positive");
        }
        if let Some(url) = &c.alert_webhook {
            if reqwest::Url::parse(url).map_or(true, |u| !matches!(u.scheme(), "http" | "https")) {
                return bad("the alert webhook must be an http(s) URL");
            }
        }
        if !c.tokens.values().all(|t| tenant_name_ok(t)) {
            return bad("a tenant name is non-empty text without control characters");
        }
        let bearer_ok = |t: &str| guardian_protocol::is_bearer_token(t);
        if !c.tokens.keys().all(|t| bearer_ok(t)) || !c.admin_token.as_deref().is_none_or(bearer_ok)
        {
            return bad("tokens must be printable ASCII without spaces");
        }
        Ok(())
    }
}

/// Whether `tenant` can name a tenant: non-empty, no control characters
/// (PostgreSQL text cannot hold NUL; a line break or escape would forge
/// lines in logs and tokens files).
fn tenant_name_ok(tenant: &str) -> bool {
    !tenant.is_empty() && !tenant.chars().any(char::is_control)
}

/// Default of [`ServerBuilder::body_budget`].
pub const DEFAULT_BODY_BUDGET: usize = 256 * 1024 * 1024;

/// Default of [`ServerBuilder::answer_budget`].
pub const DEFAULT_ANSWER_BUDGET: usize = 256 * 1024 * 1024;

/// Default of [`ServerBuilder::tenant_share`], in percent.
pub const DEFAULT_TENANT_SHARE_PERCENT: u8 = 50;

impl ServerConfig {
    /// The part of `budget` one tenant may hold: its percentage, and at
    /// least `unit` (what one request needs).
    pub(crate) fn tenant_share(&self, budget: usize, unit: usize) -> usize {
        let part = budget / 100 * usize::from(self.tenant_share_percent)
            + budget % 100 * usize::from(self.tenant_share_percent) / 100;
        part.max(unit)
    }
}

/// The most bytes of entity data one feed page can hold: the page bound,
/// plus the entity that crosses it (at most the body limit).
pub(crate) fn largest_page(body_limit: usize) -> usize {
    guardian_protocol::FEED_PAGE_DATA_BYTES.saturating_add(body_limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_must_be_ones_a_bearer_header_can_carry() {
        let ok = ServerBuilder::new()
            .token("acme", "tok-acme_1.2~+/=")
            .admin_token("adm!n");
        assert!(ok.validate().is_ok());
        for bad in ["", "a b", "tab\tbed", "crlf\r\nX: 1", "nul\0", "é"] {
            let tenant = ServerBuilder::new().token("acme", bad);
            assert!(tenant.validate().is_err(), "{bad:?}");
            let admin = ServerBuilder::new().token("acme", "t").admin_token(bad);
            assert!(admin.validate().is_err(), "{bad:?}");
        }
        assert!(ServerBuilder::new().token("", "t").validate().is_err());
    }

    #[test]
    fn tenant_names_have_no_control_characters() {
        for ok in ["acme", "o'reilly \"; -- a b", "é😀"] {
            assert!(
                ServerBuilder::new().token(ok, "t").validate().is_ok(),
                "{ok:?}"
            );
        }
        for bad in ["", "nul\0", "line\nbreak", "tab\t", "del\u{7f}", "c1\u{85}"] {
            assert!(
                ServerBuilder::new().token(bad, "t").validate().is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_body_budget_holds_at_least_one_body() {
        let b = |budget| ServerBuilder::new().body_limit(1000).body_budget(budget);
        assert!(b(999).validate().is_err());
        assert!(b(1000).validate().is_ok());
    }

    #[test]
    fn a_tenants_share_is_a_percentage_and_at_least_one_request() {
        let share = |percent| ServerBuilder::new().tenant_share(percent);
        assert!(share(0).validate().is_err());
        assert!(share(101).validate().is_err());
        assert!(share(1).validate().is_ok() && share(100).validate().is_ok());
        let c = share(50).config;
        assert_eq!(c.tenant_share(1000, 10), 500);
        assert_eq!(
            c.tenant_share(usize::MAX, 10),
            usize::MAX / 2,
            "no overflow"
        );
        assert_eq!(c.tenant_share(1000, 800), 800, "one body or page at least");
        assert_eq!(share(100).config.tenant_share(999, 1), 999);
    }

    #[test]
    fn the_answer_budget_holds_the_largest_page() {
        let page = guardian_protocol::FEED_PAGE_DATA_BYTES + 1000;
        let b = |budget| ServerBuilder::new().body_limit(1000).answer_budget(budget);
        assert!(b(page - 1).validate().is_err());
        assert!(b(page).validate().is_ok());
    }
}
