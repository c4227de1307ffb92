//! Sends [`Op`]s to the kernel's nf_tables as one netlink batch, the way
//! `nft` does after it has parsed a script, but without reading the
//! table back first. The kernel applies a batch whole or not at all.
//!
//! Message shapes follow `linux/netfilter/nf_tables.h`: every message is
//! a netlink header, a `nfgenmsg` (family, version, resource id) and
//! attributes; a rule's expressions are nested `expr` attributes, each a
//! name and its own attributes. Registers are the 16-byte `NFT_REG_1..`,
//! as `nft` writes them, so `nft list` shows these rules as it would
//! show its own.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, setsockopt, socket,
    sockopt,
};

use super::rules::{Frontend, Op, TABLE};
use crate::service::Protocol;

/// Why the kernel did not take a batch.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netfilter netlink socket: {0}")]
    Socket(io::Error),
    #[error("the kernel refused `{op}`: {errno}")]
    Refused { op: String, errno: Errno },
    #[error("the kernel refused the batch: {0}")]
    Batch(Errno),
    #[error("no answer from the kernel")]
    NoAnswer,
}

/// Applies `ops` in one transaction.
pub fn apply(ops: &[Op]) -> Result<(), Error> {
    if ops.is_empty() {
        return Ok(());
    }
    let mut batch = Batch::default();
    batch.control(BATCH_BEGIN);
    for (i, op) in ops.iter().enumerate() {
        encode(&mut batch, op, i + 1 == ops.len());
    }
    let acknowledged = batch.last_seq;
    batch.control(BATCH_END);
    let socket = Socket::open(batch.buf.len())?;
    socket.send(&batch.buf)?;
    socket.outcome(acknowledged, |seq| {
        // Sequence numbers start at 1 for the batch header, so op `i` is
        // message `i + 2`.
        seq.checked_sub(2)
            .and_then(|i| ops.get(i as usize))
            .map(ToString::to_string)
    })
}

/// Packets counted so far by each named counter of the table (the new
/// flows of each Service port chain): one dump, whatever the table holds.
pub fn counters() -> Result<BTreeMap<String, u64>, Error> {
    let mut request = Batch::default();
    let start = request.message(NFT_MSG_GETOBJ, NLM_F_DUMP);
    request.string(ATTR_TABLE, TABLE);
    request.be32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
    request.finish(start);
    let socket = Socket::open(request.buf.len())?;
    socket.send(&request.buf)?;
    let mut counters = BTreeMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket.receive(&mut buf)?;
        for (kind, body) in messages(&buf[..n]) {
            match kind {
                NLMSG_DONE => return Ok(counters),
                NLMSG_ERROR => match error_of(body) {
                    Some((errno, _)) if errno != 0 => {
                        return Err(Error::Batch(Errno::from_raw(-errno)));
                    }
                    _ => {}
                },
                k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ => {
                    // After the nfgenmsg: the object's attributes.
                    if let Some((name, packets)) = body.get(4..).and_then(counter) {
                        counters.insert(name, packets);
                    }
                }
                _ => {}
            }
        }
    }
}

// --- constants from linux/netlink.h and linux/netfilter/nf_tables.h ---

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_APPEND: u16 = 0x800;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
/// An attribute type without its nested and byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const BATCH_BEGIN: u16 = 0x10;
const BATCH_END: u16 = 0x11;
const NFPROTO_IPV4: u8 = 2;

const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_GETOBJ: u16 = 19;
const NFT_MSG_DELOBJ: u16 = 20;

/// `NFTA_CHAIN_*`, `NFTA_RULE_*`, `NFTA_OBJ_*`: the table comes first.
const ATTR_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;

const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_GOTO: i32 = -4;

const NFT_REG_1: u32 = 1;
const NFT_REG_2: u32 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_NG_DREG: u16 = 1;
const NFTA_NG_MODULUS: u16 = 2;
const NFTA_NG_TYPE: u16 = 3;
const NFTA_NG_OFFSET: u16 = 4;
const NFT_NG_RANDOM: u32 = 1;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_NAT_TYPE: u16 = 1;
const NFTA_NAT_FAMILY: u16 = 2;
const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
const NFTA_NAT_FLAGS: u16 = 7;
const NFT_NAT_DNAT: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
const NFTA_OBJREF_IMM_TYPE: u16 = 1;
const NFTA_OBJREF_IMM_NAME: u16 = 2;

