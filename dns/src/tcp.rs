//! DNS over TCP (RFC 7766): length-prefixed messages, several per
//! connection, full answers without truncation.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::answer::{self, Outcome};
use crate::index::Published;
use crate::metrics::{Proto, WorkerCounters};
use crate::slow::SlowPath;

/// Idle connections are closed after this long.
const IDLE: Duration = Duration::from_secs(10);
/// Most connections served at once.
const MAX_CONNECTIONS: usize = 256;

pub async fn serve(
    listener: TcpListener,
    published: Arc<Published>,
    slow: Arc<SlowPath>,
    counters: Arc<WorkerCounters>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue; // too many connections: close this one
        };
        let published = published.clone();
        let slow = slow.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &published, &slow, &counters).await {
                tracing::debug!(%peer, error = %e, "DNS TCP connection ended");
            }
            drop(permit);
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    published: &Published,
    slow: &SlowPath,
    counters: &WorkerCounters,
) -> std::io::Result<()> {
    let mut packet = vec![0u8; 65535];
    let mut out = vec![0u8; 65535 + 2];
    loop {
        let len = match tokio::time::timeout(IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            _ => return Ok(()),
        };
        match tokio::time::timeout(IDLE, stream.read_exact(&mut packet[..len])).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let index = published.load();
        let reply = match answer::answer(&packet[..len], &mut out[2..], &index, false) {
            Outcome::Reply { len, rcode, qtype } => {
                counters.request(Proto::Tcp, qtype);
                counters.response(rcode);
                Some(len)
            }
            Outcome::Slow => match slow.handle(&packet[..len], false).await {
                Some(bytes) if bytes.len() <= 65535 => {
                    out[2..2 + bytes.len()].copy_from_slice(&bytes);
                    Some(bytes.len())
                }
                _ => None,
            },
            Outcome::Drop(reason) => {
                counters.dropped(reason.into());
                None
            }
        };
        let Some(n) = reply else {
            return Ok(());
        };
        out[..2].copy_from_slice(&(n as u16).to_be_bytes());
        stream.write_all(&out[..2 + n]).await?;
    }
}
