//! HTTP/1.1 message heads for the fast path: what a parsed head says about
//! its framing and connection, the heads rewritten for the next hop, and a
//! streaming decoder that finds where a chunked body ends. All of it works
//! on `httparse`'s borrowed views and writes into caller-owned buffers, so
//! nothing here allocates per request.

use std::fmt::Write as _;

/// Headers accepted in one head; more get 431.
pub const MAX_HEADERS: usize = 128;
/// `Connection` tokens remembered per head; a head naming more goes the
/// generic way.
const MAX_TOKENS: usize = 8;

/// Headers meant for one hop only (besides those `Connection` names).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// A request head reduced to what the proxy acts on.
#[derive(Debug)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// Origin-form target, query included.
    pub target: &'a str,
    /// From the Host header, without port, not yet lower-cased.
    pub host: Option<&'a str>,
    pub framing: Framing,
    /// The client asked to close after this exchange.
    pub close: bool,
}

/// Why a request head is not taken by the fast path.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Malformed: answer 400 and close.
    Bad,
    /// Valid but unusual (HTTP/1.0, Upgrade, Expect, absolute-form, odd
    /// framing): leave it to the generic path.
    Generic,
}

/// Connection-level facts of a head: the tokens `Connection` names.
#[derive(Default)]
struct Tokens<'a> {
    named: [&'a str; MAX_TOKENS],
    len: usize,
    close: bool,
    upgrade: bool,
    overflow: bool,
}

impl<'a> Tokens<'a> {
    fn add(&mut self, value: &'a [u8]) {
        let Ok(value) = std::str::from_utf8(value) else {
            self.overflow = true;
            return;
        };
        for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if token.eq_ignore_ascii_case("close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case("upgrade") {
                self.upgrade = true;
            }
            if self.len == MAX_TOKENS {
                self.overflow = true;
                return;
            }
            self.named[self.len] = token;
            self.len += 1;
        }
    }

    fn names(&self, header: &str) -> bool {
        self.named[..self.len]
            .iter()
            .any(|t| t.eq_ignore_ascii_case(header))
    }
}

fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Reads what the proxy needs from a parsed request.
pub fn request<'a>(req: &httparse::Request<'_, 'a>) -> Result<RequestHead<'a>, Refusal> {
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Refusal::Bad);
    };
    if version != 1 || !target.starts_with('/') || method == "CONNECT" {
        return Err(Refusal::Generic);
    }
    let mut tokens = Tokens::default();
    let mut host = None;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(Refusal::Bad);
            }
            host = Some(host_without_port(h.value).ok_or(Refusal::Bad)?);
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(h.value).ok_or(Refusal::Bad)?;
            if length.is_some_and(|l| l != n) {
                return Err(Refusal::Bad);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if chunked || !final_coding_is_chunked(h.value) {
                return Err(Refusal::Generic);
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            tokens.add(h.value);
        } else if name.eq_ignore_ascii_case("upgrade") || name.eq_ignore_ascii_case("expect") {
            return Err(Refusal::Generic);
        }
    }
    if tokens.overflow || tokens.upgrade || (chunked && length.is_some()) {
        return Err(Refusal::Generic);
    }
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(0) | None) => Framing::None,
        (false, Some(n)) => Framing::Length(n),
    };
    Ok(RequestHead {
        method,
        target,
        host,
        framing,
        close: tokens.close,
    })
}

/// What the proxy adds to a request on its way upstream.
pub struct Forwarding<'a> {
    /// The client's address as text.
    pub client_ip: &'a [u8],
    pub https: bool,
    /// The host as routed (lower-case, without port).
    pub host: &'a str,
    /// `for=…;proto=…` for the `Forwarded` element.
    pub forwarded: &'a str,
}

