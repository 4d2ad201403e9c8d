//! Links and addresses through rtnetlink, in the agent's own network namespace.
use std::net::IpAddr;

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkUnspec, LinkVeth,
    packet_core::{NetlinkMessage, NetlinkPayload, Nla as _},
    packet_route::{
        RouteNetlinkMessage,
        address::{AddressAttribute, AddressFlags, AddressHeaderFlags},
        link::{
            InfoData, InfoKind, InfoTun, LinkAttribute, LinkFlags, LinkInfo as Info, LinkMessage,
        },
    },
    sys::{AsyncSocket as _, SocketAddr},
};

use crate::error::{NvError, Result};

/// The bounce pair's ends: the kernel segments a VM tunnel's super-packets on `BOUNCE`'s
/// transmit, and the segments arrive on `BOUNCE_PEER`. Names no VM port may take.
pub const BOUNCE: &str = "nv-seg0";
pub const BOUNCE_PEER: &str = "nv-seg1";

/// Whether `name` is one of the bounce pair's ends.
pub fn is_bounce(name: &str) -> bool {
    name == BOUNCE || name == BOUNCE_PEER
}

pub struct Netlink {
    handle: Handle,
}

pub(crate) fn nl_err(what: &str, e: impl Into<crate::error::NetlinkSource>) -> NvError {
    NvError::netlink_by(what, e)
}

/// What kind of device a link is, as far as VM ports go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkKind {
    Veth,
    /// A tun device in tap mode (Ethernet frames): QEMU's and libvirt's VM NICs.
    Tap,
    /// Anything else, by its rtnetlink kind ("tun" for an L3 tun, "bridge", ...; "plain" for
    /// a physical NIC or loopback, which have none).
    Other(String),
}

impl std::fmt::Display for LinkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkKind::Veth => f.write_str("veth"),
            LinkKind::Tap => f.write_str("tap"),
            LinkKind::Other(kind) => f.write_str(kind),
        }
    }
}

/// Link facts the agent needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub kind: LinkKind,
    /// Up and with carrier (`IFF_UP` and `IFF_LOWER_UP`): a tap some QEMU holds, a veth whose
    /// other end is up too.
    pub running: bool,
    /// The link's Ethernet address (zero when it has none).
    pub mac: [u8; 6],
    /// `IFLA_LINK`: for a veth, its peer's ifindex (0 when none is given); with
    /// `peer_elsewhere`, the peer lives in another network namespace.
    pub peer: u32,
    pub peer_elsewhere: bool,
    /// `IFLA_MASTER`: the bridge (or bond, VRF) the link is enslaved to, 0 when none.
    pub master: u32,
}

impl LinkInfo {
    /// Why this device cannot be a VM's port, if it cannot: only a veth whose other end is in
    /// another namespace (the VM's) or a tap can, and neither when a bridge (or any master)
    /// holds it, which would switch the VM's frames past nv.
    pub fn vm_port_refusal(&self) -> Option<String> {
        let port = &self.name;
        match self.kind {
            LinkKind::Veth | LinkKind::Tap => {}
            LinkKind::Other(_) => {
                return Some(format!(
                    "port '{port}' is a {} device, not a veth or tap: only a VM's port can be one",
                    self.kind
                ));
            }
        }
        if self.master != 0 {
            return Some(format!(
                "port '{port}' is enslaved to another device (ifindex {}, a bridge?): a VM's \
                 port is nv's alone; take it out (`ip link set {port} nomaster`)",
                self.master
            ));
        }
        if self.kind == LinkKind::Veth && !self.peer_elsewhere {
            return Some(format!(
                "port '{port}' is a veth whose other end is in this host's own namespace (a \
                 container of the host, not a VM): move that end into the VM's namespace first"
            ));
        }
        None
    }
}

/// `IFLA_TUN_TYPE` and its tap value (`IFF_TAP`), from `linux/if_link.h` and `if_tun.h`.
const IFLA_TUN_TYPE: u16 = 3;
const IFF_TAP: u8 = 2;

fn tun_is_tap(nlas: &[InfoTun]) -> bool {
    nlas.iter().any(|t| {
        let InfoTun::Other(nla) = t else {
            return false;
        };
        let mut value = vec![0; nla.value_len()];
        nla.emit_value(&mut value);
        nla.kind() == IFLA_TUN_TYPE && value.first() == Some(&IFF_TAP)
    })
}

