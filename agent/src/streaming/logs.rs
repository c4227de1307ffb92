//! `/containerLogs/{namespace}/{pod}/{container}`: a container's CRI log
//! files (rotated ones first) read as kubelet reads them — the CRI prefix
//! stripped (or its time kept, with `timestamps`), `tailLines` counted from
//! the end, `sinceSeconds`/`sinceTime` by each record's time, `limitBytes`
//! cutting the output, and `follow` streaming what the container writes
//! until it exits (across rotations).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use jiff::{SignedDuration, Timestamp};
use tokio::sync::mpsc;

use super::{ContainerRef, StreamError};
use crate::crilog;
use crate::shim;

/// How often a followed log is checked for more.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// How much output is sent at once.
const CHUNK: usize = 32 * 1024;

/// kubelet's log options, from the query.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    pub since: Option<Timestamp>,
    pub limit_bytes: Option<u64>,
}

impl LogOptions {
    /// Reads the query as kubelet does; a bad value is a 400.
    pub fn parse(params: &[(String, String)], now: Timestamp) -> Result<LogOptions, StreamError> {
        let mut options = LogOptions::default();
        for (name, value) in params {
            let number = || {
                value.parse::<i64>().map_err(|_| {
                    StreamError::BadRequest(format!("invalid value {value:?} for {name}"))
                })
            };
            let positive = |n: i64| {
                u64::try_from(n).map_err(|_| {
                    StreamError::BadRequest(format!("{name}: must be greater than or equal to 0"))
                })
            };
            match name.as_str() {
                "follow" => options.follow = flag(name, value)?,
                "previous" => options.previous = flag(name, value)?,
                "timestamps" => options.timestamps = flag(name, value)?,
                "tailLines" => options.tail_lines = Some(positive(number()?)?),
                "limitBytes" => options.limit_bytes = Some(positive(number()?)?),
                "sinceSeconds" => {
                    let seconds = number()?;
                    if seconds <= 0 {
                        return Err(StreamError::BadRequest(
                            "sinceSeconds: must be greater than 0".into(),
                        ));
                    }
                    options.since = now.checked_sub(SignedDuration::from_secs(seconds)).ok();
                }
                "sinceTime" => {
                    options.since = Some(value.parse().map_err(|_| {
                        StreamError::BadRequest(format!("invalid value {value:?} for sinceTime"))
                    })?);
                }
                _ => {}
            }
        }
        Ok(options)
    }
}

fn flag(name: &str, value: &str) -> Result<bool, StreamError> {
    match value {
        "" | "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(StreamError::BadRequest(format!(
            "invalid value {value:?} for {name}"
        ))),
    }
}

/// Starts reading `container`'s log with `options`; output arrives on the
/// returned channel, which ends with the log (or when the container stops,
/// when following). Dropping the receiver stops the reader.
pub fn stream(
    container: &ContainerRef,
    pod: &str,
    name: &str,
    options: LogOptions,
) -> Result<mpsc::Receiver<Bytes>, StreamError> {
    let (log, follow) = if options.previous {
        let previous = container.previous_log_path.clone().ok_or_else(|| {
            StreamError::BadRequest(format!(
                "previous terminated container {name:?} in pod {pod:?} not found"
            ))
        })?;
        (previous, None)
    } else {
        let follow = options.follow.then(|| container.state_dir.clone());
        (container.log_path.clone(), follow)
    };
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut reader = Reader {
            options,
            out: Vec::with_capacity(CHUNK),
            remaining: u64::MAX,
            tx,
        };
        if let Some(limit) = reader.options.limit_bytes {
            reader.remaining = limit;
        }
        if let Err(e) = reader.run(&log, follow.as_deref()).await {
            tracing::debug!(error = %e, log = %log.display(), "reading a container log");
        }
    });
    Ok(rx)
}

struct Reader {
    options: LogOptions,
    out: Vec<u8>,
    remaining: u64,
    tx: mpsc::Sender<Bytes>,
}

/// Why reading stopped early.
#[derive(Debug)]
enum Stop {
    /// The reader went away or the byte limit was reached.
    Done,
    Io(std::io::Error),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Done => f.write_str("done"),
            Stop::Io(e) => e.fmt(f),
        }
    }
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Io(e)
    }
}

