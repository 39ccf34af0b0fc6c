//! Limits: body size, rate, request timeout, concurrency.

use std::time::Duration;

use guardian_protocol::problem_type;
use guardian_server::{Faults, RateLimit};
use reqwest::Method;
use serde_json::json;

use crate::common::{builder, start, Harness, OTHER_TOKEN, TOKEN};

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let h = start(builder().body_limit(1024)).await;
    let r = h
        .create("device", "d1", json!({"x": "y".repeat(2000)}), "k")
        .await;
    assert_eq!(
        (r.status, r.problem_type()),
        (413, problem_type::PAYLOAD_TOO_LARGE)
    );
    assert!(r.is_problem());
    assert!(h.applied_keys().await.is_empty());
    assert_eq!(
        h.create("device", "d1", json!({"x": "y"}), "k")
            .await
            .status,
        201
    );
}

#[tokio::test]
async fn the_default_limit_is_one_mebibyte() {
    let h = start(builder()).await;
    let r = h
        .create("device", "d1", json!({"x": "y".repeat(1024 * 1024)}), "k")
        .await;
    assert_eq!(r.status, 413);
    let r = h
        .create("device", "d1", json!({"x": "y".repeat(1000 * 1000)}), "k")
        .await;
    assert_eq!(r.status, 201);
}

