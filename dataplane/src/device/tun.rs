//! The TUN device, opened with `IFF_VNET_HDR` and TSO/checksum offload so
//! that the kernel hands over whole TCP super-packets (up to 64 KiB, with a
//! virtio-net header saying how to segment them) and accepts them back the
//! same way; and with `IFF_MULTI_QUEUE`, one queue per worker, so flows
//! spread over cores.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};

use tun_rs::{DeviceBuilder, SyncDevice};

/// One queue of the TUN device; every queue sees every packet of the flows
/// the kernel hashes to it.
pub struct Queue {
    device: SyncDevice,
}

/// Creates the device `name` with `queues` queues, up, with `mtu`. The
/// device lives as long as one of its queues is open.
pub fn create(name: &str, mtu: u16, queues: usize) -> io::Result<Vec<Queue>> {
    let queues = queues.max(1);
    let first = DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .offload(true)
        .multi_queue(queues > 1)
        .enable(true)
        .build_sync()?;
    if !first.tcp_gso() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the TUN device refused IFF_VNET_HDR offloads",
        ));
    }
    let mut all = Vec::with_capacity(queues);
    for _ in 1..queues {
        let queue = first.try_clone()?;
        queue.set_nonblocking(true)?;
        all.push(Queue { device: queue });
    }
    first.set_nonblocking(true)?;
    all.insert(0, Queue { device: first });
    Ok(all)
}

impl Queue {
    /// Reads one packet (virtio-net header first); `Ok(None)` when none is
    /// waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.device.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one packet gathered from `parts`, the first of which starts
    /// with the virtio-net header.
    pub fn write(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        self.device.send_vectored(parts)
    }
}

impl AsRawFd for Queue {
    fn as_raw_fd(&self) -> RawFd {
        self.device.as_raw_fd()
    }
}
