//! The one error type of the crate. Each variant says which step failed, so
//! the agent's logs and the CNI plugin's error JSON are specific.

use std::io;

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{context}: {source}")]
    Sys {
        context: String,
        #[source]
        source: nix::Error,
    },
    #[error("{context}: {source}")]
    Netlink {
        context: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// Bad input from the caller: a name, an id, a CIDR.
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    /// Something else already owns a name we need.
    #[error("{0}")]
    Conflict(String),
    /// A thing that should exist does not (used by `check`).
    #[error("{0}")]
    Missing(String),
    #[error("no free address left in {0}")]
    Exhausted(Ipv4Net),
    /// A worker thread died before it answered (a panic in a closure).
    #[error("namespace worker thread failed: {0}")]
    Thread(String),
}

impl CniError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn sys(context: impl Into<String>, source: nix::Error) -> Self {
        Self::Sys {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn netlink(context: impl Into<String>, source: rtnetlink::Error) -> Self {
        Self::Netlink {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: &'static str, detail: impl Into<String>) -> Self {
        Self::Invalid {
            what,
            detail: detail.into(),
        }
    }
}

/// The errno a netlink request failed with, if the kernel answered with one.
pub(crate) fn netlink_errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => Some(msg.raw_code().abs()),
        _ => None,
    }
}
