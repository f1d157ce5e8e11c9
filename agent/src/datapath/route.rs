//! Finds the interface the kernel routes an address through (`RTM_GETROUTE`, as `ip route
//! get` does), in the agent's network namespace. A local pod's host-side interface is the one
//! its address routes through: no interface names in configuration.

use std::{ffi::CStr, io, net::IpAddr};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{LinkAttribute, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("netlink: {0}")]
    Io(#[from] io::Error),
    #[error("no route to {addr}: {source}")]
    NoRoute { addr: IpAddr, source: io::Error },
    #[error("{addr} is routed as {kind:?}, not through a pod interface")]
    NotUnicast { addr: IpAddr, kind: RouteType },
    #[error("the route to {addr} names no output interface")]
    NoInterface { addr: IpAddr },
    #[error("netlink: undecodable answer: {0}")]
    Decode(String),
}

/// The host's routing as the agent asks it (a seam, so the endpoint owner is tested without a
/// kernel).
pub trait Routes {
    /// The interface the kernel routes `addr` through.
    fn lookup(&self, addr: IpAddr) -> Result<Interface, RouteError>;
    /// The name of interface `index`, while it exists.
    fn interface(&self, index: u32) -> Option<String>;
    /// Whether `iface` is a bridge (a route through it names no single pod's interface).
    fn is_bridge(&self, iface: &Interface) -> bool;
    /// This node's own addresses (see [`local_addresses`]).
    fn local_addresses(&self) -> io::Result<Vec<IpAddr>>;
}

/// The kernel's answers, over netlink and `getifaddrs`, in the agent's network namespace.
#[derive(Debug, Default, Clone, Copy)]
pub struct Netlink;

impl Routes for Netlink {
    fn lookup(&self, addr: IpAddr) -> Result<Interface, RouteError> {
        lookup(addr)
    }

    fn interface(&self, index: u32) -> Option<String> {
        if_name(index).ok()
    }

    fn is_bridge(&self, iface: &Interface) -> bool {
        matches!(link(&iface.name), Ok(Some((i, Some(kind)))) if i == iface.index && kind == "bridge")
    }

    fn local_addresses(&self) -> io::Result<Vec<IpAddr>> {
        local_addresses()
    }
}

/// An interface found by route lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
}

/// The output interface of the route to `addr`.
pub fn lookup(addr: IpAddr) -> Result<Interface, RouteError> {
    let mut msg = RouteMessage::default();
    match addr {
        IpAddr::V4(_) => {
            msg.header.address_family = AddressFamily::Inet;
            msg.header.destination_prefix_length = 32;
        }
        IpAddr::V6(_) => {
            msg.header.address_family = AddressFamily::Inet6;
            msg.header.destination_prefix_length = 128;
        }
    }
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(addr)));
    let reply = ask(RouteNetlinkMessage::GetRoute(msg))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
            if route.header.kind != RouteType::Unicast {
                return Err(RouteError::NotUnicast {
                    addr,
                    kind: route.header.kind,
                });
            }
            let index = route
                .attributes
                .iter()
                .find_map(|a| {
                    if let RouteAttribute::Oif(i) = a {
                        Some(*i)
                    } else {
                        None
                    }
                })
                .ok_or(RouteError::NoInterface { addr })?;
            Ok(Interface {
                index,
                name: if_name(index)?,
            })
        }
        NetlinkPayload::Error(e) => Err(RouteError::NoRoute {
            addr,
            source: e.code.map_or_else(
                || io::Error::other("unknown"),
                |c| io::Error::from_raw_os_error(-c.get()),
            ),
        }),
        other => Err(RouteError::Decode(format!("unexpected answer {other:?}"))),
    }
}

/// Sends one request and returns the kernel's one answer.
fn ask(request: RouteNetlinkMessage) -> Result<NetlinkMessage<RouteNetlinkMessage>, RouteError> {
    let mut req = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(request));
    req.header.flags = NLM_F_REQUEST;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    let mut answer = vec![0; 16 * 1024];
    let n = socket.recv(&mut &mut answer[..], 0)?;
    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n])
        .map_err(|e| RouteError::Decode(e.to_string()))
}

/// An interface by name: its index and its kind (`veth`, `bridge`…; `None` for a physical
/// one), or `None` when there is no such interface in this network namespace.
pub fn link(name: &str) -> Result<Option<(u32, Option<String>)>, RouteError> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
    match ask(RouteNetlinkMessage::GetLink(msg))?.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
            let kind = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                }),
                _ => None,
            });
            Ok(Some((link.header.index, kind)))
        }
        NetlinkPayload::Error(e) if e.code.is_some_and(|c| -c.get() == libc::ENODEV) => Ok(None),
        NetlinkPayload::Error(e) => Err(RouteError::Io(e.code.map_or_else(
            || io::Error::other("unknown"),
            |c| io::Error::from_raw_os_error(-c.get()),
        ))),
        other => Err(RouteError::Decode(format!("unexpected answer {other:?}"))),
    }
}

/// The name of interface `index` in the current network namespace.
pub fn if_name(index: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// This network namespace's own addresses, other than loopback and link-local: the sources of
/// connections the node itself opens towards its pods (kubelet probes).
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points to a sockaddr whose family says its real type.
        let addr = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        let link_local = match addr {
            IpAddr::V4(a) => a.is_link_local(),
            IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
        };
        if !addr.is_loopback() && !link_local && !out.contains(&addr) {
            out.push(addr);
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every Linux network namespace routes loopback through `lo`, as a local (not unicast)
    /// route: the lookup must say so rather than call `lo` a pod interface.
    #[test]
    fn loopback_is_not_a_pod_interface() {
        match lookup("127.0.0.1".parse().unwrap()) {
            Err(RouteError::NotUnicast { kind, .. }) => assert_eq!(kind, RouteType::Local),
            other => panic!("expected a local route, got {other:?}"),
        }
        assert_eq!(if_name(1).unwrap(), "lo");
        // `lo` is index 1 and has no kind; a missing interface is `None`, not an error.
        assert_eq!(link("lo").unwrap(), Some((1, None)));
        assert_eq!(link("pcnosuchif0").unwrap(), None);
    }
}
