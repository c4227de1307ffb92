//! Gives back what only the agent's start touched of its executable.
//!
//! The agent is one mode of a large binary (API server, controllers, DNS,
//! ingress): its start (command line, TLS set-up, the join, opening the
//! image store) runs code the running agent never needs again, and the
//! kernel maps file pages in large blocks around each fault (up to a whole
//! page-cache folio). With 50 pods, 22 of the agent's 49 MB were mapped
//! code. Unmapping the code once the agent runs leaves mapped only what
//! it runs from then on.
//!
//! This drops nothing the kernel could not drop itself under memory
//! pressure: the code pages are clean copies of the file, mapped back on
//! the next access. Mappings holding private (copy-on-write) pages, such
//! as relocated read-only data, are left alone: their contents are not
//! the file's.

use std::io;
use std::path::Path;

/// Unmaps the executable's read-only file pages; the bytes it unmapped.
pub fn release_executable_pages() -> io::Result<u64> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for mapping in clean_mappings(&smaps, &exe) {
        let len = mapping.end - mapping.start;
        // SAFETY: the range is a whole mapping of this process's own
        // executable that is not writable and holds no private pages, so
        // every page in it is a clean copy of the file and faults back in
        // unchanged; no Rust object lives in it.
        let rc = unsafe {
            libc::madvise(
                mapping.start as *mut libc::c_void,
                len as libc::size_t,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        released += mapping.rss_kb * 1024;
    }
    Ok(released)
}

#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    rss_kb: u64,
}

/// The mappings of `exe` in `smaps` that are read-only and hold no
/// anonymous (copied-on-write) pages.
fn clean_mappings(smaps: &str, exe: &Path) -> Vec<Mapping> {
    let exe = exe.to_string_lossy();
    let mut found = Vec::new();
    let mut current: Option<(Mapping, bool)> = None;
    let mut anonymous = 0u64;
    let mut finish = |current: Option<(Mapping, bool)>, anonymous: u64| {
        if let Some((mapping, true)) = current
            && anonymous == 0
        {
            found.push(mapping);
        }
    };
    for line in smaps.lines() {
        if let Some((range, rest)) = header(line) {
            finish(current.take(), anonymous);
            anonymous = 0;
            let mut fields = rest.split_whitespace();
            let perms = fields.next().unwrap_or("");
            // offset, device, inode, then the path (which may hold spaces).
            let path = fields.skip(3).collect::<Vec<_>>().join(" ");
            let read_only = perms.starts_with('r') && perms.as_bytes().get(1) == Some(&b'-');
            current = Some((
                Mapping {
                    start: range.0,
                    end: range.1,
                    rss_kb: 0,
                },
                read_only && perms.ends_with('p') && path == exe,
            ));
        } else if let Some(kb) = field_kb(line, "Rss:") {
            if let Some((mapping, _)) = current.as_mut() {
                mapping.rss_kb = kb;
            }
        } else if let Some(kb) = field_kb(line, "Anonymous:") {
            anonymous = kb;
        }
    }
    finish(current.take(), anonymous);
    found
}

/// `start-end rest` of a mapping's first line.
fn header(line: &str) -> Option<((usize, usize), &str)> {
    let (range, rest) = line.split_once(' ')?;
    let (start, end) = range.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    (end > start).then_some(((start, end), rest))
}

fn field_kb(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d000000000-55d000400000 r--p 00000000 fe:00 12 /opt/skiff/skiff
Size:               4096 kB
Rss:                1000 kB
Anonymous:             0 kB
55d000400000-55d001400000 r-xp 00400000 fe:00 12 /opt/skiff/skiff
Size:              16384 kB
Rss:                9000 kB
Anonymous:             0 kB
55d001400000-55d001500000 r--p 01400000 fe:00 12 /opt/skiff/skiff
Size:               1024 kB
Rss:                 800 kB
Anonymous:           700 kB
55d001500000-55d001510000 rw-p 01500000 fe:00 12 /opt/skiff/skiff
Size:                 64 kB
Rss:                  64 kB
Anonymous:            64 kB
7f0000000000-7f0000100000 r-xp 00000000 fe:00 99 /usr/lib/libc.so.6
Size:               1024 kB
Rss:                 500 kB
Anonymous:             0 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                1024 kB
Anonymous:          1024 kB
";

    #[test]
    fn only_the_executables_clean_read_only_mappings() {
        let found = clean_mappings(SMAPS, Path::new("/opt/skiff/skiff"));
        assert_eq!(
            found,
            vec![
                Mapping {
                    start: 0x55d0_0000_0000,
                    end: 0x55d0_0040_0000,
                    rss_kb: 1000
                },
                Mapping {
                    start: 0x55d0_0040_0000,
                    end: 0x55d0_0140_0000,
                    rss_kb: 9000
                },
            ]
        );
    }

    #[test]
    fn releasing_keeps_the_process_running() {
        // The test binary itself: its code comes back as it runs on.
        release_executable_pages().unwrap();
        let text: String = ["still", "running"].join(" ");
        assert_eq!(text, "still running");
    }
}
