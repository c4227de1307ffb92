//! Forwarding names outside the cluster to the node's upstream resolvers
//! (CoreDNS's `forward` plugin): UDP first, TCP when the answer is
//! truncated, the next upstream on timeout.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::metrics::Metrics;

/// How long one upstream gets before the next is tried.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads `nameserver` lines from a resolv.conf. Port 53 unless the address
/// is written `[addr]:port` or `addr:port` (a test convenience).
pub fn read_resolv_conf(path: &Path) -> std::io::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path)?;
    Ok(parse_resolv_conf(&text))
}

pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let addr = words.next()?;
            addr.parse::<SocketAddr>().ok().or_else(|| {
                addr.parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            })
        })
        .collect()
}

/// Asks the upstreams in turn for `query` (name, type, class) and returns
/// their answer, or `None` when none answered.
pub async fn resolve(
    upstreams: &[SocketAddr],
    query: &Query,
    metrics: &Metrics,
) -> Option<Message> {
    for upstream in upstreams {
        let to = upstream.to_string();
        metrics
            .forward_requests
            .get_or_create(&vec![("to", to.clone())])
            .inc();
        let started = Instant::now();
        let result = tokio::time::timeout(UPSTREAM_TIMEOUT, exchange(*upstream, query)).await;
        match result {
            Ok(Ok(answer)) => {
                let rcode = answer.metadata.response_code.to_string();
                let labels = vec![("to", to), ("rcode", rcode)];
                metrics.forward_responses.get_or_create(&labels).inc();
                metrics
                    .forward_duration
                    .get_or_create(&labels)
                    .observe(started.elapsed().as_secs_f64());
                return Some(answer);
            }
            Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "upstream failed"),
            Err(_) => tracing::debug!(%upstream, "upstream timed out"),
        }
    }
    None
}

#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("encoding: {0}")]
    Encode(#[from] hickory_proto::ProtoError),
    #[error("bad answer: {0}")]
    Decode(#[from] hickory_proto::serialize::binary::DecodeError),
    #[error("the answer does not match the question")]
    Mismatch,
}

async fn exchange(upstream: SocketAddr, query: &Query) -> Result<Message, ExchangeError> {
    let id: u16 = rand_id();
    let mut request = Message::new(id, MessageType::Query, OpCode::Query);
    request.metadata.recursion_desired = true;
    request.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(crate::wire::MAX_UDP_PAYLOAD);
    request.set_edns(edns);
    let bytes = request.to_vec()?;

    let bind: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|_| ExchangeError::Mismatch)?
    } else {
        "[::]:0".parse().map_err(|_| ExchangeError::Mismatch)?
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    socket.send(&bytes).await?;
    let mut buf = vec![0u8; 65535];
    let answer = loop {
        let n = socket.recv(&mut buf).await?;
        // Ignore stray packets; only our ID and question count.
        if let Ok(answer) = Message::from_vec(&buf[..n])
            && answer.metadata.id == id
            && answer.queries.first() == Some(query)
        {
            break answer;
        }
    };
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    let mut stream = TcpStream::connect(upstream).await?;
    let len = u16::try_from(bytes.len()).map_err(|_| ExchangeError::Mismatch)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed).await?;
    let len = usize::from(stream.read_u16().await?);
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    let answer = Message::from_vec(&buf)?;
    if answer.metadata.id != id || answer.queries.first() != Some(query) {
        return Err(ExchangeError::Mismatch);
    }
    Ok(answer)
}

/// A query ID that an off-path attacker cannot guess.
fn rand_id() -> u16 {
    let mut bytes = [0u8; 2];
    if getrandom(&mut bytes) {
        u16::from_be_bytes(bytes)
    } else {
        // No entropy source: still vary it.
        (Instant::now().elapsed().subsec_nanos() & 0xffff) as u16
    }
}

fn getrandom(buf: &mut [u8]) -> bool {
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    n == buf.len() as isize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameservers() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver 127.0.0.5:5353\nnameserver ::1\nnameserver bogus\noptions ndots:5\n";
        let addrs = parse_resolv_conf(text);
        assert_eq!(
            addrs,
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "127.0.0.5:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
            ]
        );
    }
}
