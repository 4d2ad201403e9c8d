//! Links and addresses through rtnetlink, in the agent's own network namespace.
use std::net::IpAddr;

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkUnspec,
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkMessage},
    },
};

use crate::error::{NvError, Result};

pub struct Netlink {
    handle: Handle,
}

fn nl_err(what: &str, e: impl std::fmt::Display) -> NvError {
    NvError::Netlink(format!("{what}: {e}"))
}

/// Link facts the agent needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
}

fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        mtu: 0,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => info.name.clone_from(name),
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            _ => {}
        }
    }
    info
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

    /// Whether `addr/len` is on the link.
    pub async fn has_address(&self, index: u32, addr: IpAddr) -> Result<bool> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(|e| nl_err("get addresses", e))?
        {
            if msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(a) | AddressAttribute::Local(a) if *a == addr))
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub async fn add_address(&self, index: u32, addr: IpAddr, len: u8) -> Result<()> {
        self.handle
            .address()
            .add(index, addr, len)
            .execute()
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
