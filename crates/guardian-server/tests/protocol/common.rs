//! Test harness: an in-process server and a small HTTP client.

use guardian_server::{RunningServer, ServerBuilder};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::Value;

pub(crate) const TOKEN: &str = "tok-acme";
pub(crate) const OTHER_TOKEN: &str = "tok-globex";
pub(crate) const ADMIN: &str = "adm-secret";

/// The default builder of the tests: two tenants, an admin token, in memory
/// (SQLite), or in a fresh PostgreSQL database of its own when this test
/// binary runs the suite on PostgreSQL (`crate::POSTGRES`).
pub(crate) fn builder() -> ServerBuilder {
    let b = ServerBuilder::new()
        .token("acme", TOKEN)
        .token("globex", OTHER_TOKEN)
        .admin_token(ADMIN)
        .in_memory();
    if !crate::POSTGRES {
        return b;
    }
    let db = crate::pg::PgDb::create();
    let b = b.postgres(db.url());
    // Dropped with the harness that `start` makes from this builder.
    PENDING_DB.with(|p| p.borrow_mut().push(db));
    b
}

thread_local! {
    /// Databases made by `builder` on this test's thread, waiting for
    /// `start` to tie them to a harness.
    static PENDING_DB: std::cell::RefCell<Vec<crate::pg::PgDb>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

pub(crate) struct Harness {
    pub(crate) server: RunningServer,
    pub(crate) http: reqwest::Client,
    pub(crate) token: String,
    /// Dropped after the server (fields drop in order).
    _dbs: Vec<crate::pg::PgDb>,
}

#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Value,
}

impl Resp {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The problem `type` of an error body.
    pub(crate) fn problem_type(&self) -> &str {
        self.body["type"].as_str().unwrap_or("")
    }

    pub(crate) fn is_problem(&self) -> bool {
        self.header("content-type") == Some("application/problem+json")
    }
}

pub(crate) async fn start(b: ServerBuilder) -> Harness {
    let server = b.bind("127.0.0.1:0").await.expect("bind");
    Harness {
        server,
        http: reqwest::Client::new(),
        token: TOKEN.to_owned(),
        _dbs: PENDING_DB.with(|p| std::mem::take(&mut *p.borrow_mut())),
    }
}

pub(crate) async fn start_default() -> Harness {
    start(builder()).await
}

impl Harness {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    /// Same server, another tenant's token.
    pub(crate) fn as_token(&self, token: &str) -> Harness2<'_> {
        Harness2 {
            h: self,
            token: token.to_owned(),
        }
    }

    pub(crate) async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        self.try_send(req).await.expect("request failed")
    }

    pub(crate) async fn try_send(&self, req: reqwest::RequestBuilder) -> reqwest::Result<Resp> {
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    pub(crate) fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    pub(crate) fn create_req(
        &self,
        ty: &str,
        id: &str,
        data: Value,
        key: &str,
    ) -> reqwest::RequestBuilder {
        self.req(Method::POST, &format!("/v1/entities/{ty}"))
            .header("idempotency-key", key)
            .json(&serde_json::json!({"id": id, "data": data}))
    }

    pub(crate) fn put_req(
        &self,
        ty: &str,
        id: &str,
        data: Value,
        key: &str,
        if_match: Option<u64>,
    ) -> reqwest::RequestBuilder {
        let mut r = self
            .req(Method::PUT, &format!("/v1/entities/{ty}/{id}"))
            .header("idempotency-key", key)
            .json(&serde_json::json!({"data": data}));
        if let Some(v) = if_match {
            r = r.header("if-match", format!("\"{v}\""));
        }
        r
    }

    pub(crate) fn delete_req(
        &self,
        ty: &str,
        id: &str,
        key: &str,
        if_match: Option<u64>,
    ) -> reqwest::RequestBuilder {
        let mut r = self
            .req(Method::DELETE, &format!("/v1/entities/{ty}/{id}"))
            .header("idempotency-key", key);
        if let Some(v) = if_match {
            r = r.header("if-match", format!("\"{v}\""));
        }
        r
    }

    pub(crate) async fn create(&self, ty: &str, id: &str, data: Value, key: &str) -> Resp {
        self.send(self.create_req(ty, id, data, key)).await
    }

    pub(crate) async fn put(
        &self,
        ty: &str,
        id: &str,
        data: Value,
        key: &str,
        if_match: Option<u64>,
    ) -> Resp {
        self.send(self.put_req(ty, id, data, key, if_match)).await
    }

    pub(crate) async fn delete(
        &self,
        ty: &str,
        id: &str,
        key: &str,
        if_match: Option<u64>,
    ) -> Resp {
        self.send(self.delete_req(ty, id, key, if_match)).await
    }

    pub(crate) async fn get(&self, ty: &str, id: &str) -> Resp {
        self.send(self.req(Method::GET, &format!("/v1/entities/{ty}/{id}")))
            .await
    }

    pub(crate) async fn batch(&self, ops: Value) -> Resp {
        self.send(
            self.req(Method::POST, "/v1/batch")
                .json(&serde_json::json!({"ops": ops})),
        )
        .await
    }

    /// Creates `doc/d0`.. `doc/d{n-1}`, each with 900 kB of data: five of
    /// them pass a feed page's 4 MiB bound.
    pub(crate) async fn create_large_docs(&self, n: usize) {
        let big = "x".repeat(900_000);
        for i in 0..n {
            let r = self
                .create(
                    "doc",
                    &format!("d{i}"),
                    serde_json::json!({"s": big}),
                    &format!("k{i}"),
                )
                .await;
            assert_eq!(r.status, 201);
        }
    }

    pub(crate) async fn changes(&self, since: u64, limit: u64) -> Resp {
        self.send(self.req(
            Method::GET,
            &format!("/v1/changes?since={since}&limit={limit}"),
        ))
        .await
    }

    pub(crate) fn admin(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(ADMIN)
    }

    /// Keys of the applied log, in order.
    pub(crate) async fn applied_keys(&self) -> Vec<String> {
        self.server
            .applied_log()
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.idempotency_key)
            .collect()
    }
}

/// A view of the harness with another token.
pub(crate) struct Harness2<'a> {
    h: &'a Harness,
    token: String,
}

impl Harness2<'_> {
    pub(crate) fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.h
            .http
            .request(method, self.h.url(path))
            .bearer_auth(&self.token)
    }

    pub(crate) async fn send(&self, req: reqwest::RequestBuilder) -> Resp {
        self.h.send(req).await
    }
}

/// The text of `/metrics`.
pub(crate) async fn metrics(h: &Harness) -> String {
    h.http
        .get(h.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// `(status, replayed)` of each result of a batch response body.
pub(crate) fn batch_outcomes(r: &Value) -> Vec<(u64, bool)> {
    r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["status"].as_u64().unwrap(),
                r["replayed"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The status of each result of a batch response body.
pub(crate) fn batch_statuses(r: &Value) -> Vec<u64> {
    batch_outcomes(r).into_iter().map(|(s, _)| s).collect()
}
