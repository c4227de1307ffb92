//! The two body types of the proxy: what goes upstream (the client's body
//! streamed as it comes, or nothing on a retry) and what goes back (the
//! upstream's body streamed, or a short local answer). Enums instead of
//! boxed trait objects keep the data path free of allocations.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::pool::Return;

pub enum UpstreamBody {
    Client(Incoming),
    Empty,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Client(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Client(b) => b.is_end_stream(),
            UpstreamBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Client(b) => b.size_hint(),
            UpstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}

pub enum ResponseBody {
    Upstream(Incoming),
    /// From a pooled HTTP/1.1 connection, returned at the end of the body.
    Pooled(Incoming, Return),
    Local(Option<Bytes>),
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let ResponseBody::Pooled(body, ret) = self
            && body.is_end_stream()
        {
            ret.finish();
        }
    }
}

impl ResponseBody {
    pub fn text(s: &'static str) -> Self {
        ResponseBody::Local(Some(Bytes::from_static(s.as_bytes())))
    }

    /// Keeps the connection out of the pool (it was upgraded).
    pub fn detach(&mut self) {
        if let ResponseBody::Pooled(_, ret) = self {
            ret.sender = None;
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ResponseBody::Pooled(b, ret) => {
                let frame = Pin::new(b).poll_frame(cx);
                if let Poll::Ready(None) = frame {
                    ret.finish();
                }
                frame
            }
            ResponseBody::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(b) | ResponseBody::Pooled(b, _) => b.is_end_stream(),
            ResponseBody::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(b) | ResponseBody::Pooled(b, _) => b.size_hint(),
            ResponseBody::Local(b) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
