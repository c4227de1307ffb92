//! UDP workers: one thread and one `SO_REUSEPORT` socket each, reading and
//! writing in batches with `recvmmsg`/`sendmmsg` (answers for one client
//! grouped, see [`send`]). All buffers are allocated once per worker; a
//! query costs no allocation and no lock unless it leaves for the slow
//! path.

mod send;

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::sync::mpsc;

use crate::answer::{self, MIN_OUT, Outcome};
use crate::index::{Published, Reader};
use crate::metrics::{DropReason, Metrics, Proto, WorkerCounters};

const BATCH: usize = 64;
/// Queries larger than this are dropped as oversized: real queries are
/// tiny, and a DNS query over UDP has no business being bigger.
const RECV_BUF: usize = 4096;
/// How often a blocked worker looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(200);
/// After answering a batch that did not fill up, a worker waits this long
/// and then takes everything that arrived meanwhile, rather than sleeping
/// on the socket and waking for every single query: under load a wakeup
/// costs more CPU than the answer (interrupt moderation, in software). It
/// delays answers by at most this much under load; a query reaching an
/// idle worker is answered at once. A loaded worker spends most of its
/// CPU in the kernel (perf: 87 %), and each batch costs a receive, a
/// send, a sleep and two context switches: at the bench's 150,000-200,000
/// queries/s, 30-40 queries arrive in 200 µs. Bigger bursts of answers
/// also spare the client wakeups: dnsperf (on its own core) switched
/// contexts 6,800 times a second against Skiff at 200 µs, 13,900 at
/// 100 µs and 36,000 against unbound, for the same QPS or more.
const COALESCE: Duration = Duration::from_micros(200);
/// Timer slack for the coalescing sleep (the default, 50 µs, would more
/// than double it).
const COALESCE_SLACK_NS: libc::c_ulong = 5_000;

/// A query for the slow path and where its answer goes.
pub struct SlowJob {
    pub packet: Vec<u8>,
    pub from: SocketAddr,
    pub socket: Arc<Socket>,
}

/// Binds `workers` sockets on `addr` and starts a thread for each. Binding
/// errors come back before any thread starts.
pub fn spawn(
    addr: SocketAddr,
    workers: usize,
    published: &Arc<Published>,
    slow: mpsc::Sender<SlowJob>,
    metrics: &Arc<Metrics>,
    stop: &Arc<AtomicBool>,
) -> io::Result<Vec<JoinHandle<()>>> {
    let workers = workers.max(1);
    let sockets = (0..workers)
        .map(|_| bind(addr, workers > 1))
        .collect::<io::Result<Vec<_>>>()?;
    let mut handles = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let mut worker = Worker {
            socket: Arc::new(socket),
            reader: published.reader(),
            slow: slow.clone(),
            counters: metrics.worker(),
            stop: stop.clone(),
            gso: true,
        };
        let handle = std::thread::Builder::new()
            .name(format!("dns-udp-{i}"))
            .spawn(move || worker.run())?;
        handles.push(handle);
    }
    Ok(handles)
}

