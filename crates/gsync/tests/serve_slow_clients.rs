//! `gsync serve` under slow clients: hundreds of connections that send half
//! a request header and hold on, against a server process whose open-file
//! limit is 256, must not lock a real client out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// Slow connections kept open (re-opened as the server closes them).
const SLOW: usize = 300;
/// Distinct loopback addresses they come from, so that the per-peer cap
/// alone cannot turn them away and the total cap is what holds.
const PEERS: usize = 10;

struct Server {
    child: Child,
    url: String,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `gsync serve` under `ulimit -n 256`.
async fn serve(extra: &[&str]) -> Server {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 256 && exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_gsync"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--token",
            "acme:secret",
            "--in-memory",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(30), line)
        .await
        .expect("no 'listening on' line within 30 s")
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let addr = url.strip_prefix("http://").unwrap().parse().unwrap();
    Server { child, url, addr }
}

#[derive(Default)]
struct Flood {
    stop: AtomicBool,
    open: AtomicUsize,
    peak: AtomicUsize,
    closed_by_server: AtomicUsize,
}

/// One slow client: connects from `from`, sends half a header, waits for the
/// server to close, and starts again until told to stop.
async fn slow_client(flood: Arc<Flood>, from: IpAddr, server: SocketAddr) {
    while !flood.stop.load(Ordering::SeqCst) {
        let Ok(socket) = TcpSocket::new_v4() else {
            return;
        };
        if socket.bind(SocketAddr::new(from, 0)).is_err() {
            return;
        }
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(5), socket.connect(server)).await
        else {
            continue;
        };
        let n = flood.open.fetch_add(1, Ordering::SeqCst) + 1;
        flood.peak.fetch_max(n, Ordering::SeqCst);
        if stream
            .write_all(b"GET /v1/changes HTTP/1.1\r\nHost: slow\r\nX-Slow: ")
            .await
            .is_ok()
        {
            let mut buf = [0u8; 512];
            // Accepted or not, the server must end the connection; polled in
            // slices so that a stop ends the loop.
            loop {
                match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await
                {
                    Ok(Ok(0) | Err(_)) => {
                        flood.closed_by_server.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    Err(_) if flood.stop.load(Ordering::SeqCst) => break,
                    Ok(Ok(_)) | Err(_) => {}
                }
            }
        }
        flood.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A real client keeps creating and reading entities, each request on a new
/// connection, while 300 slow connections from ten addresses hold on.
/// Before the header-read timeout and the connection caps, the server ran
/// out of descriptors (`Too many open files`) and never answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_cannot_lock_a_real_client_out() {
    let server = serve(&["--header-read-timeout", "1s"]).await;
    let flood = Arc::new(Flood::default());
    let mut tasks = Vec::new();
    for i in 0..SLOW {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % PEERS) as u8));
        tasks.push(tokio::spawn(slow_client(
            Arc::clone(&flood),
            from,
            server.addr,
        )));
    }
    // The flood is in place once it holds more connections than the process
    // has descriptors for its caps (bounded wait).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while flood.peak.load(Ordering::SeqCst) < 150 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flood never got 150 connections open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    for i in 0..8 {
        let created = http
            .post(format!("{}/v1/entities/device", server.url))
            .bearer_auth("secret")
            .header("idempotency-key", format!("k{i}"))
            .json(&serde_json::json!({"id": format!("d{i}"), "data": {"n": i}}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i} failed under the flood: {e}"));
        assert_eq!(created.status(), 201);
        let got = http
            .get(format!("{}/v1/entities/device/d{i}", server.url))
            .bearer_auth("secret")
            .send()
            .await
            .unwrap_or_else(|e| panic!("read {i} failed under the flood: {e}"));
        assert_eq!(got.status(), 200);
    }
    // The real client may be done before the first header timeout fires:
    // wait (bounded) until the server has ended as many slow connections
    // as were opened, which only the timeout and the caps can do.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while flood.closed_by_server.load(Ordering::SeqCst) < SLOW
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak = flood.peak.load(Ordering::SeqCst);
    let closed = flood.closed_by_server.load(Ordering::SeqCst);
    flood.stop.store(true, Ordering::SeqCst);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("a slow client did not stop")
            .unwrap();
    }
    assert!(peak >= 150, "peak of open slow connections: {peak}");
    assert!(
        closed >= SLOW,
        "the server closed only {closed} slow connections"
    );
    eprintln!("slow connections: peak open {peak}, closed by the server {closed}");
}

/// Connections beyond the per-peer cap are closed at once, and a client
/// from another address is served meanwhile.
#[tokio::test]
async fn connections_beyond_the_per_peer_cap_are_closed_at_once() {
    let server = serve(&[
        "--max-connections-per-peer",
        "8",
        "--header-read-timeout",
        "60s",
    ])
    .await;
    let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut held = Vec::new();
    for _ in 0..8 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        let mut s = socket.connect(server.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    // Give the server the time to accept the eight before the ninth: a
    // request from another address is answered only after they were.
    let http = reqwest::Client::new();
    let health = http
        .get(format!("{}/healthz", server.url))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut ninth = socket.connect(server.addr).await.unwrap();
    let _ = ninth.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await;
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(10), ninth.read(&mut buf))
        .await
        .expect("the ninth connection from one address was not closed within 10 s");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the ninth connection was served: {:?}",
        read.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    // The eight held ones are still open: the server closed only the excess.
    for s in &mut held {
        s.write_all(b"\r\n").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no answer on a held connection")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }
}
