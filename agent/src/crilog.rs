//! Container log files in the CRI format that kubelet and `crictl` read:
//! one record a line, `<RFC3339Nano time> <stdout|stderr> <F|P> <content>`,
//! where `P` marks a piece of a line that goes on in the next record. A
//! log rotates to `NAME.1`, `NAME.2`, … (the higher, the older).

use std::path::{Path, PathBuf};

use jiff::Timestamp;

/// Which output of the container a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One parsed record, borrowing from the line it was read from.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub time: Timestamp,
    pub stream: Stream,
    /// False for a `P` record: the line continues in the next one.
    pub full: bool,
    pub content: &'a [u8],
}

impl Stream {
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Appends one record for `content` (without its newline) to `out`.
pub fn encode(out: &mut Vec<u8>, time: Timestamp, stream: Stream, full: bool, content: &[u8]) {
    use std::io::Write;
    // Go's RFC3339Nano: UTC here, trailing zeros of the fraction dropped
    // (jiff's default display does the same).
    let _ = write!(
        out,
        "{} {} {} ",
        time,
        stream.name(),
        if full { "F" } else { "P" }
    );
    out.extend_from_slice(content);
    out.push(b'\n');
}

/// Parses one line (without its newline). `None` for a line that is not a
/// CRI record; readers skip those as kubelet does.
pub fn parse(line: &[u8]) -> Option<Record<'_>> {
    let mut fields = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let stream = match fields.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let full = match fields.next()? {
        b"F" => true,
        b"P" => false,
        _ => return None,
    };
    Some(Record {
        time,
        stream,
        full,
        content: fields.next().unwrap_or_default(),
    })
}

/// Where rotation `n` (1 is the newest rotated file) of `log` lives.
pub fn rotated(log: &Path, n: u32) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The files of `log` that exist, oldest first, the live one last.
pub fn files_oldest_first(log: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut n = 1;
    while rotated(log, n).exists() {
        files.push(rotated(log, n));
        n += 1;
    }
    files.reverse();
    if log.exists() {
        files.push(log.to_owned());
    }
    files
}

/// kubelet's `--timestamps` format: RFC 3339 with all nine digits.
pub fn fixed_nanos(time: Timestamp) -> String {
    format!("{time:.9}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let time: Timestamp = "2026-11-27T17:13:25.1234Z".parse().unwrap();
        let mut out = Vec::new();
        encode(&mut out, time, Stream::Stderr, false, b"half a line");
        assert_eq!(out, b"2026-11-27T17:13:25.1234Z stderr P half a line\n");
        let record = parse(&out[..out.len() - 1]).unwrap();
        assert_eq!(record.time, time);
        assert_eq!(record.stream, Stream::Stderr);
        assert!(!record.full);
        assert_eq!(record.content, b"half a line");
        assert_eq!(
            parse(b"2026-11-27T17:13:25Z stdout F ").unwrap().content,
            b""
        );
        assert_eq!(fixed_nanos(time), "2026-11-27T17:13:25.123400000Z");
    }

    #[test]
    fn garbage_is_not_a_record() {
        for line in [
            &b""[..],
            b"hello",
            b"2026-11-27T17:13:25Z stdout",
            b"2026-11-27T17:13:25Z stdin F x",
            b"2026-11-27T17:13:25Z stdout X x",
            b"yesterday stdout F x",
        ] {
            assert!(parse(line).is_none(), "{line:?}");
        }
    }
}