/// The map and set names of the skeleton (`rules::skeleton`).
const HAIRPIN_SET: &str = "hairpin";

// --- encoding ---

/// Netlink messages back to back, each with its own sequence number.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    last_seq: u32,
}

impl Batch {
    /// The batch begin and end markers, addressed to nf_tables.
    fn control(&mut self, kind: u16) {
        let start = self.header(kind, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        self.finish(start);
    }

    /// Starts an nf_tables message in the `ip` family; returns where it
    /// starts, for [`Batch::finish`].
    fn message(&mut self, kind: u16, flags: u16) -> usize {
        self.header(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | flags,
            NFPROTO_IPV4,
            0,
        )
    }

    fn header(&mut self, kind: u16, flags: u16, family: u8, resource: u16) -> usize {
        let start = self.buf.len();
        self.last_seq += 1;
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.last_seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        self.buf.extend_from_slice(&[family, 0]); // nfgenmsg: family, version 0
        self.buf.extend_from_slice(&resource.to_be_bytes());
        start
    }

    fn finish(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr(&mut self, kind: u16, value: &[u8]) {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    /// A NUL-terminated string, as the kernel's policies expect.
    fn string(&mut self, kind: u16, value: &str) {
        let len = 4 + value.len() + 1;
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn be32(&mut self, kind: u16, value: u32) {
        self.attr(kind, &value.to_be_bytes());
    }

    fn nest(&mut self, kind: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn end_nest(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// `NFTA_DATA_VALUE` nested in attribute `kind`.
    fn value(&mut self, kind: u16, value: &[u8]) {
        let nest = self.nest(kind);
        self.attr(NFTA_DATA_VALUE, value);
        self.end_nest(nest);
    }

    /// One expression of a rule: its name, then its attributes from `body`.
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Batch)) {
        let elem = self.nest(NFTA_LIST_ELEM);
        self.string(NFTA_EXPR_NAME, name);
        let data = self.nest(NFTA_EXPR_DATA);
        body(self);
        self.end_nest(data);
        self.end_nest(elem);
    }
}

fn encode(batch: &mut Batch, op: &Op, last: bool) {
    let ack = if last { NLM_F_ACK } else { 0 };
    match op {
        Op::AddChain(chain) | Op::DeleteChain(chain) => {
            let kind = match op {
                Op::AddChain(_) => NFT_MSG_NEWCHAIN,
                _ => NFT_MSG_DELCHAIN,
            };
            let flags = if kind == NFT_MSG_NEWCHAIN {
                NLM_F_CREATE
            } else {
                0
            };
            let start = batch.message(kind, flags | ack);
            batch.string(ATTR_TABLE, TABLE);
            batch.string(NFTA_CHAIN_NAME, chain);
            batch.finish(start);
        }
        Op::AddCounter(name) => {
            let start = batch.message(NFT_MSG_NEWOBJ, NLM_F_CREATE | ack);
            batch.string(ATTR_TABLE, TABLE);
            batch.string(NFTA_OBJ_NAME, name);
            batch.be32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
            let data = batch.nest(NFTA_OBJ_DATA);
            batch.attr(NFTA_COUNTER_BYTES, &0u64.to_be_bytes());
            batch.attr(NFTA_COUNTER_PACKETS, &0u64.to_be_bytes());
            batch.end_nest(data);
            batch.finish(start);
        }
        Op::DeleteCounter(name) => {
            let start = batch.message(NFT_MSG_DELOBJ, ack);
            batch.string(ATTR_TABLE, TABLE);
            batch.string(NFTA_OBJ_NAME, name);
            batch.be32(NFTA_OBJ_TYPE, NFT_OBJECT_COUNTER);
            batch.finish(start);
        }
        Op::FlushChain(chain) => {
            // A rule deletion naming only the chain removes all its rules.
            let start = batch.message(NFT_MSG_DELRULE, ack);
            batch.string(ATTR_TABLE, TABLE);
            batch.string(NFTA_RULE_CHAIN, chain);
            batch.finish(start);
        }
        Op::Count(chain) => rule(batch, chain, ack, |b| {
            b.expr("objref", |b| {
                b.be32(NFTA_OBJREF_IMM_TYPE, NFT_OBJECT_COUNTER);
                b.string(NFTA_OBJREF_IMM_NAME, chain);
            });
        }),
        Op::Dnat {
            chain,
            protocol,
            pick,
            to: (ip, port),
        } => rule(batch, chain, ack, |b| {
            b.expr("meta", |b| {
                b.be32(NFTA_META_DREG, NFT_REG_1);
                b.be32(NFTA_META_KEY, NFT_META_L4PROTO);
            });
            cmp_eq(b, &[protocol.number()]);
            if let Some(n) = pick {
                b.expr("numgen", |b| {
                    b.be32(NFTA_NG_DREG, NFT_REG_1);
                    b.be32(NFTA_NG_MODULUS, *n);
                    b.be32(NFTA_NG_TYPE, NFT_NG_RANDOM);
                    b.be32(NFTA_NG_OFFSET, 0);
                });
                // numgen writes a host-order u32.
                cmp_eq(b, &0u32.to_ne_bytes());
            }
            immediate(b, NFT_REG_1, &ip.octets());
            immediate(b, NFT_REG_2, &port.to_be_bytes());
            b.expr("nat", |b| {
                b.be32(NFTA_NAT_TYPE, NFT_NAT_DNAT);
                b.be32(NFTA_NAT_FAMILY, u32::from(NFPROTO_IPV4));
                b.be32(NFTA_NAT_REG_ADDR_MIN, NFT_REG_1);
                b.be32(NFTA_NAT_REG_PROTO_MIN, NFT_REG_2);
                b.be32(NFTA_NAT_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
            });
        }),
        Op::AddElement {
            frontend,
            protocol,
            chain,
        } => {
            let (key, len) = map_key(*frontend, *protocol);
            elements(batch, true, ack, map_name(*frontend), |b| {
                element(b, &key[..len], Some(chain));
            });
        }
        Op::DeleteElement { frontend, protocol } => {
            let (key, len) = map_key(*frontend, *protocol);
            elements(batch, false, ack, map_name(*frontend), |b| {
                element(b, &key[..len], None);
            });
        }
        Op::Hairpin { add, endpoints } => {
            elements(batch, *add, ack, HAIRPIN_SET, |b| {
                for ip in endpoints {
                    let mut key = [0u8; 8];
                    key[..4].copy_from_slice(&ip.octets());
                    key[4..].copy_from_slice(&ip.octets());
                    element(b, &key, None);
                }
            });
        }
    }
}

/// A rule appended to `chain`, its expressions written by `body`.
fn rule(batch: &mut Batch, chain: &str, ack: u16, body: impl FnOnce(&mut Batch)) {
    let start = batch.message(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND | ack);
    batch.string(ATTR_TABLE, TABLE);
    batch.string(NFTA_RULE_CHAIN, chain);
    let exprs = batch.nest(NFTA_RULE_EXPRESSIONS);
    body(batch);
    batch.end_nest(exprs);
    batch.finish(start);
}

/// Loads `value` into register `reg`.
fn immediate(batch: &mut Batch, reg: u32, value: &[u8]) {
    batch.expr("immediate", |b| {
        b.be32(NFTA_IMMEDIATE_DREG, reg);
        b.value(NFTA_IMMEDIATE_DATA, value);
    });
}

/// Register 1 equals `value`, or the rule stops here.
fn cmp_eq(batch: &mut Batch, value: &[u8]) {
    batch.expr("cmp", |b| {
        b.be32(NFTA_CMP_SREG, NFT_REG_1);
        b.be32(NFTA_CMP_OP, NFT_CMP_EQ);
        b.value(NFTA_CMP_DATA, value);
    });
}

/// A set element message for `set`, its elements written by `body`.
fn elements(batch: &mut Batch, add: bool, ack: u16, set: &str, body: impl FnOnce(&mut Batch)) {
    let (kind, flags) = match add {
        true => (NFT_MSG_NEWSETELEM, NLM_F_CREATE),
        false => (NFT_MSG_DELSETELEM, 0),
    };
    let start = batch.message(kind, flags | ack);
    batch.string(ATTR_TABLE, TABLE);
    batch.string(NFTA_SET_ELEM_LIST_SET, set);
    let list = batch.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
    body(batch);
    batch.end_nest(list);
    batch.finish(start);
}

/// One element: its key and, for a verdict map, `goto chain`.
fn element(batch: &mut Batch, key: &[u8], goto: Option<&str>) {
    let elem = batch.nest(NFTA_LIST_ELEM);
    batch.value(NFTA_SET_ELEM_KEY, key);
    if let Some(chain) = goto {
        let data = batch.nest(NFTA_SET_ELEM_DATA);
        let verdict = batch.nest(NFTA_DATA_VERDICT);
        batch.be32(NFTA_VERDICT_CODE, NFT_GOTO as u32);
        batch.string(NFTA_VERDICT_CHAIN, chain);
        batch.end_nest(verdict);
        batch.end_nest(data);
    }
    batch.end_nest(elem);
}

fn map_name(frontend: Frontend) -> &'static str {
    match frontend {
        Frontend::Cluster(..) => "cluster_ips",
        Frontend::Node(_) => "node_ports",
    }
}

/// A concatenated key: each part starts on a 4-byte boundary, as the
/// kernel lays out registers (`ipv4_addr . inet_proto . inet_service`,
/// or `inet_proto . inet_service` for NodePorts).
fn map_key(frontend: Frontend, protocol: Protocol) -> ([u8; 12], usize) {
    let mut key = [0u8; 12];
    let rest = match frontend {
        Frontend::Cluster(ip, port) => {
            key[..4].copy_from_slice(&ip.octets());
            (4, port)
        }
        Frontend::Node(port) => (0, port),
    };
    let (at, port) = rest;
    key[at] = protocol.number();
    key[at + 4..at + 6].copy_from_slice(&port.to_be_bytes());
    (key, at + 8)
}

// --- the socket ---

struct Socket(OwnedFd);

impl Socket {
    /// A netfilter netlink socket whose send buffer takes `batch` bytes
    /// in one message (the kernel refuses a message larger than the
    /// buffer).
    fn open(batch: usize) -> Result<Socket, Error> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| Error::Socket(e.into()))?;
        let wanted = batch + 4096;
        let current = nix::sys::socket::getsockopt(&fd, sockopt::SndBuf).unwrap_or(0);
        if current < wanted {
            setsockopt(&fd, sockopt::SndBufForce, &wanted)
                .or_else(|_| setsockopt(&fd, sockopt::SndBuf, &wanted))
                .map_err(|e| Error::Socket(e.into()))?;
        }
        // Answers wait until the last message's acknowledgement is read.
        let timeout = nix::sys::time::TimeVal::new(5, 0);
        setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).map_err(|e| Error::Socket(e.into()))?;
        Ok(Socket(fd))
    }

    fn send(&self, batch: &[u8]) -> Result<(), Error> {
        // Without a destination, netlink delivers to the kernel (port 0).
        let sent = send(self.0.as_raw_fd(), batch, MsgFlags::empty())
            .map_err(|e| Error::Socket(e.into()))?;
        if sent != batch.len() {
            return Err(Error::Socket(io::Error::other("short netlink send")));
        }
        Ok(())
    }

    /// One read; [`Error::NoAnswer`] once the receive timeout passes.
    fn receive(&self, buf: &mut [u8]) -> Result<usize, Error> {
        loop {
            match recv(self.0.as_raw_fd(), buf, MsgFlags::empty()) {
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(Error::NoAnswer),
                Err(e) => return Err(Error::Socket(e.into())),
            }
        }
    }

    /// Reads the kernel's answers until the acknowledgement of message
    /// `last` (asked for only on the last one; errors come for any). The
    /// first error is returned, named by `describe(seq)`.
    fn outcome(&self, last: u32, describe: impl Fn(u32) -> Option<String>) -> Result<(), Error> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut failure: Option<Error> = None;
        loop {
            let n = match self.receive(&mut buf) {
                Ok(n) => n,
                Err(Error::NoAnswer) => return Err(failure.unwrap_or(Error::NoAnswer)),
                Err(e) => return Err(e),
            };
            let mut done = false;
            for (seq, errno) in acks(&buf[..n]) {
                if errno != 0 && failure.is_none() {
                    let errno = Errno::from_raw(-errno);
                    failure = Some(match describe(seq) {
                        Some(op) => Error::Refused { op, errno },
                        None => Error::Batch(errno),
                    });
                }
                done |= seq == last;
            }
            if done {
                return failure.map_or(Ok(()), Err);
            }
        }
    }
}