fn link_info(msg: &LinkMessage) -> LinkInfo {
    let flags = msg.header.flags;
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        mtu: 0,
        kind: LinkKind::Other("plain".into()),
        running: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
        mac: [0; 6],
        peer: 0,
        peer_elsewhere: false,
        master: 0,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => info.name.clone_from(name),
            LinkAttribute::Link(peer) => info.peer = *peer,
            LinkAttribute::LinkNetNsId(_) => info.peer_elsewhere = true,
            LinkAttribute::Controller(master) => info.master = *master,
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            LinkAttribute::Address(a) => {
                if let Ok(mac) = <[u8; 6]>::try_from(a.as_slice()) {
                    info.mac = mac;
                }
            }
            LinkAttribute::LinkInfo(infos) => {
                let kind = infos.iter().find_map(|i| match i {
                    Info::Kind(k) => Some(k.clone()),
                    _ => None,
                });
                let tap = infos
                    .iter()
                    .any(|i| matches!(i, Info::Data(InfoData::Tun(t)) if tun_is_tap(t)));
                info.kind = match kind {
                    Some(InfoKind::Veth) => LinkKind::Veth,
                    Some(InfoKind::Tun) if tap => LinkKind::Tap,
                    Some(k) => LinkKind::Other(k.to_string()),
                    None => LinkKind::Other("plain".into()),
                };
            }
            _ => {}
        }
    }
    info
}

/// A change to some link of the agent's namespace, from `RTNLGRP_LINK`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkEvent {
    pub name: String,
    pub index: u32,
}

/// `RTMGRP_LINK` (linux/rtnetlink.h): new, changed and deleted links.
const RTMGRP_LINK: u32 = 1;

/// Every link change in this network namespace, as the kernel announces it: VM ports that
/// appear, go down, come up, vanish. A lost event (the socket overran) is made up for by the
/// agent's periodic look at its ports.
pub fn link_events() -> Result<tokio::sync::mpsc::UnboundedReceiver<LinkEvent>> {
    announced(RTMGRP_LINK, "link events", |payload| match payload {
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l),
        ) => {
            let link = link_info(&l);
            Some(LinkEvent {
                name: link.name,
                index: link.index,
            })
        }
        _ => None,
    })
}

/// What the kernel announces to the multicast `groups` (an `RTMGRP_*` mask) in this network
/// namespace, each message as `pick` takes it (`None`: not wanted), on a connection of its
/// own. The channel closes when the announcements stop.
pub(crate) fn announced<T: Send + 'static>(
    groups: u32,
    what: &str,
    pick: impl Fn(NetlinkPayload<RouteNetlinkMessage>) -> Option<T> + Send + 'static,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<T>> {
    let (mut conn, _handle, mut messages) =
        rtnetlink::new_connection().map_err(|e| nl_err("connect", e))?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, groups))
        .map_err(|e| nl_err(&format!("subscribe to {what}"), e))?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use futures::StreamExt as _;
        while let Some((msg, _)) = messages.next().await {
            let msg: NetlinkMessage<RouteNetlinkMessage> = msg;
            if let Some(t) = pick(msg.payload)
                && tx.send(t).is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}