impl Reader {
    async fn run(&mut self, log: &Path, follow: Option<&Path>) -> Result<(), Stop> {
        match self.read_all(log, follow).await {
            Ok(()) | Err(Stop::Done) => {
                let _ = self.flush().await;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn read_all(&mut self, log: &Path, follow: Option<&Path>) -> Result<(), Stop> {
        let files = crilog::files_oldest_first(log);
        // Records to skip for tailLines, counted over all files.
        let mut skip = 0usize;
        if let Some(tail) = self.options.tail_lines {
            let mut total = 0usize;
            for file in &files {
                total += count_records(&std::fs::read(file)?);
            }
            skip = total.saturating_sub(usize::try_from(tail).unwrap_or(usize::MAX));
        }
        let mut live = None;
        for file in &files {
            let data = match std::fs::read(file) {
                Ok(data) => data,
                // Rotated away while we were reading the others.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            // An unterminated last line is still being written.
            let complete = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            for line in data[..complete].split(|b| *b == b'\n') {
                if line.is_empty() {
                    continue;
                }
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                self.record(line).await?;
            }
            if file == log {
                live = Some(complete as u64);
            }
        }
        let Some(state_dir) = follow else {
            return Ok(());
        };
        self.flush().await?;
        self.follow(log, state_dir, live.unwrap_or(0)).await
    }

    /// Reads what the container appends to `log` from `offset` on, moving
    /// to the new file when the log rotates, until the container has
    /// exited and everything is read.
    async fn follow(&mut self, log: &Path, state_dir: &Path, offset: u64) -> Result<(), Stop> {
        let mut current: Option<(File, u64)> = None;
        let mut position = offset;
        let mut pending: Vec<u8> = Vec::new();
        let mut buffer = vec![0u8; CHUNK];
        loop {
            if current.is_none() {
                match File::open(log) {
                    Ok(mut file) => {
                        let inode = file.metadata()?.ino();
                        file.seek(SeekFrom::Start(position))?;
                        current = Some((file, inode));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let exited = !shim::running(state_dir);
            let mut read_any = false;
            if let Some((file, inode)) = &mut current {
                loop {
                    let n = file.read(&mut buffer)?;
                    if n == 0 {
                        break;
                    }
                    read_any = true;
                    pending.extend_from_slice(&buffer[..n]);
                    while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=end).collect();
                        self.record(&line[..line.len() - 1]).await?;
                    }
                }
                // Rotated: this file is drained; go on with the new one.
                let replaced = std::fs::metadata(log).map(|m| m.ino() != *inode);
                if matches!(replaced, Ok(true)) {
                    current = None;
                    position = 0;
                    pending.clear();
                    continue;
                }
            }
            self.flush().await?;
            if exited && !read_any {
                return Ok(());
            }
            if self.tx.is_closed() {
                return Err(Stop::Done);
            }
            if !read_any {
                tokio::time::sleep(FOLLOW_POLL).await;
            }
        }
    }

    /// Writes one record as kubelet prints it.
    async fn record(&mut self, line: &[u8]) -> Result<(), Stop> {
        let Some(record) = crilog::parse(line) else {
            return Ok(());
        };
        if let Some(since) = self.options.since
            && record.time < since
        {
            return Ok(());
        }
        let start = self.out.len();
        if self.options.timestamps {
            self.out
                .extend_from_slice(crilog::fixed_nanos(record.time).as_bytes());
            self.out.push(b' ');
        }
        self.out.extend_from_slice(record.content);
        if record.full {
            self.out.push(b'\n');
        }
        let added = (self.out.len() - start) as u64;
        if added >= self.remaining {
            self.out.truncate(start + self.remaining as usize);
            self.remaining = 0;
            self.flush().await?;
            return Err(Stop::Done);
        }
        self.remaining -= added;
        if self.out.len() >= CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        if self.out.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.out, Vec::with_capacity(CHUNK)));
        self.tx.send(chunk).await.map_err(|_| Stop::Done)
    }
}

fn count_records(data: &[u8]) -> usize {
    data.split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query: &str) -> Vec<(String, String)> {
        form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect()
    }

    #[test]
    fn options_parse_as_kubelet_reads_them() {
        let now: Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let o = LogOptions::parse(
            &params("follow=true&tailLines=3&limitBytes=10&timestamps=true&sinceSeconds=60"),
            now,
        )
        .unwrap();
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!(o.tail_lines, Some(3));
        assert_eq!(o.limit_bytes, Some(10));
        assert_eq!(o.since, Some("2026-11-27T11:59:00Z".parse().unwrap()));
        let o = LogOptions::parse(&params("sinceTime=2026-11-27T10:00:00Z"), now).unwrap();
        assert_eq!(o.since, Some("2026-11-27T10:00:00Z".parse().unwrap()));
        for bad in [
            "tailLines=-1",
            "tailLines=x",
            "follow=maybe",
            "sinceSeconds=0",
        ] {
            assert!(LogOptions::parse(&params(bad), now).is_err(), "{bad}");
        }
    }

    async fn read(dir: &Path, options: LogOptions) -> String {
        let container = ContainerRef {
            id: "c".into(),
            runtime: "runc".into(),
            runtime_root: dir.join("root"),
            log_path: dir.join("0.log"),
            previous_log_path: None,
            state_dir: dir.join("state"),
            netns: None,
            tty: false,
            stdin: false,
            running: false,
        };
        let mut rx = stream(&container, "p", "c", options).unwrap();
        let mut out = Vec::new();
        while let Some(chunk) = rx.recv().await {
            out.extend_from_slice(&chunk);
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn reads_rotated_files_in_order_with_the_options() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0.log");
        std::fs::write(
            crilog::rotated(&log, 2),
            "2026-11-27T10:00:00Z stdout F one\n2026-11-27T10:00:01Z stdout P tw\n",
        )
        .unwrap();
        std::fs::write(
            crilog::rotated(&log, 1),
            "2026-11-27T10:00:02Z stdout F o\nnot a record\n",
        )
        .unwrap();
        std::fs::write(
            &log,
            "2026-11-27T11:00:00.5Z stderr F three\n2026-11-27T11:00:01Z stdout F four\n",
        )
        .unwrap();
        let all = read(dir.path(), LogOptions::default()).await;
        assert_eq!(all, "one\ntwo\nthree\nfour\n");
        let tail = read(
            dir.path(),
            LogOptions {
                tail_lines: Some(2),
                timestamps: true,
                ..LogOptions::default()
            },
        )
        .await;
        assert_eq!(
            tail,
            "2026-11-27T11:00:00.500000000Z three\n2026-11-27T11:00:01.000000000Z four\n"
        );
        let since = read(
            dir.path(),
            LogOptions {
                since: Some("2026-11-27T10:30:00Z".parse().unwrap()),
                limit_bytes: Some(8),
                ..LogOptions::default()
            },
        )
        .await;
        assert_eq!(since, "three\nfo");
    }
}
