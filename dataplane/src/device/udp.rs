//! The underlay UDP socket: large buffers, UDP GSO (`UDP_SEGMENT`) so one
//! send hands the kernel a whole train of equal-sized datagrams, UDP GRO so
//! one receive returns such a train, and `sendmmsg`/`recvmmsg` so a batch of
//! trains costs one system call. The batches are allocated once; sending
//! and receiving allocate nothing.

use std::io::{self, IoSlice};
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, SockFlag, SockType, SockaddrStorage, setsockopt, sockopt,
};

/// Receive buffer of one message: the largest UDP payload GRO can build.
pub const MAX_MESSAGE: usize = 65_536;
/// Most iovecs of one outgoing message (header + fragment pairs).
pub const MAX_PARTS: usize = 130;

pub struct Options {
    /// Share the port with the other workers' sockets (`SO_REUSEPORT`).
    pub reuse_port: bool,
    /// Ask for coalesced datagrams (`UDP_GRO`).
    pub gro: bool,
    /// Split every send into datagrams of this many bytes (`UDP_SEGMENT`).
    pub segment: Option<u16>,
    /// Send and receive buffer size in bytes.
    pub buffer: usize,
}

pub struct UdpSocket {
    fd: OwnedFd,
}

impl UdpSocket {
    pub fn bind(addr: SocketAddr, options: &Options) -> io::Result<Self> {
        let family = match addr {
            SocketAddr::V4(_) => AddressFamily::Inet,
            SocketAddr::V6(_) => AddressFamily::Inet6,
        };
        let fd = socket::socket(
            family,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        if options.reuse_port {
            setsockopt(&fd, sockopt::ReusePort, &true)?;
        }
        // The *Force variants pass net.core.{r,w}mem_max, which defaults
        // far below what a 10 Gbit/s stream needs; they need CAP_NET_ADMIN,
        // so fall back to the capped ones.
        if setsockopt(&fd, sockopt::RcvBufForce, &options.buffer).is_err() {
            setsockopt(&fd, sockopt::RcvBuf, &options.buffer)?;
        }
        if setsockopt(&fd, sockopt::SndBufForce, &options.buffer).is_err() {
            setsockopt(&fd, sockopt::SndBuf, &options.buffer)?;
        }
        if options.gro {
            setsockopt(&fd, sockopt::UdpGroSegment, &true)?;
        }
        if let Some(segment) = options.segment {
            setsockopt(&fd, sockopt::UdpGsoSegment, &i32::from(segment))?;
        }
        socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
        Ok(UdpSocket { fd })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        let addr: SockaddrStorage = socket::getsockname(self.fd.as_raw_fd())?;
        from_storage(&addr).ok_or_else(|| io::Error::other("socket has no IP address"))
    }
}

impl AsRawFd for UdpSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// One received message: a datagram, or with GRO a train of datagrams of
/// `segment` bytes each (the last may be shorter).
pub struct Received<'a> {
    pub from: Option<SocketAddr>,
    pub data: &'a [u8],
    pub segment: usize,
    /// The message did not fit the buffer; `data` is incomplete.
    pub truncated: bool,
}

/// Preallocated `recvmmsg` state for up to `capacity` messages.
pub struct RecvBatch {
    buffers: Vec<u8>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    controls: Vec<[u64; 8]>,
    msgs: Vec<libc::mmsghdr>,
    len: usize,
}

