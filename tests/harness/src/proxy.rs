//! A TCP proxy in front of nats-server whose link can be cut and restored, or throttled: a
//! client behind it (an agent) loses its connection, or gets the server's bytes at a trickle,
//! while the server and everyone else keep running.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Largest read the proxy forwards at once.
const BUFFER: usize = 16 * 1024;
/// A throttled direction forwards a read about this often, so the rate holds over short spans
/// and a change of rate applies within about this long.
const TICK: Duration = Duration::from_millis(50);

pub struct Proxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    rate: watch::Sender<Option<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let open = Arc::new(AtomicBool::new(true));
        let (cut, _) = watch::channel(0u64);
        let (rate, _) = watch::channel(None::<u64>);
        let (accepting, cuts, rates) = (open.clone(), cut.clone(), rate.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    drop(client); // refused while cut
                    continue;
                }
                let mut cut = cuts.subscribe();
                let rate = rates.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (from_client, to_client) = client.into_split();
                    let (from_server, to_server) = server.into_split();
                    let up = forward(from_client, to_server, None);
                    let down = forward(from_server, to_client, Some(rate));
                    tokio::select! {
                        _ = async { tokio::try_join!(up, down) } => {}
                        _ = cut.changed() => {} // both ends dropped: the link is cut
                    }
                });
            }
        });
        Ok(Proxy {
            addr,
            open,
            cut,
            rate,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Drops every connection through the proxy and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Limits what the server sends to its clients to `bytes_per_second` on every connection
    /// through the proxy, open or future (what a congested or malicious mirror does: it
    /// trickles); `Some(0)` stalls that direction, `None` lifts the limit. Takes effect on open
    /// connections at once. Clients' bytes to the server always pass unhindered.
    pub fn throttle(&self, bytes_per_second: Option<u64>) {
        self.rate.send_replace(bytes_per_second);
    }
}

/// Copies `from` to `to` until end of file (then shuts `to` down for writing, as
/// `copy_bidirectional` does), keeping to the rate in `rate` if any.
async fn forward(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut rate: Option<watch::Receiver<Option<u64>>>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let limit = rate.as_mut().and_then(|r| *r.borrow_and_update());
        if limit == Some(0) {
            // Stalled: nothing moves until the rate changes (or the proxy is gone).
            if let Some(r) = rate.as_mut()
                && r.changed().await.is_err()
            {
                return Ok(());
            }
            continue;
        }
        // Reads of about one tick's worth of bytes, then a pause of as long as they take at
        // the rate: never more than the rate, whatever the reads return.
        let size = limit.map_or(BUFFER, |r| {
            (r as u128 * TICK.as_millis() / 1000).clamp(1, BUFFER as u128) as usize
        });
        let n = from.read(&mut buf[..size]).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        if let (Some(r), Some(bytes_per_second)) = (rate.as_mut(), limit) {
            let pause = Duration::from_secs_f64(n as f64 / bytes_per_second as f64);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                // A new rate (a lifted throttle) applies at once. Gone: the connection ends.
                changed = r.changed() => if changed.is_err() { return Ok(()) },
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
