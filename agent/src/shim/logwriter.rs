//! The shim's side of container logs: container output cut into CRI
//! records, appended to the log file, which rotates at a size limit.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use jiff::Timestamp;

use crate::crilog::{self, Stream};

/// Longer lines are split into `P` records, as containerd does
/// (`max_container_log_line_size`).
const MAX_LINE: usize = 16 * 1024;

/// Cuts one output stream into records.
pub struct LineSplitter {
    stream: Stream,
    pending: Vec<u8>,
}

/// A log file that rotates: `log` → `log.1` → … → `log.(max_files-1)`.
pub struct LogFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    max_files: u32,
}

impl LineSplitter {
    pub fn new(stream: Stream) -> Self {
        LineSplitter {
            stream,
            pending: Vec::new(),
        }
    }

    /// Adds output; appends a record for every line it completes (and for
    /// every `MAX_LINE` bytes of a line that goes on) to `out`.
    pub fn push(&mut self, data: &[u8], now: Timestamp, out: &mut Vec<u8>) {
        let mut rest = data;
        while let Some(end) = rest.iter().position(|b| *b == b'\n') {
            self.pending.extend_from_slice(&rest[..end]);
            // A terminal ends lines with CRLF.
            if self.pending.last() == Some(&b'\r') {
                self.pending.pop();
            }
            self.emit(now, true, out);
            rest = &rest[end + 1..];
        }
        self.pending.extend_from_slice(rest);
        while self.pending.len() >= MAX_LINE {
            let tail = self.pending.split_off(MAX_LINE);
            self.emit(now, false, out);
            self.pending = tail;
        }
    }

    /// The output ended: what is left is a last, unterminated line, which
    /// containerd records as full.
    pub fn finish(&mut self, now: Timestamp, out: &mut Vec<u8>) {
        if !self.pending.is_empty() {
            self.emit(now, true, out);
        }
    }

    fn emit(&mut self, now: Timestamp, full: bool, out: &mut Vec<u8>) {
        crilog::encode(out, now, self.stream, full, &self.pending);
        self.pending.clear();
    }
}

impl LogFile {
    /// Opens `path` for appending, creating it and its folder.
    pub fn open(path: &Path, max_bytes: u64, max_files: u32) -> io::Result<LogFile> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            path: path.to_owned(),
            file,
            size,
            max_bytes,
            max_files,
        })
    }

    /// Appends whole records, rotating whenever the next one would take
    /// the file past its limit (a record larger than the limit gets a file
    /// of its own).
    pub fn write(&mut self, mut records: &[u8]) -> io::Result<()> {
        while !records.is_empty() {
            let room = if self.max_bytes == 0 {
                usize::MAX
            } else {
                usize::try_from(self.max_bytes.saturating_sub(self.size)).unwrap_or(usize::MAX)
            };
            let mut take = if records.len() <= room {
                records.len()
            } else {
                records[..room]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |end| end + 1)
            };
            if take == 0 {
                if self.size > 0 {
                    self.rotate()?;
                    continue;
                }
                take = records
                    .iter()
                    .position(|b| *b == b'\n')
                    .map_or(records.len(), |end| end + 1);
            }
            self.file.write_all(&records[..take])?;
            self.size += take as u64;
            records = &records[take..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let keep = self.max_files.saturating_sub(1);
        if keep == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        let _ = std::fs::remove_file(crilog::rotated(&self.path, keep));
        for n in (1..keep).rev() {
            let from = crilog::rotated(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, crilog::rotated(&self.path, n + 1))?;
            }
        }
        std::fs::rename(&self.path, crilog::rotated(&self.path, 1))?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        "2026-11-27T00:00:00Z".parse().unwrap()
    }

    fn contents(records: &[u8]) -> Vec<(bool, String)> {
        records
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let r = crilog::parse(l).unwrap();
                (r.full, String::from_utf8_lossy(r.content).into_owned())
            })
            .collect()
    }

    #[test]
    fn lines_split_across_reads_and_long_lines_in_pieces() {
        let mut s = LineSplitter::new(Stream::Stdout);
        let mut out = Vec::new();
        s.push(b"hel", now(), &mut out);
        assert!(out.is_empty());
        s.push(b"lo\r\nworld\nand", now(), &mut out);
        let long = vec![b'x'; MAX_LINE + 10];
        s.push(&long, now(), &mut out);
        s.finish(now(), &mut out);
        let got = contents(&out);
        assert_eq!(got[0], (true, "hello".into()));
        assert_eq!(got[1], (true, "world".into()));
        assert!(!got[2].0);
        assert_eq!(got[2].1.len(), MAX_LINE);
        assert_eq!(got[3], (true, "x".repeat(13)));
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn rotation_keeps_max_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c").join("0.log");
        let mut log = LogFile::open(&path, 100, 3).unwrap();
        for batch in 0..5 {
            let mut out = Vec::new();
            for i in [batch * 2, batch * 2 + 1] {
                let text = format!("line {i:02} {}", "y".repeat(20));
                crilog::encode(&mut out, now(), Stream::Stdout, true, text.as_bytes());
            }
            log.write(&out).unwrap();
        }
        let files = crilog::files_oldest_first(&path);
        assert_eq!(
            files,
            vec![
                crilog::rotated(&path, 2),
                crilog::rotated(&path, 1),
                path.clone()
            ]
        );
        for file in &files {
            assert!(std::fs::metadata(file).unwrap().len() <= 100);
        }
        let all: Vec<u8> = files
            .iter()
            .flat_map(|f| std::fs::read(f).unwrap())
            .collect();
        let lines = contents(&all);
        assert_eq!(
            lines.last().unwrap().1,
            format!("line 09 {}", "y".repeat(20))
        );
        // Consecutive: the newest lines, nothing lost in between.
        let first: usize = lines[0].1[5..7].parse().unwrap();
        for (i, (_, text)) in lines.iter().enumerate() {
            assert!(
                text.starts_with(&format!("line {:02}", first + i)),
                "{text}"
            );
        }
    }
}
