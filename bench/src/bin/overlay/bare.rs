//! A reference: a bare TUN forwarder between the same two nodes.
//!
//! It does only what every TUN overlay must do, with the same offloads as
//! Skiff's (TUN TSO through the virtio-net header, UDP GSO and GRO), from
//! the same device code: per super-packet one TUN read and one UDP send
//! out, one UDP receive and one TUN write in. It parses, checks and counts
//! nothing, and carries a super-packet whole as one GSO train, so a lost
//! datagram loses the whole super-packet (Skiff sends a self-contained TCP
//! segment per datagram so that TCP recovers from a loss normally). The gap
//! between it and Skiff is what Skiff's own work costs. It is not a hard
//! bound: one thread per node does not spread many streams over cores, and
//! sleeping between packets costs latency.
//!
//! One thread per node, sleeping in `poll` between packets; or, for the
//! latency of a forwarder that never sleeps, busy-polling
//! (`Bare::busy_poll`), at the cost of a whole core per node.

use std::io::IoSlice;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use anyhow::Context;
use dataplane::device::tun::{self, Queue};
use dataplane::device::udp::{Options, RecvBatch, SendBatch, UdpSocket};
use dataplane::wire::overlay::MAX_PAYLOAD;
use skiff_e2e::cluster::{Cluster, POD_MTU};
use skiff_e2e::netns::{self, Netns};

const DEVICE: &str = "bare0";
const PORT: u16 = 4790;
/// Datagram size of a GSO train: the underlay MTU minus IPv4 and UDP.
const SEGMENT: usize = 1472;
/// Largest super-packet the pods build and the device takes: with its
/// virtio-net header it must fit one UDP send (65,507 bytes).
const MAX_SUPER_PACKET: &str = "63000";
/// Received messages handled per `recvmmsg`.
const BATCH: usize = 8;

/// The forwarders of both nodes; stopped when dropped.
pub struct Bare {
    control: Arc<Control>,
    threads: Vec<JoinHandle<anyhow::Result<()>>>,
    pub pods: Vec<Netns>,
}

/// What the bench tells the forwarder threads.
#[derive(Default)]
struct Control {
    stop: AtomicBool,
    spin: AtomicBool,
}

/// Pod address on node `node` (1-based) behind the bare forwarder.
pub fn pod_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, node as u8, 2)
}

impl Bare {
    /// Starts a forwarder in each of the cluster's two nodes, with a pod
    /// bridge and one pod in 10.202.N.0/24 on each.
    pub fn start(cluster: &Cluster) -> anyhow::Result<Bare> {
        let control = Arc::new(Control::default());
        let mut bare = Bare {
            control: control.clone(),
            threads: Vec::new(),
            pods: Vec::new(),
        };
        for (i, j) in [(0usize, 1usize), (1, 0)] {
            let node = cluster.node(i);
            let local = SocketAddr::new(node.underlay_ip.into(), PORT);
            let peer = SocketAddr::new(cluster.node(j).underlay_ip.into(), PORT);
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let name = node.netns.name().to_owned();
            let control = control.clone();
            bare.threads.push(std::thread::spawn(move || {
                netns::enter(&name, || forward(local, peer, &control, ready_tx))?
            }));
            ready_rx
                .recv()
                .context("the bare forwarder stopped before its device was up")??;
            let (n, m) = (i + 1, j + 1);
            let netns = &node.netns;
            netns.ip(&["link", "set", DEVICE, "gso_max_size", MAX_SUPER_PACKET])?;
            netns.ip(&["route", "add", &format!("10.202.{m}.0/24"), "dev", DEVICE])?;
            let pod = super::add_bridged_pod(
                cluster,
                netns,
                &format!("bf{n}"),
                "bfbr",
                pod_ip(n),
                MAX_SUPER_PACKET,
            )?;
            bare.pods.push(pod);
        }
        Ok(bare)
    }

    /// Whether the forwarders poll without sleeping.
    pub fn busy_poll(&self, on: bool) {
        self.control.spin.store(on, Ordering::Relaxed);
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            match thread.join() {
                Ok(Err(e)) => eprintln!("bare forwarder: {e:#}"),
                Err(_) => eprintln!("bare forwarder panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// The packet loop of one node, until stopped.
fn forward(
    local: SocketAddr,
    peer: SocketAddr,
    control: &Control,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let opened = tun::create(DEVICE, POD_MTU, 1)
        .context("creating the bare forwarder's TUN device")
        .and_then(|mut queues| queues.pop().context("no TUN queue"))
        .and_then(|queue| {
            let options = Options {
                reuse_port: false,
                gro: true,
                segment: None,
                buffer: 4 << 20,
            };
            let socket = UdpSocket::bind(local, &options).context("binding the bare forwarder")?;
            Ok((queue, socket))
        });
    let (queue, socket) = match opened {
        Ok(opened) => {
            let _ = ready.send(Ok(()));
            opened
        }
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("{e:#}")));
            return Err(e);
        }
    };
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let mut send = SendBatch::new(1);
    let mut recv = RecvBatch::new(BATCH);
    let mut fds = [
        libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&queue),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&socket),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    while !control.stop.load(Ordering::Relaxed) {
        let timeout = if control.spin.load(Ordering::Relaxed) {
            0
        } else {
            100
        };
        // SAFETY: two valid pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) } <= 0 {
            continue;
        }
        while let Some(len) = queue.read(&mut buf)? {
            // SAFETY: `buf` is not touched again before the flush below.
            if unsafe { send.push(peer, &[IoSlice::new(&buf[..len])], SEGMENT) } {
                send.flush(&socket);
            }
        }
        to_device(&queue, &socket, &mut recv)?;
    }
    Ok(())
}

/// Writes every waiting message to the device as it came.
fn to_device(queue: &Queue, socket: &UdpSocket, recv: &mut RecvBatch) -> anyhow::Result<()> {
    loop {
        let received = recv.recv(socket)?;
        if received == 0 {
            return Ok(());
        }
        for message in (0..received).filter_map(|i| recv.get(i)) {
            // A refused write (a packet the kernel finds malformed) is
            // dropped, as a NIC would.
            let _ = queue.write(&[IoSlice::new(message.data)]);
        }
    }
}
