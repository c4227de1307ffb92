//! Pod IP allocation from the node's podCIDR, persisted as one file per
//! address in a state folder (the layout of CNI's `host-local`):
//!
//! - `<state_dir>/<ip>` holds `<sandbox id>\n<ifname>\n`. It is created with
//!   `O_EXCL`, so no address is ever handed out twice, even by two processes
//!   or after a crash; a file exists exactly as long as the address is in use.
//! - `<state_dir>/last_reserved_ip` remembers where the last search stopped:
//!   allocation goes round the range, so a just-released address is not
//!   reused at once (stale ARP and conntrack entries point at it).
//! - `<state_dir>/lock` is held (`flock`) while allocating or releasing, so
//!   one sandbox never ends up with two addresses.
//!
//! The network address, the gateway (first host) and the broadcast address
//! are never handed out. Calls block on file I/O: run them off the async
//! workers.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};

use crate::error::CniError;

const LAST_RESERVED: &str = "last_reserved_ip";
const LOCK: &str = "lock";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub sandbox_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
    cidr: Ipv4Net,
}

impl Ipam {
    /// Opens (creating if needed) the state folder for `cidr`.
    pub fn open(dir: &Path, cidr: Ipv4Net) -> Result<Self, CniError> {
        let cidr = cidr.trunc();
        if cidr.prefix_len() > 30 {
            return Err(CniError::invalid(
                "pod CIDR",
                format!("{cidr} is too small: it needs room for a gateway and pods"),
            ));
        }
        fs::create_dir_all(dir)
            .map_err(|e| CniError::io(format!("creating {}", dir.display()), e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            cidr,
        })
    }

    /// The gateway: the first host address of the range.
    pub fn gateway(&self) -> Ipv4Addr {
        first_host(self.cidr)
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// The address of `sandbox_id`, allocating one if it has none. The flag
    /// says whether this call allocated it.
    pub fn allocate(&self, sandbox_id: &str, ifname: &str) -> Result<(Ipv4Addr, bool), CniError> {
        validate_id(sandbox_id)?;
        let _lock = self.lock()?;
        let current = self.list()?;
        if let Some(existing) = current.iter().find(|a| a.sandbox_id == sandbox_id) {
            return Ok((existing.ip, false));
        }
        let first = u32::from(self.gateway()) + 1;
        let last = u32::from(self.cidr.broadcast()) - 1;
        let size = last - first + 1;
        let start = self
            .last_reserved()
            .filter(|ip| (first..=last).contains(&u32::from(*ip)))
            .map_or(first, |ip| u32::from(ip) + 1);
        for step in 0..size {
            let candidate = Ipv4Addr::from(first + (start - first + step) % size);
            match self.claim(candidate, sandbox_id, ifname) {
                Ok(()) => {
                    self.write_last_reserved(candidate)?;
                    return Ok((candidate, true));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(CniError::io(
                        format!("reserving {candidate} in {}", self.dir.display()),
                        e,
                    ));
                }
            }
        }
        Err(CniError::Exhausted(self.cidr))
    }

    /// Frees the address of `sandbox_id`; returns it, or `None` if it had
    /// none.
    pub fn release(&self, sandbox_id: &str) -> Result<Option<Ipv4Addr>, CniError> {
        let _lock = self.lock()?;
        let mut released = None;
        for allocation in self.list()? {
            if allocation.sandbox_id == sandbox_id {
                let path = self.dir.join(allocation.ip.to_string());
                match fs::remove_file(&path) {
                    Ok(()) => released = Some(allocation.ip),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(CniError::io(format!("removing {}", path.display()), e));
                    }
                }
            }
        }
        Ok(released)
    }

    pub fn lookup(&self, sandbox_id: &str) -> Result<Option<Allocation>, CniError> {
        Ok(self
            .list()?
            .into_iter()
            .find(|a| a.sandbox_id == sandbox_id))
    }

    /// Every address in use, read from disk. A file that cannot be parsed
    /// (a crash right after creating it) still counts as in use, under an
    /// empty sandbox id, so garbage collection can release it.
    pub fn list(&self) -> Result<Vec<Allocation>, CniError> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| CniError::io(format!("listing {}", self.dir.display()), e))?;
        let mut allocations = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| CniError::io(format!("listing {}", self.dir.display()), e))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            let mut lines = text.lines();
            allocations.push(Allocation {
                sandbox_id: lines.next().unwrap_or_default().trim().to_string(),
                ifname: lines.next().unwrap_or_default().trim().to_string(),
                ip,
            });
        }
        allocations.sort_by_key(|a| a.ip);
        Ok(allocations)
    }

    /// Creates the file for `ip`; fails with `AlreadyExists` if it is taken.
    fn claim(&self, ip: Ipv4Addr, sandbox_id: &str, ifname: &str) -> io::Result<()> {
        let path = self.dir.join(ip.to_string());
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let written = file
            .write_all(format!("{sandbox_id}\n{ifname}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .and_then(|()| sync_dir(&self.dir));
        if written.is_err() {
            let _ = fs::remove_file(&path);
        }
        written
    }

    fn last_reserved(&self) -> Option<Ipv4Addr> {
        fs::read_to_string(self.dir.join(LAST_RESERVED))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Written through a temporary file and a rename, so it is never torn.
    fn write_last_reserved(&self, ip: Ipv4Addr) -> Result<(), CniError> {
        let tmp = self.dir.join(format!("{LAST_RESERVED}.tmp"));
        let path = self.dir.join(LAST_RESERVED);
        fs::write(&tmp, ip.to_string())
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| CniError::io(format!("writing {}", path.display()), e))
    }

    fn lock(&self) -> Result<Flock<File>, CniError> {
        let path = self.dir.join(LOCK);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| CniError::io(format!("opening {}", path.display()), e))?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| CniError::sys(format!("locking {}", path.display()), e))
    }
}

