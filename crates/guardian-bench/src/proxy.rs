//! A loopback TCP proxy that counts what passes through it.
//!
//! Placed between a client and the reference server, it measures bytes sent
//! each way and connections opened without touching either side's code, and
//! records when the first byte of the first request arrived (the end of the
//! "process start to first request" measurement).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Debug, Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    connections: AtomicU64,
    first_byte: Mutex<Option<Instant>>,
}

/// A running counting proxy; stops accepting when dropped.
#[derive(Debug)]
pub struct CountingProxy {
    addr: SocketAddr,
    counters: Arc<Counters>,
    accept: JoinHandle<()>,
}

/// Counts read from a [`CountingProxy`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes from clients to the upstream (requests: headers and bodies).
    pub bytes_up: u64,
    /// Bytes from the upstream back to clients.
    pub bytes_down: u64,
    /// TCP connections accepted.
    pub connections: u64,
}

impl CountingProxy {
    /// Listens on an ephemeral loopback port and forwards every connection
    /// to `upstream`. Must be called inside a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                c.connections.fetch_add(1, Ordering::Relaxed);
                let c = c.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        pump_pair(client, server, &c).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            counters,
            accept,
        })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, for HTTP clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Traffic so far.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            bytes_up: self.counters.up.load(Ordering::Relaxed),
            bytes_down: self.counters.down.load(Ordering::Relaxed),
            connections: self.counters.connections.load(Ordering::Relaxed),
        }
    }

    /// When the first byte from any client arrived, if one has.
    pub fn first_byte_at(&self) -> Option<Instant> {
        *self
            .counters
            .first_byte
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Zeroes the counters and forgets the first byte (between measurements).
    pub fn reset(&self) {
        self.counters.up.store(0, Ordering::Relaxed);
        self.counters.down.store(0, Ordering::Relaxed);
        self.counters.connections.store(0, Ordering::Relaxed);
        *self
            .counters
            .first_byte
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pump_pair(client: TcpStream, server: TcpStream, c: &Counters) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            {
                let mut first = c.first_byte.lock().unwrap_or_else(PoisonError::into_inner);
                if first.is_none() {
                    *first = Some(Instant::now());
                }
            }
            c.up.fetch_add(n as u64, Ordering::Relaxed);
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            c.down.fetch_add(n as u64, Ordering::Relaxed);
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forwards_and_counts() {
        // An echo server as the upstream.
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(b"pong!!").await.unwrap();
        });
        let proxy = CountingProxy::start(up_addr).await.unwrap();
        assert!(proxy.first_byte_at().is_none());
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"ping!").await.unwrap();
        let mut got = [0u8; 6];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong!!");
        let t = proxy.traffic();
        assert_eq!((t.bytes_up, t.bytes_down, t.connections), (5, 6, 1));
        assert!(proxy.first_byte_at().is_some());
        assert!(proxy.url().starts_with("http://127.0.0.1:"));
        proxy.reset();
        assert_eq!(proxy.traffic(), Traffic::default());
        assert!(proxy.first_byte_at().is_none());
    }
}
