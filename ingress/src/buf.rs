//! A reusable read buffer for one byte stream (client or upstream
//! connection) and a per-connection deadline for reads that must finish in
//! time. Bytes past the message being handled (a pipelined request) stay in
//! the buffer for the next one.

use std::io;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::{Instant, Sleep};

/// Bytes read ahead of a read are at least this many.
const READ_SIZE: usize = 8 * 1024;

#[derive(Debug)]
pub struct Buf {
    data: Vec<u8>,
    /// Start of the bytes not handled yet.
    pos: usize,
}

impl Default for Buf {
    fn default() -> Self {
        Buf {
            data: Vec::with_capacity(READ_SIZE),
            pos: 0,
        }
    }
}

impl Buf {
    pub fn unread(&self) -> &[u8] {
        &self.data[self.pos..]
    }

    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.data.len());
    }

    /// The unread bytes, handed over (to the generic path).
    pub fn into_unread(mut self) -> Vec<u8> {
        self.data.drain(..self.pos);
        self.data
    }

    /// Reads more after the unread bytes; `Ok(0)` is the end of the stream.
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<usize> {
        if self.pos == self.data.len() {
            self.data.clear();
            self.pos = 0;
        } else if self.pos > 0 {
            self.data.drain(..self.pos);
            self.pos = 0;
        }
        if self.data.capacity() - self.data.len() < READ_SIZE / 4 {
            self.data.reserve(READ_SIZE);
        }
        r.read_buf(&mut self.data).await
    }
}

/// One timer per connection for its current deadline. Moving a deadline
/// later (every request) does not touch the timer; it is re-armed only
/// when it fires early, so a keep-alive request costs no timer operation.
pub struct Deadline {
    sleep: Pin<Box<Sleep>>,
    at: Instant,
}

impl Deadline {
    pub fn new(at: Instant) -> Self {
        Deadline {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            at,
        }
    }

    pub fn set(&mut self, at: Instant) {
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
        }
        self.at = at;
    }

    /// `Buf::fill` that fails with `TimedOut` at the deadline.
    pub async fn fill<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        buf: &mut Buf,
    ) -> io::Result<usize> {
        let Deadline { sleep, at } = self;
        loop {
            tokio::select! {
                biased;
                n = buf.fill(r) => return n,
                () = sleep.as_mut() => {
                    if Instant::now() >= *at {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    sleep.as_mut().reset(*at);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn keeps_what_follows() {
        let mut src: &[u8] = b"first|second";
        let mut buf = Buf::default();
        assert_eq!(buf.fill(&mut src).await.unwrap(), 12);
        buf.consume(6);
        assert_eq!(buf.unread(), b"second");
        assert_eq!(buf.fill(&mut src).await.unwrap(), 0);
        assert_eq!(buf.unread(), b"second");
        assert_eq!(buf.into_unread(), b"second");
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_moves_and_fires() {
        let (mut a, _b) = tokio::io::duplex(64);
        let mut buf = Buf::default();
        let start = Instant::now();
        let mut d = Deadline::new(start + Duration::from_secs(1));
        d.set(start + Duration::from_secs(3));
        let e = d.fill(&mut a, &mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= Duration::from_secs(3));
        // An earlier deadline takes effect at once.
        let now = Instant::now();
        d.set(now + Duration::from_secs(10));
        d.set(now + Duration::from_millis(100));
        assert!(d.fill(&mut a, &mut buf).await.is_err());
        assert!(now.elapsed() < Duration::from_secs(1));
    }
}