/// The (sequence, error) of each acknowledgement in `buf`; error 0 is
/// success, otherwise a negative errno.
fn acks(buf: &[u8]) -> impl Iterator<Item = (u32, i32)> + '_ {
    messages(buf).filter_map(|(kind, body)| {
        let (errno, seq) = error_of(body).filter(|_| kind == NLMSG_ERROR)?;
        Some((seq, errno))
    })
}

/// An `NLMSG_ERROR` body (nlmsgerr: the error, then the header of the
/// message it answers): (error, that message's sequence number).
fn error_of(body: &[u8]) -> Option<(i32, u32)> {
    let errno = i32::from_ne_bytes(body.get(0..4)?.try_into().ok()?);
    let seq = u32::from_ne_bytes(body.get(12..16)?.try_into().ok()?);
    Some((errno, seq))
}

/// The (type, body) of each netlink message in `buf`, up to the first
/// that does not fit.
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = buf.get(at..at + 16)?;
        let len = u32::from_ne_bytes(header[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(header[4..6].try_into().ok()?);
        let body = buf
            .get(at + 16..at.checked_add(len)?)
            .filter(|_| len >= 16)?;
        at += len.div_ceil(4) * 4;
        Some((kind, body))
    })
}

/// The (type, value) of each attribute in `buf`, up to the first that
/// does not fit.
fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = buf.get(at..at + 4)?;
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let kind = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        let value = buf.get(at + 4..at.checked_add(len)?).filter(|_| len >= 4)?;
        at += len.div_ceil(4) * 4;
        Some((kind, value))
    })
}

