//! The two programs, assembled by hand (little-endian `struct bpf_insn`),
//! and the layouts of the maps they share with `SocketBalancer`.
//!
//! `connect4` runs in `connect()` of every IPv4 socket in the node's pod
//! cgroup. For a TCP socket whose destination is a Service frontend
//! (cluster IP and port) it picks an endpoint at random, rewrites the
//! destination, and remembers the frontend under the socket's cookie.
//! `getpeername4` gives the frontend back to `getpeername()`, so the
//! application still sees the address it dialled.
//!
//! ```text
//! services: (ip, port, slot 0) -> endpoint count, connections so far
//!           (ip, port, slot k) -> endpoint k (1..=count): ip, port
//! peers:    socket cookie      -> frontend ip, port     (LRU)
//! ```
//!
//! Addresses and ports are in network order in both maps, as the context
//! (`struct bpf_sock_addr`) carries them; counts and slots in host order.

use std::net::Ipv4Addr;

/// Offsets in `struct bpf_sock_addr`.
const CTX_USER_IP4: i16 = 4;
const CTX_USER_PORT: i16 = 24;
const CTX_PROTOCOL: i16 = 36;

const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_MAP_UPDATE: i32 = 2;
const HELPER_PRANDOM_U32: i32 = 7;
const HELPER_GET_SOCKET_COOKIE: i32 = 46;
const IPPROTO_TCP: i32 = 6;

/// Size of both maps' keys, and of a `peers` value.
pub const ENTRY: u32 = 8;
/// Size of a `services` value: slot 0 has a 64-bit counter at offset 8.
pub const SERVICE_VALUE: u32 = 16;

/// A `services` key: frontend and slot (0 for the count).
pub fn service_key(ip: Ipv4Addr, port: u16, slot: u16) -> [u8; 8] {
    let mut key = [0u8; 8];
    key[..4].copy_from_slice(&ip.octets());
    key[4..6].copy_from_slice(&port.to_be_bytes());
    key[6..].copy_from_slice(&slot.to_ne_bytes());
    key
}

/// A `services` value in slot 0 (the connection counter starts at 0).
pub fn count_value(count: u16) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..4].copy_from_slice(&u32::from(count).to_ne_bytes());
    value
}

/// The connection counter of a slot-0 value.
pub fn connections(value: &[u8; 16]) -> u64 {
    let mut counter = [0u8; 8];
    counter.copy_from_slice(&value[8..]);
    u64::from_ne_bytes(counter)
}

/// A `services` value in slots 1..=count.
pub fn endpoint_value(ip: Ipv4Addr, port: u16) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..4].copy_from_slice(&ip.octets());
    value[4..6].copy_from_slice(&port.to_be_bytes());
    value
}

/// The `connect()` program over the maps open at these descriptors.
pub fn connect4(services: i32, peers: i32) -> Vec<u64> {
    let mut a = Asm::default();
    a.mov_reg(6, 1);
    a.load(Size::W, 2, 6, CTX_PROTOCOL);
    a.jump_if_not(2, IPPROTO_TCP, Label::Allow);
    // The key (ip, port, slot 0) at fp-8.
    a.load(Size::W, 2, 6, CTX_USER_IP4);
    a.store_reg(Size::W, 10, -8, 2);
    a.load(Size::W, 2, 6, CTX_USER_PORT);
    a.store_reg(Size::H, 10, -4, 2);
    a.store_imm(Size::H, 10, -2, 0);
    a.lookup(services, -8);
    a.jump_if(0, 0, Label::Allow);
    a.load(Size::W, 7, 0, 0);
    a.jump_if(7, 0, Label::Allow);
    a.raw(0xb7, 1, 0, 0, 1); // r1 = 1
    a.raw(0xdb, 0, 1, 8, 0); // lock *(u64 *)(r0 + 8) += r1: one more connection
    // slot = random % count + 1
    a.call(HELPER_PRANDOM_U32);
    a.raw(0x9c, 0, 7, 0, 0); // w0 %= w7
    a.raw(0x07, 0, 0, 0, 1); // r0 += 1
    a.store_reg(Size::H, 10, -2, 0);
    a.lookup(services, -8);
    a.jump_if(0, 0, Label::Allow);
    a.set_address_from_r0();
    // peers[cookie] = (ip, port, 0): the key at fp-8 with its slot zeroed.
    a.store_imm(Size::H, 10, -2, 0);
    a.mov_reg(1, 6);
    a.call(HELPER_GET_SOCKET_COOKIE);
    a.store_reg(Size::DW, 10, -16, 0);
    a.map_fd(1, peers);
    a.stack_pointer(2, -16);
    a.stack_pointer(3, -8);
    a.raw(0xb7, 4, 0, 0, 0); // r4 = BPF_ANY
    a.call(HELPER_MAP_UPDATE);
    a.label(Label::Allow);
    a.raw(0xb7, 0, 0, 0, 1); // r0 = 1: let the call go on
    a.raw(0x95, 0, 0, 0, 0);
    a.finish()
}

