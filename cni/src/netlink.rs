//! rtnetlink plumbing shared by the bridge, veth and namespace code.
//!
//! A netlink socket talks to the namespace it was opened in, so each batch of
//! work runs on a dedicated thread that first enters the wanted namespace and
//! drives its own small runtime; callers await the answer.

use std::future::Future;
use std::path::Path;

use futures::TryStreamExt;
use netlink_packet_route::link::{
    InfoBridgePort, InfoKind, InfoPortData, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkUnspec};

use crate::error::{CniError, netlink_errno};
use crate::netns;

const ENODEV: i32 = 19;

/// Runs `f` with a netlink handle in the namespace at `ns` (`None`: the
/// caller's own namespace).
pub(crate) async fn run<T, F, Fut>(ns: Option<&Path>, f: F) -> Result<T, CniError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, CniError>>,
{
    netns::run_in_async(ns, move || block_on_here(f)).await
}

/// Runs `f` with a netlink handle opened in the current thread's namespace,
/// on a runtime of its own. Only for threads that own no runtime already.
pub(crate) fn block_on_here<T, F, Fut>(f: F) -> Result<T, CniError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, CniError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::io("starting a netlink runtime", e))?;
    runtime.block_on(async move {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|e| CniError::io("opening a netlink socket", e))?;
        let driver = tokio::spawn(connection);
        let result = f(handle).await;
        driver.abort();
        result
    })
}

/// The link called `name`, if there is one.
pub(crate) async fn link_by_name(
    handle: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, CniError> {
    let mut links = handle.link().get().match_name(name).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if netlink_errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(CniError::netlink(format!("looking up link {name}"), e)),
    }
}

pub(crate) async fn set_up_by_name(handle: &Handle, name: &str) -> Result<(), CniError> {
    let link = link_by_name(handle, name)
        .await?
        .ok_or_else(|| CniError::Missing(format!("link {name} not found")))?;
    set_link(
        handle,
        LinkUnspec::new_with_index(link.header.index).up().build(),
        name,
    )
    .await
}

pub(crate) async fn set_link(
    handle: &Handle,
    message: LinkMessage,
    what: &str,
) -> Result<(), CniError> {
    handle
        .link()
        .set(message)
        .execute()
        .await
        .map_err(|e| CniError::netlink(format!("configuring link {what}"), e))
}

/// Applies bridge-port settings (`RTM_NEWLINK`: `set` does not carry them).
pub(crate) async fn set_port(
    handle: &Handle,
    message: LinkMessage,
    what: &str,
) -> Result<(), CniError> {
    handle
        .link()
        .set_port(message)
        .execute()
        .await
        .map_err(|e| CniError::netlink(format!("configuring bridge port {what}"), e))
}

/// Deletes link `index`; a link that is already gone is fine.
pub(crate) async fn delete_link(handle: &Handle, index: u32, what: &str) -> Result<(), CniError> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if netlink_errno(&e) == Some(ENODEV) => Ok(()),
        Err(e) => Err(CniError::netlink(format!("deleting link {what}"), e)),
    }
}

pub(crate) fn kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(kind) => Some(kind),
            _ => None,
        }),
        _ => None,
    })
}

pub(crate) fn mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => bytes.as_slice().try_into().ok(),
        _ => None,
    })
}

pub(crate) fn alias(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(alias) => Some(alias.as_str()),
        _ => None,
    })
}

/// The bridge (or other master) the link is enslaved to.
pub(crate) fn controller(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(index) => Some(*index),
        _ => None,
    })
}

/// For a bridge port: whether frames may go back out the port they came
/// in on (`hairpin on`).
pub(crate) fn hairpin(link: &LinkMessage) -> Option<bool> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::PortData(InfoPortData::BridgePort(port)) => {
                port.iter().find_map(|p| match p {
                    InfoBridgePort::HairpinMode(on) => Some(*on),
                    _ => None,
                })
            }
            _ => None,
        }),
        _ => None,
    })
}

/// For a veth: the peer's interface index (in the peer's namespace).
pub(crate) fn peer_index(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(index) => Some(*index),
        _ => None,
    })
}

pub(crate) fn mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(mtu) => Some(*mtu),
        _ => None,
    })
}

pub(crate) fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}