#[tokio::test]
async fn the_rate_limit_is_per_tenant_with_retry_after() {
    let h = start(builder().rate_limit(Some(RateLimit {
        per_second: 0.01,
        burst: 2,
    })))
    .await;
    assert_eq!(h.changes(0, 1).await.status, 200);
    assert_eq!(h.changes(0, 1).await.status, 200);
    let r = h.changes(0, 1).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (429, problem_type::RATE_LIMITED)
    );
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=100).contains(&secs), "{secs}");
    let other = h.as_token(OTHER_TOKEN);
    assert_eq!(
        other
            .send(other.req(Method::GET, "/v1/changes"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn slow_requests_time_out_before_commit_and_apply_nothing() {
    let h = start(
        builder()
            .request_timeout(Duration::from_millis(100))
            .faults(Faults {
                latency_ms: 5_000,
                ..Faults::default()
            }),
    )
    .await;
    let r = h.get("device", "d1").await;
    assert_eq!((r.status, r.problem_type()), (503, problem_type::TIMEOUT));
    let r = h.create("device", "d1", json!({}), "k").await;
    assert_eq!((r.status, r.problem_type()), (503, problem_type::TIMEOUT));
    assert!(
        h.applied_keys().await.is_empty(),
        "a timeout means nothing was applied"
    );
    assert_eq!(
        h.server.in_flight(),
        0,
        "the timed-out request released its key"
    );
}

#[tokio::test]
async fn requests_beyond_the_concurrency_limit_wait_their_turn() {
    let h = start(builder().concurrency_limit(1)).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let req = h.create_req("t", &format!("i{i}"), json!({}), &format!("k{i}"));
        tasks.push(tokio::spawn(async move {
            req.send().await.unwrap().status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
}

/// Sends `head` (and whatever body bytes follow it) on a raw connection
/// and returns what the server answers within 10 s, or `None`.
async fn raw_answer(h: &crate::common::Harness, head: &[u8]) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(h.server.addr())
        .await
        .unwrap();
    s.write_all(head).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    (!got.is_empty()).then(|| String::from_utf8_lossy(&got).into_owned())
}

/// A declared length over the limit is refused before the body is read.
/// Before the check the server waited for the body, and answered 503 (retry)
/// when the request timeout expired.
#[tokio::test]
async fn a_declared_body_over_the_limit_is_413_at_once() {
    let h = start(builder().body_limit(1024)).await;
    let head = format!(
        "POST /v1/entities/device HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Idempotency-Key: k\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"id\":",
        crate::common::TOKEN
    );
    let answer = raw_answer(&h, head.as_bytes())
        .await
        .expect("no answer within 10 s to a declared oversized body");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(h.applied_keys().await.is_empty());
}

/// A chunked body is refused as soon as it crosses the limit, though the
/// client has not finished sending it.
#[tokio::test]
async fn a_chunked_body_crossing_the_limit_is_413_at_once() {
    let h = start(builder().body_limit(1024)).await;
    let chunk = "y".repeat(2000);
    let head = format!(
        "POST /v1/entities/device HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Idempotency-Key: k\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{chunk}\r\n",
        crate::common::TOKEN,
        chunk.len()
    );
    let answer = raw_answer(&h, head.as_bytes())
        .await
        .expect("no answer within 10 s to a chunked oversized body");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(h.applied_keys().await.is_empty());
}

/// A connection that never completes its request head is closed after the
/// header-read timeout. Before it, such connections stayed open for good.
#[tokio::test]
async fn a_connection_that_never_finishes_its_headers_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start(builder().header_read_timeout(Duration::from_millis(300))).await;
    let mut s = tokio::net::TcpStream::connect(h.server.addr())
        .await
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the half-header connection was still open after 10 s");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected the connection to close, got {read:?}"
    );
    // Silence from the start counts as well.
    let mut idle = tokio::net::TcpStream::connect(h.server.addr())
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("the silent connection was still open after 10 s");
    assert!(matches!(read, Ok(0) | Err(_)));
    assert_eq!(h.send(h.http.get(h.url("/healthz"))).await.status, 200);
}

/// Opens a raw connection, sends `head` with `Expect: 100-continue`, waits
/// for the server's `100 Continue` (it is sent when the server starts to
/// read the body) and then sends `partial`, never the rest of the body.
async fn stall_a_body(
    h: &crate::common::Harness,
    head: &str,
    partial: &[u8],
) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(h.server.addr())
        .await
        .unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no 100 Continue within 10 s")
            .unwrap();
        assert!(n > 0, "the server closed the connection");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s.write_all(partial).await.unwrap();
    s
}

fn slow_create_head(token: &str, key: &str) -> String {
    format!(
        "POST /v1/entities/device HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Idempotency-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\
         Expect: 100-continue\r\n\r\n"
    )
}

/// Clients that send their bodies slowly hold no concurrency slot: with
/// every slot's worth of them stalled mid-body, another tenant's requests
/// are answered at once. Before the body was read ahead of the slot, they
/// waited for the request timeout (the security review's 4.7 s delay).
#[tokio::test]
async fn a_stalled_body_holds_no_slot_other_tenants_need() {
    let h = start(
        builder()
            .concurrency_limit(2)
            .request_timeout(Duration::from_secs(120)),
    )
    .await;
    let mut stalled = Vec::new();
    for i in 0..2 {
        let head = slow_create_head(crate::common::TOKEN, &format!("slow{i}"));
        stalled.push(stall_a_body(&h, &head, b"{\"id\":").await);
    }
    let other = h.as_token(OTHER_TOKEN);
    for i in 0..3 {
        let req = other
            .req(Method::POST, "/v1/entities/device")
            .header("Idempotency-Key", format!("b{i}"))
            .json(&json!({"id": format!("b{i}"), "data": {}}));
        let r = tokio::time::timeout(Duration::from_secs(10), other.send(req))
            .await
            .expect("another tenant's request waited behind stalled bodies");
        assert_eq!(r.status, 201);
    }
    assert_eq!(h.applied_keys().await.len(), 3);
    drop(stalled);
}

/// A body that has not arrived when the request timeout expires is answered
/// 408 and its connection closed; nothing is applied.
#[tokio::test]
async fn a_body_slower_than_the_request_timeout_is_408() {
    use tokio::io::AsyncReadExt;
    let h = start(builder().request_timeout(Duration::from_millis(300))).await;
    let mut s = stall_a_body(
        &h,
        &slow_create_head(crate::common::TOKEN, "k"),
        b"{\"id\":",
    )
    .await;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the stalled connection was neither answered nor closed within 10 s")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 408"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(answer.contains(problem_type::TIMEOUT), "{answer}");
    assert!(h.applied_keys().await.is_empty());
    assert_eq!(h.server.in_flight(), 0);
}

/// A server with 1000-byte bodies, `budget` bytes of them at once and a
/// second of latency, holding one ~800-byte body of the first tenant in
/// its handler; the handle answers that request's status.
async fn holding_a_body(budget: usize) -> (Harness, tokio::task::JoinHandle<u16>) {
    let h = start(
        builder()
            .body_limit(1000)
            .body_budget(budget)
            .faults(Faults {
                latency_ms: 1000,
                ..Faults::default()
            }),
    )
    .await;
    let first = h.create_req("device", "a", json!({"x": "y".repeat(760)}), "ka");
    let first = tokio::spawn(async move { first.send().await.unwrap().status().as_u16() });
    tokio::time::timeout(Duration::from_secs(10), h.server.wait_in_flight(1))
        .await
        .expect("the first request never reached its handler");
    (h, first)
}

/// Bodies held at once share a byte budget: a body that would cross it is
/// refused with 503 (retry), and a body's share comes back once its
/// request is answered. Bodies are read before a concurrency slot is
/// taken, so without the budget only the connection caps bound them.
#[tokio::test]
async fn bodies_beyond_the_body_budget_wait_their_turn_with_503() {
    let (h, first) = holding_a_body(1000).await;
    let other = h.as_token(OTHER_TOKEN);
    let req = other
        .req(Method::POST, "/v1/entities/device")
        .header("idempotency-key", "kb")
        .json(&json!({"id": "b", "data": {"x": "y".repeat(260)}}));
    let r = other.send(req).await;
    assert_eq!(
        (r.status, r.problem_type()),
        (503, problem_type::UNAVAILABLE)
    );
    assert!(r.header("retry-after").is_some());
    // A request without a body needs none of the budget.
    assert_eq!(h.get("device", "nope").await.status, 404);
    assert_eq!(first.await.unwrap(), 201);
    let req = other
        .req(Method::POST, "/v1/entities/device")
        .header("idempotency-key", "kb")
        .json(&json!({"id": "b", "data": {"x": "y".repeat(260)}}));
    assert_eq!(other.send(req).await.status, 201, "the budget came back");
    assert_eq!(h.applied_keys().await.len(), 2);
}

/// A trusted proxy carries many clients' connections: the per-peer cap
/// does not apply to it, while it still closes the excess of any other
/// address.
#[tokio::test]
async fn a_trusted_proxy_is_not_held_to_the_per_peer_cap() {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let h = start(
        builder()
            .max_connections_per_peer(2)
            .trusted_proxies(["127.0.0.2".parse().unwrap()]),
    )
    .await;
    let addr = h.server.addr();
    let open = |last: u8| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
                0,
            ))
            .unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        s
    };
    // Reads the answer to the request begun by `open`; "" when the server
    // closed the connection instead.
    let answer = |mut s: tokio::net::TcpStream| async move {
        let _ = s.write_all(b"\r\n").await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no answer within 10 s")
            .unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut proxy = Vec::new();
    for _ in 0..5 {
        proxy.push(open(2).await);
    }
    let mut other = Vec::new();
    for _ in 0..3 {
        other.push(open(3).await);
    }
    for s in proxy {
        assert!(answer(s).await.starts_with("HTTP/1.1 200"));
    }
    let answers: Vec<String> = futures::future::join_all(other.into_iter().map(answer)).await;
    assert!(answers[0].starts_with("HTTP/1.1 200") && answers[1].starts_with("HTTP/1.1 200"));
    assert_eq!(
        answers[2], "",
        "the third connection of an untrusted address was served"
    );
}