/// One worker's socket; `shared` when several workers bind `addr`.
fn bind(addr: SocketAddr, shared: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // A lone socket stays out of a reuseport group: the kernel then finds
    // it without hashing each query's addresses to pick a group member,
    // work that loopback clients pay on their own CPU (measured with the
    // bench's dnsperf: about 2-3 % less of its CPU per query).
    if shared {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Room for bursts while a worker is busy; failure here is harmless.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.set_read_timeout(Some(STOP_POLL))?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

struct Worker {
    socket: Arc<Socket>,
    reader: Reader,
    slow: mpsc::Sender<SlowJob>,
    counters: Arc<WorkerCounters>,
    stop: Arc<AtomicBool>,
    /// Whether answers for one client may leave as one segmented send.
    gso: bool,
}

/// The batch's buffers and the kernel structures pointing into them.
/// Boxed so the pointers stay valid.
struct Batch {
    recv: Vec<[u8; RECV_BUF]>,
    send: Vec<[u8; MIN_OUT]>,
    addrs: Vec<libc::sockaddr_storage>,
    recv_iov: Vec<libc::iovec>,
    recv_hdrs: Vec<libc::mmsghdr>,
    /// Each answer's bytes and the index of the query (and address) it
    /// answers, in the order answered.
    answer_iov: Vec<libc::iovec>,
    answer_to: Vec<usize>,
    /// The answers as sent: grouped per message.
    send_iov: Vec<libc::iovec>,
    send_hdrs: Vec<libc::mmsghdr>,
    controls: Vec<send::SegmentControl>,
}

impl Batch {
    fn new() -> Box<Batch> {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let zeroed_storage =
            unsafe { MaybeUninit::<libc::sockaddr_storage>::zeroed().assume_init() };
        let zeroed_hdr = unsafe { MaybeUninit::<libc::mmsghdr>::zeroed().assume_init() };
        let iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut b = Box::new(Batch {
            recv: vec![[0; RECV_BUF]; BATCH],
            send: vec![[0; MIN_OUT]; BATCH],
            addrs: vec![zeroed_storage; BATCH],
            recv_iov: vec![iov; BATCH],
            recv_hdrs: vec![zeroed_hdr; BATCH],
            answer_iov: vec![iov; BATCH],
            answer_to: vec![0; BATCH],
            send_iov: vec![iov; BATCH],
            send_hdrs: vec![zeroed_hdr; BATCH],
            controls: vec![[0; 3]; BATCH],
        });
        for i in 0..BATCH {
            b.recv_iov[i] = libc::iovec {
                iov_base: b.recv[i].as_mut_ptr().cast(),
                iov_len: RECV_BUF,
            };
        }
        b
    }

    /// Resets the receive headers before each `recvmmsg`.
    fn arm(&mut self) {
        for i in 0..BATCH {
            let hdr = &mut self.recv_hdrs[i].msg_hdr;
            hdr.msg_name = (&raw mut self.addrs[i]).cast();
            hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &raw mut self.recv_iov[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
            self.recv_hdrs[i].msg_len = 0;
        }
    }
}

impl Worker {
    fn run(&mut self) {
        let mut batch = Batch::new();
        let fd = self.socket.as_raw_fd();
        // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, COALESCE_SLACK_NS, 0, 0, 0) };
        // Whether the last receive found queries, so more are likely.
        let mut busy = false;
        while !self.stop.load(Ordering::Relaxed) {
            batch.arm();
            let flags = if busy {
                libc::MSG_DONTWAIT
            } else {
                libc::MSG_WAITFORONE
            };
            // SAFETY: the headers point into `batch`, which outlives the call.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    batch.recv_hdrs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    flags,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                // Nothing waiting, a timeout (stop check), EINTR or a
                // transient error: block next time. An idle worker lets go
                // of an old snapshot of the index.
                busy = false;
                self.reader.current();
                continue;
            }
            let n = n as usize;
            let queued = self.answer_batch(&mut batch, n);
            let messages = batch.plan(queued, self.gso);
            send::send(fd, &mut batch.send_hdrs[..messages], &mut self.gso);
            busy = true;
            if n < BATCH {
                std::thread::sleep(COALESCE);
            }
        }
    }

    /// Answers the `n` received packets; returns how many answers are
    /// ready (in `answer_iov` and `answer_to`).
    fn answer_batch(&mut self, b: &mut Batch, n: usize) -> usize {
        let index = self.reader.current();
        let mut queued = 0;
        for i in 0..n {
            let hdr = b.recv_hdrs[i];
            if hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.counters.dropped(DropReason::Oversized);
                continue;
            }
            let len = (hdr.msg_len as usize).min(RECV_BUF);
            let packet = &b.recv[i][..len];
            match answer::answer(packet, &mut b.send[queued], index, true) {
                Outcome::Reply { len, rcode, qtype } => {
                    self.counters.request(Proto::Udp, qtype);
                    self.counters.response(rcode);
                    b.answer_iov[queued] = libc::iovec {
                        iov_base: b.send[queued].as_mut_ptr().cast(),
                        iov_len: len,
                    };
                    b.answer_to[queued] = i;
                    queued += 1;
                }
                Outcome::Slow => {
                    let from = sockaddr(&b.addrs[i], hdr.msg_hdr.msg_namelen);
                    let Some(from) = from else { continue };
                    let job = SlowJob {
                        packet: packet.to_vec(),
                        from,
                        socket: self.socket.clone(),
                    };
                    if self.slow.try_send(job).is_err() {
                        self.counters.dropped(DropReason::Overload);
                    }
                }
                Outcome::Drop(reason) => self.counters.dropped(reason.into()),
            }
        }
        queued
    }
}

fn sockaddr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: `storage` was filled by the kernel with `len` valid bytes.
    let addr = unsafe {
        SockAddr::new(
            std::ptr::read((storage as *const libc::sockaddr_storage).cast()),
            len,
        )
    };
    addr.as_socket()
}