// SAFETY: the raw pointers in `msgs` and `iovs` point only into the
// batch's own heap buffers, which move with it.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let mut batch = RecvBatch {
            buffers: vec![0; capacity * MAX_MESSAGE],
            // SAFETY: all-zero iovec, sockaddr_storage and mmsghdr are
            // valid (null pointers, zero lengths).
            iovs: vec![unsafe { mem::zeroed() }; capacity],
            addrs: vec![unsafe { mem::zeroed() }; capacity],
            controls: vec![[0; 8]; capacity],
            msgs: vec![unsafe { mem::zeroed() }; capacity],
            len: 0,
        };
        for i in 0..capacity {
            batch.iovs[i] = libc::iovec {
                iov_base: batch.buffers[i * MAX_MESSAGE..].as_mut_ptr().cast(),
                iov_len: MAX_MESSAGE,
            };
            let hdr = &mut batch.msgs[i].msg_hdr;
            hdr.msg_iov = &mut batch.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_name = (&mut batch.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_control = batch.controls[i].as_mut_ptr().cast();
        }
        batch
    }

    /// Receives as many messages as are waiting, up to the capacity;
    /// `Ok(0)` when none are.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        for (msg, control) in self.msgs.iter_mut().zip(&self.controls) {
            msg.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msg.msg_hdr.msg_controllen = mem::size_of_val(control) as _;
            msg.msg_hdr.msg_flags = 0;
            msg.msg_len = 0;
        }
        // SAFETY: every header points at live buffers of the stated sizes.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                self.msgs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            self.len = 0;
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(err),
            };
        }
        self.len = n as usize;
        Ok(self.len)
    }

    pub fn get(&self, i: usize) -> Option<Received<'_>> {
        if i >= self.len {
            return None;
        }
        let msg = &self.msgs[i];
        let len = (msg.msg_len as usize).min(MAX_MESSAGE);
        let data = &self.buffers[i * MAX_MESSAGE..i * MAX_MESSAGE + len];
        let segment = gro_segment(&msg.msg_hdr).unwrap_or(len);
        Some(Received {
            from: sockaddr(&self.addrs[i], msg.msg_hdr.msg_namelen),
            data,
            segment: segment.max(1),
            truncated: msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        })
    }
}

/// Preallocated `sendmmsg` state: messages made of up to [`MAX_PARTS`]
/// slices each, sent together by [`SendBatch::flush`]. Each message has
/// its own GSO segment size (a `UDP_SEGMENT` control message), so trains
/// of different datagram sizes share one system call.
pub struct SendBatch {
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    controls: Vec<[u64; 4]>,
    msgs: Vec<libc::mmsghdr>,
    /// Bytes and datagrams of each queued message.
    sizes: Vec<(usize, usize)>,
    len: usize,
}

/// What one [`SendBatch::flush`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    /// `sendmmsg` calls.
    pub calls: usize,
    /// Messages the kernel refused.
    pub skipped: usize,
    pub bytes: usize,
    pub datagrams: usize,
}