/// One tenant's bodies hold at most its share of the body budget (half by
/// default): its next body is refused while another tenant's still fits.
#[tokio::test]
async fn one_tenants_bodies_leave_the_rest_of_the_body_budget_to_others() {
    let (h, first) = holding_a_body(2000).await;
    let body = |id: &str| json!({"id": id, "data": {"x": "y".repeat(260)}});
    let r = h
        .send(
            h.req(Method::POST, "/v1/entities/device")
                .header("idempotency-key", "kb")
                .json(&body("b")),
        )
        .await;
    assert_eq!(
        (r.status, r.problem_type()),
        (503, problem_type::UNAVAILABLE),
        "past the tenant's share"
    );
    let other = h.as_token(OTHER_TOKEN);
    let req = other
        .req(Method::POST, "/v1/entities/device")
        .header("idempotency-key", "kc")
        .json(&json!({"id": "c", "data": {"x": "y".repeat(760)}}));
    assert_eq!(other.send(req).await.status, 201, "within the budget");
    assert_eq!(first.await.unwrap(), 201);
}

/// Feed readers of one tenant that never read their answers hold at most
/// its share of the answer budget (half by default): that tenant's reads
/// are refused while another tenant's are still served. Without the
/// share, they held the whole budget until their send bound.
#[tokio::test]
async fn one_tenants_stalled_feed_readers_leave_the_answer_budget_to_others() {
    use tokio::io::AsyncWriteExt as _;
    let largest = guardian_protocol::FEED_PAGE_DATA_BYTES + guardian_protocol::DEFAULT_BODY_LIMIT;
    let h = start(builder().answer_budget(3 * largest)).await;
    // Five of these pass a page's 4 MiB bound: each page is ~4.5 MB.
    h.create_large_docs(6).await;
    let page = format!(
        "GET /v1/changes?since=0&limit=1000 HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {TOKEN}\r\n\r\n"
    );
    // Four connections, each asking for pages it never reads: without the
    // share three of them hold the budget, past room for one more page.
    let mut stuck = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(h.server.addr())
            .await
            .unwrap();
        s.write_all(page.repeat(30).as_bytes()).await.unwrap();
        stuck.push(s);
    }
    // Polled: nothing signals a held answer. Bounded by the deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = h.changes(0, 1).await;
        if r.status == 503 {
            assert_eq!(r.problem_type(), problem_type::UNAVAILABLE);
            break;
        }
        assert_eq!(r.status, 200);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled readers never filled the tenant's share"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let other = h.as_token(OTHER_TOKEN);
    let r = other
        .send(other.req(Method::GET, "/v1/changes?since=0&limit=1"))
        .await;
    assert_eq!(
        r.status, 200,
        "another tenant's read is served: {:?}",
        r.body
    );
    drop(stuck);
}
