//! The few `bpf(2)` commands the socket balancer needs: hash maps and
//! their elements, loading a program from raw instructions, and attaching
//! it to a cgroup through a link (which the kernel drops with its last
//! file descriptor, so a data plane that dies takes its programs along).
//!
//! Raw system calls, not a BPF library: the programs are a few dozen
//! hand-assembled instructions (`program`), so there is no object file to
//! load, and the loaders (aya, libbpf) are built around object files.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// Commands (`enum bpf_cmd`).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;

pub const MAP_HASH: u32 = 1;
pub const MAP_LRU_HASH: u32 = 9;
/// `BPF_F_NO_PREALLOC`: elements are allocated as they are added.
pub const MAP_NO_PREALLOC: u32 = 1;
pub const PROG_CGROUP_SOCK_ADDR: u32 = 18;

/// Where a cgroup socket-address program runs (`enum bpf_attach_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `connect()` on an IPv4 socket.
    Connect4 = 10,
    /// `getpeername()` on an IPv4 socket.
    GetPeerName4 = 29,
}

/// `bpf_attr` for `BPF_MAP_CREATE`.
#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `bpf_attr` for the element commands.
#[repr(C)]
struct Elem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `bpf_attr` for `BPF_LINK_CREATE`.
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// A BPF map with fixed-size keys and values.
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl Map {
    pub fn create(
        map_type: u32,
        name: &str,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        flags: u32,
    ) -> io::Result<Map> {
        let mut attr = MapCreate {
            map_type,
            key_size,
            value_size,
            max_entries,
            map_flags: flags,
            map_name: object_name(name),
            ..MapCreate::default()
        };
        let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
        Ok(Map {
            fd,
            key_size: key_size as usize,
            value_size: value_size as usize,
        })
    }

    /// Inserts or replaces one element.
    pub fn set(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.elem(
            BPF_MAP_UPDATE_ELEM,
            key,
            Some((value.as_ptr() as u64, value.len())),
        )
        .map(drop)
    }

    /// Reads one element into `value`; `false` when it is missing.
    pub fn get(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        let value = (value.as_mut_ptr() as u64, value.len());
        match self.elem(BPF_MAP_LOOKUP_ELEM, key, Some(value)) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes one element; a missing one is not an error.
    pub fn remove(&self, key: &[u8]) -> io::Result<()> {
        match self.elem(BPF_MAP_DELETE_ELEM, key, None) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other.map(drop),
        }
    }

    /// An element command, after checking the buffers' sizes (the kernel
    /// reads and writes as many bytes as the map's sizes say).
    fn elem(
        &self,
        cmd: libc::c_long,
        key: &[u8],
        value: Option<(u64, usize)>,
    ) -> io::Result<libc::c_long> {
        if key.len() != self.key_size || value.is_some_and(|(_, len)| len != self.value_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "BPF map key or value of the wrong size",
            ));
        }
        let mut attr = Elem {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.map_or(0, |(ptr, _)| ptr),
            flags: 0,
        };
        sys(cmd, &mut attr)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Loads a cgroup socket-address program for `hook`. On a verifier
/// refusal the error carries the verifier's log.
pub fn load(name: &str, hook: Hook, insns: &[u64]) -> io::Result<OwnedFd> {
    const LICENSE: &CStr = c"Apache-2.0";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoad {
        prog_type: PROG_CGROUP_SOCK_ADDR,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: object_name(name),
        expected_attach_type: hook as u32,
        ..ProgLoad::default()
    };
    bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let log = String::from_utf8_lossy(&log[..end]);
        io::Error::new(e.kind(), format!("{e}; verifier: {}", log.trim()))
    })
}

/// Attaches `program` to the cgroup open at `cgroup` (and so to every
/// cgroup below it) until the returned link is closed.
pub fn attach(program: &OwnedFd, cgroup: &OwnedFd, hook: Hook) -> io::Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: hook as u32,
        flags: 0,
    };
    bpf(BPF_LINK_CREATE, &mut attr)
}

/// A NUL-padded object name (the kernel keeps 15 characters).
fn object_name(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (slot, byte) in out.iter_mut().zip(name.bytes().take(15)) {
        *slot = if byte.is_ascii_alphanumeric() || byte == b'_' {
            byte
        } else {
            b'_'
        };
    }
    out
}

/// A command that returns a new descriptor.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = sys(cmd, attr)?;
    // SAFETY: these commands return a new descriptor, ours to own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn sys<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a `bpf_attr` prefix of the right layout for `cmd`,
    // valid for the call; pointers inside it point to live buffers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