/// A counter object's name and packets, from its attributes.
fn counter(attrs: &[u8]) -> Option<(String, u64)> {
    let (mut name, mut packets) = (None, None);
    for (kind, value) in attributes(attrs) {
        match kind {
            NFTA_OBJ_NAME => {
                let text = value.split(|b| *b == 0).next()?;
                name = Some(String::from_utf8_lossy(text).into_owned());
            }
            NFTA_OBJ_DATA => {
                packets = attributes(value)
                    .find(|(kind, _)| *kind == NFTA_COUNTER_PACKETS)
                    .and_then(|(_, v)| Some(u64::from_be_bytes(v.try_into().ok()?)));
            }
            _ => {}
        }
    }
    Some((name?, packets?))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn concatenated_keys_put_each_part_on_a_register_boundary() {
        let (key, len) = map_key(
            Frontend::Cluster(Ipv4Addr::new(10, 43, 0, 20), 80),
            Protocol::Tcp,
        );
        assert_eq!(&key[..len], &[10, 43, 0, 20, 6, 0, 0, 0, 0, 80, 0, 0]);
        let (key, len) = map_key(Frontend::Node(30080), Protocol::Udp);
        assert_eq!(&key[..len], &[17, 0, 0, 0, 0x75, 0x80, 0, 0]);
    }

    #[test]
    fn messages_are_aligned_and_carry_their_length() {
        let mut batch = Batch::default();
        batch.control(BATCH_BEGIN);
        encode(&mut batch, &Op::AddChain("svc-a/b/tcp/80".into()), true);
        batch.control(BATCH_END);
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < batch.buf.len() {
            let len = u32::from_ne_bytes(batch.buf[at..at + 4].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0);
            kinds.push(u16::from_ne_bytes(
                batch.buf[at + 4..at + 6].try_into().unwrap(),
            ));
            at += len;
        }
        assert_eq!(at, batch.buf.len());
        assert_eq!(kinds, vec![BATCH_BEGIN, (10 << 8) | 3, BATCH_END]);
        assert_eq!(batch.last_seq, 3);
    }

    #[test]
    fn acknowledgements_are_read_from_any_bytes_without_panicking() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&[0; 10]);
        ack.extend_from_slice(&(-17i32).to_ne_bytes());
        ack.extend_from_slice(&[0; 8]);
        ack.extend_from_slice(&7u32.to_ne_bytes());
        ack.extend_from_slice(&[0; 4]);
        assert_eq!(acks(&ack).collect::<Vec<_>>(), vec![(7, -17)]);
        for cut in 0..ack.len() {
            let _ = acks(&ack[..cut]).count();
        }
        let mut zero_len = ack.clone();
        zero_len[..4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(acks(&zero_len).count(), 0);
    }

    /// What the kernel took, read back by `nft` in a network namespace of
    /// the test's own (gone with its thread), is the rules' `nft` text.
    #[test]
    fn the_kernel_holds_what_nft_would_have_written() {
        use super::super::rules::{self, Hairpin, PortRule};
        let listing = std::thread::spawn(|| -> Result<String, String> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("unshare: {e}"))?;
            let skeleton =
                rules::skeleton("skt0", Hairpin::SelfOnly, &[Ipv4Addr::new(10, 0, 0, 1)]);
            nft(&["-f", "-"], &skeleton)?;
            let web = |targets: Vec<(Ipv4Addr, u16)>| PortRule {
                chain: "svc-default/web/tcp/80".into(),
                protocol: Protocol::Tcp,
                frontends: vec![Frontend::Cluster(Ipv4Addr::new(10, 43, 0, 20), 80)],
                targets,
            };
            let local = PortRule {
                chain: "local-default/dns/udp/53".into(),
                protocol: Protocol::Udp,
                frontends: vec![Frontend::Node(30053)],
                targets: vec![(Ipv4Addr::new(10, 42, 0, 9), 5353)],
            };
            let ep = |last| (Ipv4Addr::new(10, 42, 0, last), 8080);
            let mut ops = Vec::new();
            rules::diff(
                &[],
                &[web(vec![ep(5), ep(6), ep(7)]), local.clone()],
                &mut ops,
            );
            rules::hairpin(
                &[Ipv4Addr::new(10, 42, 0, 5), Ipv4Addr::new(10, 42, 0, 7)],
                true,
                &mut ops,
            );
            apply(&ops).map_err(|e| e.to_string())?;
            // An endpoint change, a removal and a refused operation.
            let mut ops = Vec::new();
            rules::diff(
                &[web(vec![ep(5), ep(6), ep(7)])],
                &[web(vec![ep(6), ep(8)])],
                &mut ops,
            );
            rules::diff(&[local], &[], &mut ops);
            rules::hairpin(&[Ipv4Addr::new(10, 42, 0, 5)], false, &mut ops);
            apply(&ops).map_err(|e| e.to_string())?;
            let refused = apply(&[Op::DeleteChain("svc-default/web/tcp/80".into())]);
            match refused {
                Err(Error::Refused { op, .. }) if op.starts_with("delete chain") => {}
                other => return Err(format!("a chain still in use was deleted: {other:?}")),
            }
            let counters = counters().map_err(|e| e.to_string())?;
            let names: Vec<&str> = counters.keys().map(String::as_str).collect();
            if names != ["svc-default/web/tcp/80"] || counters.values().any(|n| *n != 0) {
                return Err(format!("counters read back: {counters:?}"));
            }
            nft(&["list", "table", "ip", TABLE], "")
        })
        .join()
        .expect("the namespace thread panicked")
        .expect("nftables round trip");
        let squeezed: Vec<String> = listing
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        let has = |line: &str| squeezed.iter().any(|l| l == line);
        for line in [
            "elements = { 10.43.0.20 . tcp . 80 : goto svc-default/web/tcp/80 }",
            "elements = { 10.42.0.7 . 10.42.0.7 }",
            "chain svc-default/web/tcp/80 {",
            "counter name \"svc-default/web/tcp/80\"",
            "meta l4proto tcp numgen random mod 2 0 dnat to 10.42.0.6:8080",
            "meta l4proto tcp dnat to 10.42.0.8:8080",
            "counter svc-default/web/tcp/80 {",
        ] {
            assert!(has(line), "no `{line}` in\n{listing}");
        }
        assert!(!listing.contains("10.42.0.5:8080"), "{listing}");
        assert!(!listing.contains("dns"), "{listing}");
    }

    /// Runs `nft args`, `stdin` as its input.
    fn nft(args: &[&str], stdin: &str) -> Result<String, String> {
        use std::io::Write as _;
        let mut child = std::process::Command::new("nft")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("nft: {e}"))?;
        if let Some(mut input) = child.stdin.take() {
            input
                .write_all(stdin.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