/// Writes the request head for the upstream into `out`: the client's
/// headers without hop-by-hop ones, framing kept as received, and the
/// `X-Forwarded-*` and `Forwarded` headers extended with this hop.
pub fn write_request(
    out: &mut Vec<u8>,
    req: &httparse::Request<'_, '_>,
    head: &RequestHead<'_>,
    target: &str,
    fwd: &Forwarding<'_>,
) {
    let mut tokens = Tokens::default();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            tokens.add(h.value);
        }
    }
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    out.extend_from_slice(b"x-forwarded-for: ");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("x-forwarded-for") {
            out.extend_from_slice(h.value);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(fwd.client_ip);
    out.extend_from_slice(b"\r\nforwarded: ");
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("forwarded") {
            out.extend_from_slice(h.value);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(fwd.forwarded.as_bytes());
    out.extend_from_slice(b";host=\"");
    out.extend_from_slice(fwd.host.as_bytes());
    out.extend_from_slice(b"\"\r\nx-forwarded-proto: ");
    out.extend_from_slice(if fwd.https { b"https" } else { b"http" });
    out.extend_from_slice(b"\r\nx-forwarded-host: ");
    out.extend_from_slice(fwd.host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("transfer-encoding") && head.framing == Framing::Chunked {
            // The body is passed on in the encoding it came in.
        } else if is_hop_by_hop(name)
            || tokens.names(name)
            || name.eq_ignore_ascii_case("x-forwarded-for")
            || name.eq_ignore_ascii_case("x-forwarded-proto")
            || name.eq_ignore_ascii_case("x-forwarded-host")
            || name.eq_ignore_ascii_case("forwarded")
        {
            continue;
        }
        write_header(out, name, h.value);
    }
    out.extend_from_slice(b"\r\n");
}

/// A response head reduced to what the proxy acts on.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub framing: Framing,
    /// The upstream connection can carry another request afterwards.
    pub reusable: bool,
}

/// Why an upstream response cannot be passed on.
#[derive(Debug, PartialEq, Eq)]
pub struct BadResponse;

/// Reads a parsed response; `head_request` and the status decide whether
/// a body follows at all.
pub fn response(
    resp: &httparse::Response<'_, '_>,
    head_request: bool,
) -> Result<ResponseHead, BadResponse> {
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(BadResponse);
    };
    let mut tokens = Tokens::default();
    let mut length: Option<u64> = None;
    let mut coding = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_length(h.value).ok_or(BadResponse)?;
            if length.is_some_and(|l| l != n) {
                return Err(BadResponse);
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if coding.is_some() {
                return Err(BadResponse);
            }
            coding = Some(final_coding_is_chunked(h.value));
        } else if h.name.eq_ignore_ascii_case("connection") {
            tokens.add(h.value);
        }
    }
    let no_body = head_request || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = match (no_body, coding, length) {
        (true, ..) => Framing::None,
        (false, Some(true), _) => Framing::Chunked,
        (false, Some(false), _) | (false, None, None) => Framing::UntilClose,
        (false, None, Some(0)) => Framing::None,
        (false, None, Some(n)) => Framing::Length(n),
    };
    let keep_alive = if version == 1 { !tokens.close } else { false };
    Ok(ResponseHead {
        status,
        framing,
        reusable: keep_alive && framing != Framing::UntilClose && !tokens.upgrade,
    })
}

/// Writes the response head for the client: the upstream's headers
/// without hop-by-hop ones (a transfer coding passed on unchanged stays
/// declared), and `connection: close` when this is the last exchange.
pub fn write_response(
    out: &mut Vec<u8>,
    resp: &httparse::Response<'_, '_>,
    head: &ResponseHead,
    close: bool,
) {
    let mut tokens = Tokens::default();
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            tokens.add(h.value);
        }
    }
    let _ = write!(Fmt(out), "HTTP/1.1 {:03} ", head.status);
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let name = h.name;
        let keep_coding = name.eq_ignore_ascii_case("transfer-encoding")
            && matches!(head.framing, Framing::Chunked | Framing::UntilClose);
        if !keep_coding && (is_hop_by_hop(name) || tokens.names(name)) {
            continue;
        }
        // With a transfer coding, a length would only mislead.
        if head.framing == Framing::Chunked && name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        write_header(out, name, h.value);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A short answer of the proxy's own.