/// The `getpeername()` program over the `peers` map.
pub fn getpeername4(peers: i32) -> Vec<u64> {
    let mut a = Asm::default();
    a.mov_reg(6, 1);
    a.call(HELPER_GET_SOCKET_COOKIE);
    a.store_reg(Size::DW, 10, -8, 0);
    a.lookup(peers, -8);
    a.jump_if(0, 0, Label::Allow);
    a.set_address_from_r0();
    a.label(Label::Allow);
    a.raw(0xb7, 0, 0, 0, 1);
    a.raw(0x95, 0, 0, 0, 0);
    a.finish()
}

#[derive(Clone, Copy)]
enum Size {
    W = 0x00,
    H = 0x08,
    DW = 0x18,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    Allow,
}

/// Instructions with forward jumps to one label, patched at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<u64>,
    /// (index of a jump, its target)
    jumps: Vec<(usize, Label)>,
    allow: Option<usize>,
}

impl Asm {
    fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        let insn = u64::from(code)
            | u64::from(dst | (src << 4)) << 8
            | u64::from(off as u16) << 16
            | u64::from(imm as u32) << 32;
        self.insns.push(insn);
    }

    fn mov_reg(&mut self, dst: u8, src: u8) {
        self.raw(0xbf, dst, src, 0, 0);
    }

    /// `dst = *(size *)(src + off)`
    fn load(&mut self, size: Size, dst: u8, src: u8, off: i16) {
        self.raw(0x61 | size as u8, dst, src, off, 0);
    }

    /// `*(size *)(dst + off) = src`
    fn store_reg(&mut self, size: Size, dst: u8, off: i16, src: u8) {
        self.raw(0x63 | size as u8, dst, src, off, 0);
    }

    /// `*(size *)(dst + off) = imm`
    fn store_imm(&mut self, size: Size, dst: u8, off: i16, imm: i32) {
        self.raw(0x62 | size as u8, dst, 0, off, imm);
    }

    fn call(&mut self, helper: i32) {
        self.raw(0x85, 0, 0, 0, helper);
    }

    /// `dst = fp + off`
    fn stack_pointer(&mut self, dst: u8, off: i32) {
        self.mov_reg(dst, 10);
        self.raw(0x07, dst, 0, 0, off);
    }

    /// A 64-bit load of the map open at `fd` (`BPF_PSEUDO_MAP_FD`).
    fn map_fd(&mut self, dst: u8, fd: i32) {
        self.raw(0x18, dst, 1, 0, fd);
        self.raw(0, 0, 0, 0, 0);
    }

    /// `r0 = lookup(map, fp + key)`
    fn lookup(&mut self, map: i32, key: i32) {
        self.map_fd(1, map);
        self.stack_pointer(2, key);
        self.call(HELPER_MAP_LOOKUP);
    }

    /// The context's address and port (r6) from a map value's first six
    /// bytes (r0): ip, then port, both in network order.
    fn set_address_from_r0(&mut self) {
        self.load(Size::W, 2, 0, 0);
        self.store_reg(Size::W, 6, CTX_USER_IP4, 2);
        self.load(Size::H, 2, 0, 4);
        self.store_reg(Size::W, 6, CTX_USER_PORT, 2);
    }

    /// `if dst == imm goto label`
    fn jump_if(&mut self, dst: u8, imm: i32, label: Label) {
        self.jumps.push((self.insns.len(), label));
        self.raw(0x15, dst, 0, 0, imm);
    }

    /// `if dst != imm goto label`
    fn jump_if_not(&mut self, dst: u8, imm: i32, label: Label) {
        self.jumps.push((self.insns.len(), label));
        self.raw(0x55, dst, 0, 0, imm);
    }

    fn label(&mut self, label: Label) {
        match label {
            Label::Allow => self.allow = Some(self.insns.len()),
        }
    }

    fn finish(mut self) -> Vec<u64> {
        let target = self.allow.unwrap_or(self.insns.len());
        for (at, Label::Allow) in std::mem::take(&mut self.jumps) {
            let off = (target as i64 - at as i64 - 1) as i16;
            let insn = &mut self.insns[at];
            *insn = (*insn & !(0xffff << 16)) | u64::from(off as u16) << 16;
        }
        self.insns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_the_exit_pair() {
        let insns = connect4(3, 4);
        let exit = insns.len() - 2;
        for (at, insn) in insns.iter().enumerate() {
            let code = (insn & 0xff) as u8;
            if code == 0x15 || code == 0x55 {
                let off = ((insn >> 16) & 0xffff) as u16 as i16;
                assert_eq!(at as i64 + 1 + i64::from(off), exit as i64);
            }
        }
        assert_eq!(insns[exit + 1] & 0xff, 0x95);
    }

    #[test]
    fn keys_and_values_keep_network_order() {
        let key = service_key(Ipv4Addr::new(10, 43, 0, 7), 8080, 3);
        assert_eq!(&key[..6], &[10, 43, 0, 7, 0x1f, 0x90]);
        assert_eq!(u16::from_ne_bytes([key[6], key[7]]), 3);
        let value = endpoint_value(Ipv4Addr::new(10, 42, 1, 5), 80);
        assert_eq!(value[..8], [10, 42, 1, 5, 0, 80, 0, 0]);
        assert_eq!(value[8..], [0; 8]);
        let count = count_value(2);
        assert_eq!(
            u32::from_ne_bytes([count[0], count[1], count[2], count[3]]),
            2
        );
        assert_eq!(connections(&count), 0);
    }
}
