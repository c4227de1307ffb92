//! A test upstream DNS server, for the names cluster DNS forwards:
//! `www.example.org` A 192.0.2.80, anything else NXDOMAIN. Hand-encoded
//! so the tests do not share code with the server they check.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use anyhow::{Context, ensure};

/// The address `www.example.org` has at the test upstream.
pub const EXAMPLE_ORG: &str = "192.0.2.80";

/// Serves on `bind` (UDP), inside network namespace `netns` when given
/// (its thread enters it; the rest of the test stays out), until the
/// test process ends. Returns the address bound.
pub fn start(bind: &str, netns: Option<&str>) -> anyhow::Result<SocketAddr> {
    let (bound, bound_rx) = std::sync::mpsc::channel();
    let bind = bind.to_owned();
    let netns = netns.map(|n| format!("/run/netns/{n}"));
    std::thread::spawn(move || {
        let socket = (|| {
            if let Some(path) = &netns {
                let ns = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
                // SAFETY: setns on a file descriptor we own; it moves only
                // this thread into the namespace.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                ensure!(rc == 0, "setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(UdpSocket::bind(&bind)?)
        })();
        let socket = match socket.and_then(|s| Ok((s.local_addr()?, s))) {
            Ok((addr, socket)) => {
                let _ = bound.send(Ok(addr));
                socket
            }
            Err(e) => {
                let _ = bound.send(Err(e));
                return;
            }
        };
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            // Header, then the question as sent (up to its end).
            let mut end = 12;
            while end < n && buf[end] != 0 {
                end += 1 + usize::from(buf[end]);
            }
            let qend = (end + 5).min(n);
            let name = String::from_utf8_lossy(&buf[12..end.min(n)]).to_ascii_lowercase();
            let known = name.contains("www") && name.contains("example") && name.contains("org");
            let mut out = buf[..qend].to_vec();
            out[2] = 0x81; // QR, RD
            out[3] = if known { 0x80 } else { 0x83 }; // RA, NOERROR / NXDOMAIN
            out[6..12].copy_from_slice(&[0, u8::from(known), 0, 0, 0, 0]);
            if known {
                out.extend([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 80]);
            }
            let _ = socket.send_to(&out, from);
        }
    });
    bound_rx.recv().context("the upstream thread ended")?
}