pub fn write_local(
    out: &mut Vec<u8>,
    status: u16,
    text: &str,
    location: Option<&str>,
    head_request: bool,
    close: bool,
) {
    let _ = write!(
        Fmt(out),
        "HTTP/1.1 {status:03} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
        reason(status),
        text.len()
    );
    if let Some(location) = location {
        write_header(out, "location", location.as_bytes());
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_request {
        out.extend_from_slice(text.as_bytes());
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        308 => "Permanent Redirect",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

fn write_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `fmt::Write` into a byte buffer, for numbers.
struct Fmt<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Fmt<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    value.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn final_coding_is_chunked(value: &[u8]) -> bool {
    std::str::from_utf8(value).is_ok_and(|v| {
        v.rsplit(',')
            .next()
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
    })
}

/// The host of a Host header value: without port, IPv6 without brackets.
/// `None` when empty or not visible ASCII.
pub fn host_without_port(value: &[u8]) -> Option<&str> {
    if !value.iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let value = std::str::from_utf8(value).ok()?;
    if let Some(v6) = value.strip_prefix('[') {
        return v6.split(']').next().filter(|h| !h.is_empty());
    }
    let host = value.rsplit_once(':').map_or(value, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            value
        }
    });
    (!host.is_empty()).then_some(host)
}

/// Finds where a chunked body ends while its bytes stream past, checking
/// the framing (sizes, CRLFs, trailers) without copying anything.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    size: u64,
    last: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// The first hex digit of a size.
    #[default]
    SizeStart,
    Size,
    /// Whitespace after the size, before `;` or CR.
    SizeSpace,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// The start of a trailer line, or the final CRLF.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

#[derive(Debug, PartialEq, Eq)]
pub struct BadChunk;

impl Chunked {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Takes in the next bytes of the body; returns how many belong to it
    /// (all of them unless the body ends within `data`).
    pub fn advance(&mut self, data: &[u8]) -> Result<usize, BadChunk> {
        use ChunkState::*;
        let mut i = 0;
        while i < data.len() && self.state != Done {
            if self.state == Data {
                let take = self.size.min((data.len() - i) as u64);
                self.size -= take;
                i += take as usize;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = data[i];
            i += 1;
            self.state = match (self.state, b) {
                (SizeStart | Size, b) if b.is_ascii_hexdigit() => {
                    let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(digit))
                        .ok_or(BadChunk)?;
                    Size
                }
                (Size | SizeSpace, b' ' | b'\t') => SizeSpace,
                (Size | SizeSpace, b';') => Extension,
                (Size | SizeSpace | Extension, b'\r') => SizeLf,
                (Extension, b) if b != b'\n' => Extension,
                (SizeLf, b'\n') => {
                    if self.size == 0 {
                        self.last = true;
                        TrailerStart
                    } else {
                        Data
                    }
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => SizeStart,
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart | Trailer, b) if b != b'\r' && b != b'\n' => Trailer,
                (Trailer, b'\r') => TrailerLf,
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => Done,
                _ => return Err(BadChunk),
            };
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_request(raw: &[u8]) -> (Vec<u8>, Result<usize, String>) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(raw) {
            Ok(httparse::Status::Complete(n)) => {
                let head = match request(&req) {
                    Ok(h) => h,
                    Err(e) => return (Vec::new(), Err(format!("{e:?}"))),
                };
                let mut out = Vec::new();
                let host = head.host.unwrap_or("").to_ascii_lowercase();
                write_request(
                    &mut out,
                    &req,
                    &head,
                    head.target,
                    &Forwarding {
                        client_ip: b"10.1.2.3",
                        https: false,
                        host: &host,
                        forwarded: "for=10.1.2.3;proto=http",
                    },
                );
                (out, Ok(n))
            }
            Ok(httparse::Status::Partial) => (Vec::new(), Err("partial".into())),
            Err(e) => (Vec::new(), Err(e.to_string())),
        }
    }

    #[test]
    fn request_framing() {
        let framing = |raw: &[u8]| {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            req.parse(raw).expect("parses");
            request(&req).map(|h| (h.framing, h.close))
        };
        assert_eq!(
            framing(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok((Framing::None, false))
        );
        assert_eq!(
            framing(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nConnection: close\r\n\r\n"
            ),
            Ok((Framing::Length(12), true))
        );
        assert_eq!(
            framing(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Ok((Framing::Chunked, false))
        );
        assert_eq!(
            framing(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
            ),
            Err(Refusal::Bad)
        );
        assert_eq!(
            framing(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"),
            Err(Refusal::Bad)
        );
        assert_eq!(
            framing(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            Err(Refusal::Bad)
        );
        for generic in [
            &b"GET / HTTP/1.0\r\nHost: a\r\n\r\n"[..],
            b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            assert_eq!(framing(generic).err(), Some(Refusal::Generic));
        }
    }

    #[test]
    fn request_rewritten_for_upstream() {
        let (out, n) = parse_request(
            b"GET /x?y HTTP/1.1\r\nHost: A.example:8080\r\nX-Forwarded-For: 1.1.1.1\r\n\
              Connection: keep-alive, x-private\r\nX-Private: secret\r\nTE: trailers\r\n\
              X-Forwarded-Proto: https\r\nForwarded: for=1.1.1.1\r\nAccept: */*\r\n\r\n",
        );
        assert!(n.is_ok());
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("GET /x?y HTTP/1.1\r\n"), "{out}");
        assert!(
            out.contains("x-forwarded-for: 1.1.1.1, 10.1.2.3\r\n"),
            "{out}"
        );
        assert!(out.contains("x-forwarded-proto: http\r\n"), "{out}");
        assert!(!out.contains("X-Forwarded-Proto"), "{out}");
        assert!(out.contains("x-forwarded-host: a.example\r\n"), "{out}");
        assert!(
            out.contains("forwarded: for=1.1.1.1, for=10.1.2.3;proto=http;host=\"a.example\"\r\n"),
            "{out}"
        );
        assert!(out.contains("Host: A.example:8080\r\n"), "{out}");
        assert!(out.contains("Accept: */*\r\n"), "{out}");
        for gone in ["X-Private", "Connection", "TE:"] {
            assert!(!out.contains(gone), "{gone} in {out}");
        }
        assert!(out.ends_with("\r\n\r\n"));

        let (out, _) =
            parse_request(b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n");
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("Transfer-Encoding: chunked\r\n"), "{out}");
        assert!(out.contains("x-forwarded-for: 10.1.2.3\r\n"), "{out}");
    }

    #[test]
    fn host_forms() {
        assert_eq!(host_without_port(b"a.example:80"), Some("a.example"));
        assert_eq!(host_without_port(b"[::1]:80"), Some("::1"));
        assert_eq!(host_without_port(b"a"), Some("a"));
        assert_eq!(host_without_port(b""), None);
        assert_eq!(host_without_port(b"a b"), None);
    }

    fn parse_response(
        raw: &[u8],
        head_request: bool,
    ) -> Result<(ResponseHead, String), BadResponse> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(raw).expect("parses");
        let head = response(&resp, head_request)?;
        let mut out = Vec::new();
        write_response(&mut out, &resp, &head, false);
        Ok((head, String::from_utf8(out).unwrap()))
    }

    #[test]
    fn response_framing_and_reuse() {
        let (h, out) = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok",
            false,
        )
        .unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Length(2), true));
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n");
        let (h, out) = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Chunked, false));
        assert!(out.contains("Transfer-Encoding: chunked\r\n"), "{out}");
        let (h, _) = parse_response(b"HTTP/1.0 200 OK\r\n\r\n", false).unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::UntilClose, false));
        let (h, _) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::None, true));
        let (h, _) = parse_response(b"HTTP/1.1 304 Not Modified\r\n\r\n", false).unwrap();
        assert_eq!(h.framing, Framing::None);
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
                false
            )
            .is_err()
        );
    }

    #[test]
    fn local_answers() {
        let mut out = Vec::new();
        write_local(&mut out, 404, "nope\n", None, false, true);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 404 Not Found\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: 5\r\nconnection: close\r\n\r\nnope\n"
        );
        let mut out = Vec::new();
        write_local(&mut out, 308, "", Some("https://a/"), true, false);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("location: https://a/\r\n")
        );
    }

    #[test]
    fn chunked_end_found_in_any_split() {
        let body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n";
        let mut next = body.to_vec();
        next.extend_from_slice(b"GET / HTTP/1.1\r\n");
        for split in 0..next.len() {
            let mut c = Chunked::default();
            let a = c.advance(&next[..split]).unwrap();
            assert_eq!(a, split.min(body.len()));
            let b = c.advance(&next[a..]).unwrap();
            assert!(c.is_done(), "split {split}");
            assert_eq!(a + b, body.len(), "split {split}");
        }
        let mut c = Chunked::default();
        assert_eq!(c.advance(b"0\r\n\r\n"), Ok(5));
        assert!(c.is_done());
        // Byte at a time.
        let mut c = Chunked::default();
        for b in body {
            assert_eq!(c.advance(&[*b]), Ok(1));
        }
        assert!(c.is_done());
    }

    #[test]
    fn bad_chunks_are_errors() {
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"5\nhello",
            b"fffffffffffffffff0\r\n",
            b"0\r\n\n",
            b"\r\n",
        ] {
            assert_eq!(Chunked::default().advance(bad), Err(BadChunk), "{bad:?}");
        }
    }

    /// Whatever arrives, parsing and decoding answer without panicking.
    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(9);
        let alphabet =
            b"GETPOST /HTTP1.0\r\n:;,chunkedContent-Length0123456789abcdefHost \t\x00\xff";
        for _ in 0..20_000 {
            let len = rng.usize(0..200);
            let raw: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect();
            let _ = parse_request(&raw);
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut resp = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(_)) = resp.parse(&raw)
                && let Ok(head) = response(&resp, false)
            {
                write_response(&mut Vec::new(), &resp, &head, true);
            }
            let _ = Chunked::default().advance(&raw);
        }
    }
}