/// The first host address of `cidr`: the bridge's own address.
pub(crate) fn first_host(cidr: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(cidr.network()) + 1)
}

/// Sandbox ids become file contents and link aliases: the CNI container-id
/// rule (a letter or digit, then letters, digits, `_`, `.`, `-`) keeps them
/// on one line and printable.
pub(crate) fn validate_id(id: &str) -> Result<(), CniError> {
    let mut bytes = id.bytes();
    let ok = id.len() <= 253
        && bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::invalid(
            "sandbox id",
            format!("{id:?} (start with a letter or digit; then letters, digits, '_', '.', '-')"),
        ))
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn cidr(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn skips_network_gateway_and_broadcast() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), cidr("10.9.0.0/29")).unwrap();
        assert_eq!(ipam.gateway(), Ipv4Addr::new(10, 9, 0, 1));
        let mut got = Vec::new();
        for i in 0..5 {
            let (ip, new) = ipam.allocate(&format!("pod{i}"), "eth0").unwrap();
            assert!(new);
            got.push(ip);
        }
        let want: Vec<Ipv4Addr> = (2..=6).map(|d| Ipv4Addr::new(10, 9, 0, d)).collect();
        assert_eq!(got, want);
        assert!(matches!(
            ipam.allocate("pod-extra", "eth0"),
            Err(CniError::Exhausted(_))
        ));
    }

    #[test]
    fn same_sandbox_gets_the_same_address() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), cidr("10.9.0.0/24")).unwrap();
        let (a, new_a) = ipam.allocate("pod-a", "eth0").unwrap();
        let (again, new_again) = ipam.allocate("pod-a", "eth0").unwrap();
        assert_eq!(a, again);
        assert!(new_a && !new_again);
        assert_eq!(ipam.list().unwrap().len(), 1);
    }

    #[test]
    fn survives_reopen_and_never_repeats_an_address_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ipam::open(dir.path(), cidr("10.9.0.0/28")).unwrap();
        let mut in_use = HashSet::new();
        for i in 0..6 {
            in_use.insert(first.allocate(&format!("pod{i}"), "eth0").unwrap().0);
        }
        drop(first);
        let reopened = Ipam::open(dir.path(), cidr("10.9.0.0/28")).unwrap();
        assert_eq!(
            reopened.lookup("pod3").unwrap().map(|a| a.ifname),
            Some("eth0".into())
        );
        // Release one and allocate until the range is full: every new address
        // differs from every address still held.
        reopened.release("pod0").unwrap();
        let held: HashSet<_> = reopened.list().unwrap().into_iter().map(|a| a.ip).collect();
        let mut fresh = HashSet::new();
        for i in 0..8 {
            let (ip, new) = reopened.allocate(&format!("new{i}"), "eth0").unwrap();
            assert!(new);
            assert!(!held.contains(&ip), "{ip} handed out twice");
            assert!(fresh.insert(ip), "{ip} handed out twice");
        }
        assert!(matches!(
            reopened.allocate("one-too-many", "eth0"),
            Err(CniError::Exhausted(_))
        ));
    }

    #[test]
    fn released_addresses_return_to_the_pool_after_a_round() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), cidr("10.9.0.0/29")).unwrap();
        let (a, _) = ipam.allocate("a", "eth0").unwrap();
        assert_eq!(ipam.release("a").unwrap(), Some(a));
        assert_eq!(ipam.release("a").unwrap(), None);
        // Round robin: the next four are new addresses, then `a` comes back.
        let mut seen = Vec::new();
        for i in 0..5 {
            seen.push(ipam.allocate(&format!("p{i}"), "eth0").unwrap().0);
        }
        assert_eq!(seen.last(), Some(&a));
        assert!(!seen[..4].contains(&a));
    }

    #[test]
    fn a_crashed_half_written_file_keeps_its_address() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("10.9.0.2"), "").unwrap();
        let ipam = Ipam::open(dir.path(), cidr("10.9.0.0/24")).unwrap();
        let (ip, _) = ipam.allocate("pod", "eth0").unwrap();
        assert_eq!(ip, Ipv4Addr::new(10, 9, 0, 3));
        let orphan = ipam.lookup("").unwrap().unwrap();
        assert_eq!(orphan.ip, Ipv4Addr::new(10, 9, 0, 2));
    }

    #[test]
    fn concurrent_allocations_from_two_handles_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let ipam = Ipam::open(&path, "10.9.0.0/26".parse().unwrap()).unwrap();
                    (0..10)
                        .map(|i| ipam.allocate(&format!("t{t}-{i}"), "eth0").unwrap().0)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = HashSet::new();
        for t in threads {
            for ip in t.join().unwrap() {
                assert!(all.insert(ip), "{ip} handed out twice");
            }
        }
        assert_eq!(all.len(), 40);
    }

    #[test]
    fn bad_ids_and_tiny_ranges_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Ipam::open(dir.path(), cidr("10.9.0.0/31")).is_err());
        let ipam = Ipam::open(dir.path(), cidr("10.9.0.0/24")).unwrap();
        for bad in ["", "-x", "a\nb", "a/b", "a b"] {
            assert!(ipam.allocate(bad, "eth0").is_err(), "{bad:?} accepted");
        }
    }
}
