//! Device I/O: the TUN device the kernel routes pod traffic into, and the
//! UDP socket that carries it between nodes. Both are set up for bulk:
//! a TUN read returns a whole TCP super-packet, a UDP send or receive moves
//! many datagrams at once.

pub mod tun;
pub mod udp;
