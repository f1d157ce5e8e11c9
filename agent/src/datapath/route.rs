//! Finds the interface the kernel routes an address through (`RTM_GETROUTE`, as `ip route
//! get` does), in the agent's network namespace. A local pod's host-side interface is the one
//! its address routes through: no interface names in configuration.

use std::{ffi::CStr, io, net::IpAddr};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
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
    let mut req = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetRoute(msg)),
    );
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
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n])
        .map_err(|e| RouteError::Decode(e.to_string()))?;
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
    }
}