// SAFETY: see `RecvBatch`; the slices a message points at belong to the
// caller, who promised (`push`) to keep them until `flush`.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        SendBatch {
            // SAFETY: as in `RecvBatch::new`.
            iovs: vec![unsafe { mem::zeroed() }; capacity * MAX_PARTS],
            addrs: vec![unsafe { mem::zeroed() }; capacity],
            controls: vec![[0; 4]; capacity],
            msgs: vec![unsafe { mem::zeroed() }; capacity],
            sizes: vec![(0, 0); capacity],
            len: 0,
        }
    }

    pub fn is_full(&self) -> bool {
        self.len == self.msgs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues one message to `to` made of `parts`, which the kernel cuts
    /// into datagrams of `segment` bytes (the last may be shorter). Returns
    /// `false` (and queues nothing) when the batch is full or there are too
    /// many parts.
    ///
    /// # Safety
    /// The memory behind `parts` must stay valid and unchanged until the
    /// next [`SendBatch::flush`] or [`SendBatch::clear`].
    pub unsafe fn push(&mut self, to: SocketAddr, parts: &[IoSlice<'_>], segment: usize) -> bool {
        if self.is_full() || parts.len() > MAX_PARTS {
            return false;
        }
        let i = self.len;
        let iovs = &mut self.iovs[i * MAX_PARTS..i * MAX_PARTS + parts.len()];
        let mut bytes = 0;
        for (iov, part) in iovs.iter_mut().zip(parts) {
            *iov = libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            };
            bytes += part.len();
        }
        let segment = segment.clamp(1, usize::from(u16::MAX));
        let namelen = write_sockaddr(&mut self.addrs[i], to);
        let hdr = &mut self.msgs[i].msg_hdr;
        hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
        hdr.msg_namelen = namelen;
        hdr.msg_iov = iovs.as_mut_ptr();
        hdr.msg_iovlen = parts.len() as _;
        if bytes > segment {
            hdr.msg_control = self.controls[i].as_mut_ptr().cast();
            // SAFETY: the control buffer has room for one cmsg of a u16
            // (CMSG_SPACE(2) = 24 bytes on 64-bit Linux).
            unsafe {
                hdr.msg_controllen = libc::CMSG_SPACE(mem::size_of::<u16>() as u32) as _;
                let cmsg = libc::CMSG_FIRSTHDR(hdr);
                (*cmsg).cmsg_level = libc::SOL_UDP;
                (*cmsg).cmsg_type = libc::UDP_SEGMENT;
                (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment as u16);
            }
        } else {
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
        }
        self.sizes[i] = (bytes, bytes.div_ceil(segment).max(1));
        self.len += 1;
        true
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Sends every queued message. A message the kernel refuses (no route,
    /// too big) is skipped; when the socket buffer is full it waits for
    /// room.
    pub fn flush(&mut self, socket: &UdpSocket) -> Sent {
        let mut sent = Sent::default();
        let mut done = 0;
        while done < self.len {
            // SAFETY: headers `done..len` were filled by `push`, whose
            // caller keeps their slices alive until now.
            let n = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    self.msgs[done..].as_mut_ptr(),
                    (self.len - done) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            sent.calls += 1;
            if n > 0 {
                for &(bytes, datagrams) in &self.sizes[done..done + n as usize] {
                    sent.bytes += bytes;
                    sent.datagrams += datagrams;
                }
                done += n as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => wait_writable(socket, Duration::from_millis(100)),
                _ => {
                    tracing::trace!(error = %err, "underlay send failed");
                    done += 1;
                    sent.skipped += 1;
                }
            }
        }
        self.len = 0;
        sent
    }
}

fn wait_writable(socket: &UdpSocket, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
}

/// The GRO segment size from a received message's control data.
fn gro_segment(hdr: &libc::msghdr) -> Option<usize> {
    // SAFETY: the kernel filled `msg_control` up to `msg_controllen`; the
    // CMSG_* macros stay inside it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                let value = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                return usize::try_from(value).ok().filter(|&v| v > 0);
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    None
}

fn sockaddr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(storage.ss_family) {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn write_sockaddr(storage: &mut libc::sockaddr_storage, addr: SocketAddr) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // socket address.
            let sin = unsafe { &mut *(storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            };
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_flowinfo = v6.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: v6.ip().octets(),
            };
            sin6.sin6_scope_id = v6.scope_id();
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

fn from_storage(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::new(v4.ip(), v4.port())));
    }
    addr.as_sockaddr_in6().map(|v6| {
        SocketAddr::V6(SocketAddrV6::new(
            v6.ip(),
            v6.port(),
            v6.flowinfo(),
            v6.scope_id(),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            reuse_port: false,
            gro: true,
            segment: Some(100),
            buffer: 1 << 20,
        }
    }

    #[test]
    fn gso_train_arrives_as_one_gro_message() {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let rx = UdpSocket::bind(loopback, &options()).unwrap();
        let tx = UdpSocket::bind(loopback, &options()).unwrap();
        let to = rx.local_addr().unwrap();
        let payload = vec![7u8; 250];
        let mut batch = SendBatch::new(4);
        // SAFETY: `payload` outlives the flush below.
        unsafe {
            assert!(batch.push(
                to,
                &[IoSlice::new(&payload[..50]), IoSlice::new(&payload[50..])],
                100,
            ));
            assert!(batch.push(to, &[IoSlice::new(&payload[..30])], 100));
        }
        let sent = batch.flush(&tx);
        assert_eq!((sent.skipped, sent.bytes, sent.datagrams), (0, 280, 4));
        let mut recv = RecvBatch::new(4);
        let mut sizes = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sizes.iter().sum::<usize>() < 280 && std::time::Instant::now() < deadline {
            let n = recv.recv(&rx).unwrap();
            for i in 0..n {
                let m = recv.get(i).unwrap();
                assert_eq!(m.from, Some(tx.local_addr().unwrap()));
                assert!(!m.truncated);
                assert!(m.segment <= 100);
                sizes.push(m.data.len());
            }
        }
        // 250 bytes in 100-byte datagrams plus one of 30, however GRO
        // grouped them.
        assert_eq!(sizes.iter().sum::<usize>(), 280);
    }
}
