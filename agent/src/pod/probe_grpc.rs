//! The gRPC probe: one `grpc.health.v1.Health/Check` call over HTTP/2
//! cleartext, as the kubelet makes it. The two messages are tiny, so they
//! are encoded by hand: the request holds the service name (field 1,
//! string), the answer its status (field 1, enum; `SERVING` is 1).

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

const PATH: &str = "/grpc.health.v1.Health/Check";
const SERVING: u64 = 1;
/// An answer larger than this is not a health response.
const MAX_ANSWER: usize = 4096;

/// Passes when the server at `addr` says `service` is `SERVING`.
pub async fn check(addr: SocketAddr, service: &str) -> Result<(), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| {
        format!("timeout: failed to connect service {addr} within the probe timeout: {e}")
    })?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("failed to connect service {addr}: {e}"))?;
    let driver = AbortOnDrop(tokio::spawn(connection));
    let request = http::Request::post(format!("http://{addr}{PATH}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, "kube-probe/1.33")
        .body(Full::new(frame(&encode_request(service))))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("health rpc to {addr} failed: {e}"))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!(
            "health rpc to {addr} failed: HTTP status {}",
            response.status()
        ));
    }
    // A trailers-only answer carries grpc-status in the headers.
    let head_status = grpc_status(response.headers());
    let collected = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| format!("health rpc to {addr} failed: {e}"))?;
    drop(driver);
    let status = collected
        .trailers()
        .and_then(grpc_status)
        .or(head_status)
        .ok_or_else(|| format!("health rpc to {addr} failed: no grpc-status"))?;
    if status.0 != 0 {
        return Err(format!(
            "rpc error: code = {} desc = {}",
            code_name(status.0),
            status.1
        ));
    }
    let answer = decode_status(&collected.to_bytes())
        .ok_or_else(|| format!("health rpc to {addr}: malformed answer"))?;
    if answer == SERVING {
        Ok(())
    } else {
        Err(format!(
            "service unhealthy (responded with {:?})",
            status_name(answer)
        ))
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `HealthCheckRequest { service }`: field 1, wire type 2.
fn encode_request(service: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        out.push(0x0a);
        put_varint(&mut out, service.len() as u64);
        out.extend_from_slice(service.as_bytes());
    }
    out
}

/// A gRPC message frame: uncompressed flag, length, message.
fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// The `status` of a framed `HealthCheckResponse`; an absent field is 0
/// (`UNKNOWN`), and unknown fields are skipped.
fn decode_status(body: &[u8]) -> Option<u64> {
    let (&compressed, rest) = body.split_first()?;
    if compressed != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let mut message = rest.get(4..4 + len)?;
    let mut status = 0;
    while !message.is_empty() {
        let key = take_varint(&mut message)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = take_varint(&mut message)?,
            (_, 0) => {
                take_varint(&mut message)?;
            }
            (_, 1) => message = message.get(8..)?,
            (_, 2) => {
                let n = usize::try_from(take_varint(&mut message)?).ok()?;
                message = message.get(n..)?;
            }
            (_, 5) => message = message.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn grpc_status(headers: &http::HeaderMap) -> Option<(u32, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    Some((code, message))
}

fn status_name(status: u64) -> &'static str {
    match status {
        0 => "UNKNOWN",
        1 => "SERVING",
        2 => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "INVALID",
    }
}

fn code_name(code: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    NAMES.get(code as usize).copied().unwrap_or("Unknown")
}

#[cfg(test)]
mod tests {
    //! Against a real hyper HTTP/2 server on a loopback socket that plays
    //! a gRPC health service.

    use std::convert::Infallible;

    use http_body_util::StreamBody;
    use hyper::body::{Frame, Incoming};
    use hyper::service::service_fn;

    use super::*;

    type Reply = http::Response<
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>,
    >;

    /// Answers per service name: "" and "web" serve, "db" does not,
    /// anything else is NOT_FOUND (trailers only), as grpc-go's server.
    async fn health(request: http::Request<Incoming>) -> Result<Reply, Infallible> {
        let path_ok = request.uri().path() == PATH
            && request
                .headers()
                .get("content-type")
                .is_some_and(|v| v == "application/grpc")
            && request.headers().get("te").is_some_and(|v| v == "trailers");
        let body = request
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let service = if body.len() >= 5 && body[0] == 0 {
            let mut message = &body[5..];
            if message.is_empty() {
                String::new()
            } else {
                let _key = take_varint(&mut message);
                let len = take_varint(&mut message).unwrap_or(0) as usize;
                String::from_utf8_lossy(&message[..len.min(message.len())]).into_owned()
            }
        } else {
            "?".into()
        };
        let mut frames = Vec::new();
        let mut trailers = http::HeaderMap::new();
        let mut builder = http::Response::builder().header("content-type", "application/grpc");
        match service.as_str() {
            _ if !path_ok => {
                builder = builder
                    .header("grpc-status", "12")
                    .header("grpc-message", "bad request");
            }
            "" | "web" | "db" => {
                let status: u8 = if service == "db" { 2 } else { 1 };
                // An unknown field first, to be skipped.
                frames.push(Ok(Frame::data(frame(&[0x10, 0x07, 0x08, status]))));
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                frames.push(Ok(Frame::trailers(trailers)));
            }
            _ => {
                builder = builder
                    .header("grpc-status", "5")
                    .header("grpc-message", "unknown service");
            }
        }
        Ok(builder
            .body(StreamBody::new(futures::stream::iter(frames)))
            .expect("a valid response"))
    }

    async fn server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service_fn(health)),
                );
            }
        });
        addr
    }

    #[tokio::test]
    async fn serving_services_pass_and_others_fail_with_the_reason() {
        let addr = server().await;
        check(addr, "").await.unwrap();
        check(addr, "web").await.unwrap();
        let down = check(addr, "db").await.unwrap_err();
        assert!(down.contains("NOT_SERVING"), "{down}");
        let unknown = check(addr, "nope").await.unwrap_err();
        assert!(
            unknown.contains("NotFound") && unknown.contains("unknown service"),
            "{unknown}"
        );
    }

    #[tokio::test]
    async fn a_closed_port_fails() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let error = check(addr, "").await.unwrap_err();
        assert!(error.contains("failed to connect"), "{error}");
    }

    #[test]
    fn messages_encode_and_decode() {
        assert_eq!(encode_request(""), Vec::<u8>::new());
        assert_eq!(encode_request("ab"), vec![0x0a, 2, b'a', b'b']);
        assert_eq!(decode_status(&frame(&[0x08, 1])), Some(1));
        assert_eq!(decode_status(&frame(&[])), Some(0));
        assert_eq!(decode_status(&frame(&[0x12, 1, b'x', 0x08, 2])), Some(2));
        assert_eq!(decode_status(&[1, 0, 0, 0, 0]), None, "compressed");
        assert_eq!(decode_status(&frame(&[0x08])), None, "truncated");
        assert_eq!(decode_status(&[0, 0, 0, 0, 9, 0x08]), None, "short");
    }
}