/// The next of `rx`'s messages; never, once there is no channel (it closed earlier).
pub async fn next_or_never<T>(
    rx: &mut Option<tokio::sync::mpsc::UnboundedReceiver<T>>,
) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Netlink {
    /// Opens a netlink connection; its driver task runs on the current tokio runtime.
    pub fn connect() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| nl_err("connect", e))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// The link called `name`, or `None` when there is none.
    pub async fn link(&self, name: &str) -> Result<Option<LinkInfo>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(msg) => Ok(msg.as_ref().map(link_info)),
            // The kernel answers ENODEV for an unknown name.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl_err(&format!("get link {name}"), e)),
        }
    }

    /// Every address on the link.
    async fn addresses(&self, index: u32) -> Result<Vec<IpAddr>> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(|e| nl_err("get addresses", e))?
        {
            for a in &msg.attributes {
                if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = a
                    && !out.contains(ip)
                {
                    out.push(*ip);
                }
            }
        }
        Ok(out)
    }

    /// The name of a link other than `except` that carries `addr`, if one does.
    pub async fn holder_of(&self, addr: IpAddr, except: u32) -> Result<Option<String>> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_address_filter(addr)
            .execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(|e| nl_err("get addresses", e))?
        {
            if msg.header.index != except {
                let name = match self.link_by_index(msg.header.index).await? {
                    Some(l) => l.name,
                    None => format!("ifindex {}", msg.header.index),
                };
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    async fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(msg) => Ok(msg.as_ref().map(link_info)),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl_err(&format!("get link {index}"), e)),
        }
    }

    /// Whether `addr` is on the link.
    pub async fn has_address(&self, index: u32, addr: IpAddr) -> Result<bool> {
        Ok(self.addresses(index).await?.contains(&addr))
    }

    /// The addresses on the link that the host's stack would answer from beyond the link
    /// itself: every IPv4 address, and IPv6 but link-local.
    pub async fn routable_addresses(&self, index: u32) -> Result<Vec<IpAddr>> {
        let mut out = self.addresses(index).await?;
        out.retain(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()));
        Ok(out)
    }

    /// Adds `addr/len`; an IPv6 address without duplicate address detection, as the kernel's
    /// tunnels do for theirs: a provider address is the operator's to give once, and a
    /// tentative one would not be answered for, nor sent from, for a second or more.
    pub async fn add_address(&self, index: u32, addr: IpAddr, len: u8) -> Result<()> {
        let mut req = self.handle.address().add(index, addr, len);
        if addr.is_ipv6() {
            let msg = req.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .map_err(|e| nl_err(&format!("add address {addr}/{len}"), e))
    }

    pub async fn del_address(&self, index: u32, addr: IpAddr) -> Result<()> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(addr)
            .execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(|e| nl_err("get addresses", e))?
        {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(|e| nl_err(&format!("delete address {addr}"), e))?;
        }
        Ok(())
    }

    /// The bounce pair (`BOUNCE`, `BOUNCE_PEER`), created when missing: a veth whose first
    /// end sends at most one segment per packet, so the kernel segments in software what is
    /// redirected to it. Returns both ifindexes.
    pub async fn bounce_pair(&self) -> Result<(u32, u32)> {
        // Only a veth pair of exactly these two ends, here, will do: segments must come back
        // to nv's program, never reach some other device's receive.
        let ours = |a: &LinkInfo, b: &LinkInfo| {
            a.kind == LinkKind::Veth
                && b.kind == LinkKind::Veth
                && a.peer == b.index
                && b.peer == a.index
                && !a.peer_elsewhere
                && !b.peer_elsewhere
        };
        match (self.link(BOUNCE).await?, self.link(BOUNCE_PEER).await?) {
            (Some(a), Some(b)) if ours(&a, &b) => {}
            (a, b) => {
                if a.is_some() || b.is_some() {
                    tracing::warn!(
                        "{BOUNCE} and {BOUNCE_PEER} are not nv's bounce pair; replacing them"
                    );
                }
                // Looked up again each: deleting one end of a veth takes its peer with it.
                for name in [BOUNCE, BOUNCE_PEER] {
                    self.del_link(name).await?;
                }
                let msg = LinkVeth::new(BOUNCE, BOUNCE_PEER)
                    .mtu(65_535)
                    .append_extra_attribute(LinkAttribute::GsoMaxSegs(1))
                    .build();
                self.handle
                    .link()
                    .add(msg)
                    .execute()
                    .await
                    .map_err(|e| nl_err(&format!("create the bounce pair {BOUNCE}"), e))?;
            }
        }
        let (Some(a), Some(b)) = (self.link(BOUNCE).await?, self.link(BOUNCE_PEER).await?) else {
            return Err(NvError::netlink(format!(
                "find the bounce pair {BOUNCE} {BOUNCE_PEER}: not there once created"
            )));
        };
        // No IPv6 on them: the host's own neighbour discovery would reach nv's program there
        // and be counted as frames from an unknown port.
        for name in [BOUNCE, BOUNCE_PEER] {
            let knob = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
            if let Err(e) = std::fs::write(&knob, "1") {
                tracing::debug!("cannot write {knob}: {e}");
            }
        }
        for index in [a.index, b.index] {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).mtu(65_535).up().build())
                .execute()
                .await
                .map_err(|e| nl_err(&format!("bring the bounce pair {BOUNCE} up"), e))?;
        }
        Ok((a.index, b.index))
    }

    /// Deletes the bounce pair (decommissioning); nothing when it is not there.
    pub async fn del_bounce_pair(&self) -> Result<()> {
        self.del_link(BOUNCE).await
    }

    /// Deletes the link called `name`, if there is one.
    async fn del_link(&self, name: &str) -> Result<()> {
        if let Some(l) = self.link(name).await? {
            self.handle
                .link()
                .del(l.index)
                .execute()
                .await
                .map_err(|e| nl_err(&format!("delete {name}"), e))?;
        }
        Ok(())
    }

    /// Sets the link administratively up or down.
    pub async fn set_up(&self, index: u32, up: bool) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index);
        let msg = if up { msg.up() } else { msg.down() }.build();
        self.handle.link().set(msg).execute().await.map_err(|e| {
            nl_err(
                &format!("set link {index} {}", if up { "up" } else { "down" }),
                e,
            )
        })
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| nl_err(&format!("set MTU {mtu} on link {index}"), e))
    }
}
