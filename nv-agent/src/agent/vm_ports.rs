//! VM ports as they come and go: followed by link events (and a periodic look), filtered
//! when they appear, set down when they cannot be filtered, refused when they are not a VM's.

use tracing::{info, warn};

use super::Agent;
use crate::{
    catalog::describe,
    error::{NvError, Result, invalid},
    model::LookupRecord,
    netlink::{LinkInfo, LinkKind},
    translate::Attached,
};

/// Descriptors held for the moment the agent runs out: attaching the filter to a VM port
/// needs a few, and a port it cannot filter must be set down.
#[derive(Default)]
pub(super) struct FdReserve(Vec<std::fs::File>);

impl FdReserve {
    const SIZE: usize = 16;

    pub(super) fn refill(&mut self) {
        while self.0.len() < Self::SIZE {
            match std::fs::File::open("/dev/null") {
                Ok(f) => self.0.push(f),
                Err(_) => return,
            }
        }
    }

    pub(super) fn clear(&mut self) {
        self.0.clear();
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Agent {
    /// Gives a tap port the VM MTU: its host side is what libvirt mirrors and QEMU's
    /// `host_mtu` tells a virtio guest, and a tap takes the guest's frames whatever its MTU.
    /// A veth is left alone: its VM end is in the VM's namespace, which rtnetlink cannot
    /// address for a change, and a host end smaller than the VM's would make the kernel drop
    /// the VM's bigger frames before nv sees them. Best effort either way: a VM that sends
    /// more than fits is answered with ICMP "fragmentation needed".
    pub(super) async fn set_port_mtu(&self, link: &LinkInfo) {
        let mtu = match self.tables.catalog.on_port(&link.name).first() {
            Some(record) => self.vm_mtu_over(record.pa),
            None => self.vm_mtu(),
        };
        if link.kind != LinkKind::Tap || link.mtu == mtu {
            return;
        }
        if let Err(e) = self.netlink.set_mtu(link.index, mtu).await {
            warn!(
                "port {}: cannot set MTU {mtu}: {}",
                link.name,
                crate::error::one_line(&e)
            );
        }
    }

    /// The port called `name` if it exists and can be a VM port; anything else is treated
    /// as missing, and said so.
    pub(super) async fn port_link(&self, name: &str) -> Result<Option<LinkInfo>> {
        match self.netlink.link(name).await? {
            Some(link) => match link.vm_port_refusal() {
                None => Ok(Some(link)),
                Some(why) => {
                    warn!("{why}; not attaching it");
                    Ok(None)
                }
            },
            None => Ok(None),
        }
    }

    /// Looks at every port again: a backstop for link events lost to a socket overrun.
    pub async fn refresh(&mut self) -> Result<()> {
        let ports: Vec<String> = self.tables.catalog.ports().map(str::to_owned).collect();
        for port in ports {
            self.refresh_port(&port).await?;
        }
        let orphans: Vec<(String, u32)> = self
            .tables
            .ports
            .orphans()
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (port, ifindex) in orphans {
            self.refresh_orphans(&port, ifindex).await?;
        }
        self.try_take_rewrite_pas().await;
        self.refresh_uplink().await
    }

    /// Follows a link event: the uplink's MTU, or a VM port that appeared, went down or up,
    /// vanished or was re-created.
    pub async fn link_changed(&mut self, name: &str, index: u32) -> Result<()> {
        if name == self.uplink {
            return self.refresh_uplink().await;
        }
        if crate::netlink::is_bounce(name) {
            return self.refresh_bounce().await;
        }
        if self.tables.catalog.by_port(name).is_some() {
            self.refresh_port(name).await?;
        }
        self.refresh_orphans(name, index).await?;
        // A port renamed away keeps its ifindex: the port of that name is gone.
        let renamed: Vec<String> = self
            .tables
            .ports
            .attached()
            .filter(|(port, a)| a.ifindex == index && port.as_str() != name)
            .map(|(port, _)| port.clone())
            .collect();
        for port in renamed {
            self.refresh_port(&port).await?;
        }
        Ok(())
    }

    /// Lets go of orphaned ports whose device is gone or was replaced (a new device of that
    /// name is not nv's).
    pub(super) async fn refresh_orphans(&mut self, name: &str, index: u32) -> Result<()> {
        let touched: Vec<(String, u32)> = self
            .tables
            .ports
            .orphans()
            .filter(|(port, i)| port.as_str() == name || **i == index)
            .map(|(port, i)| (port.clone(), *i))
            .collect();
        for (port, ifindex) in touched {
            if self.netlink.link(&port).await?.map(|l| l.index) != Some(ifindex) {
                info!("port {port} (no record) is gone; releasing its filter");
                self.datapath.detach_port(&port)?;
                self.tables.ports.drop_orphan(&port);
            }
        }
        Ok(())
    }

    /// Brings one VM port's map entries in line with its device.
    pub(super) async fn refresh_port(&mut self, port: &str) -> Result<()> {
        let Some(record) = self.tables.catalog.by_port(port) else {
            return Ok(());
        };
        let link = self.port_link(port).await?;
        let before = self.tables.ports.get(port);
        let now = link.as_ref().map(Attached::of);
        if now == before {
            return Ok(());
        }
        info!(
            "port {port} of {} changed ({before:?} -> {now:?}); updating the datapath",
            describe(&record)
        );
        let filtered = before.is_none_or(|b| now.is_some_and(|n| n.ifindex != b.ifindex));
        let mut relinked = self.tables.relink(&mut self.datapath, port, now);
        if relinked.is_err() && !self.fd_reserve.is_empty() {
            // Perhaps out of descriptors: the reserve is for this.
            self.fd_reserve.clear();
            relinked = self.tables.relink(&mut self.datapath, port, now);
        }
        let Some(link) = link else {
            self.unfiltered.remove(port);
            return relinked.map(drop);
        };
        if let Err(e) = relinked {
            // A VM port nv cannot filter must not stay open to the host.
            return self.set_down(&link, &e).await;
        }
        if filtered {
            self.set_port_mtu(&link).await;
        }
        if self.unfiltered.remove(port) == Some(link.index) {
            info!("port {port} is filtered now; setting it up again");
            self.netlink.set_up(link.index, true).await?;
        }
        self.fd_reserve.refill();
        Ok(())
    }

    /// Sets a VM port that cannot be filtered down, through the netlink socket the agent
    /// holds (no new descriptor needed), and keeps it to try again.
    pub(super) async fn set_down(&mut self, link: &LinkInfo, why: &NvError) -> Result<()> {
        if self.unfiltered.get(&link.name) != Some(&link.index) {
            self.ports_set_down += 1;
            tracing::error!(
                port = %link.name,
                "cannot filter port {} ({why}); setting it down until it can be",
                link.name
            );
        }
        self.unfiltered.insert(link.name.clone(), link.index);
        self.netlink.set_up(link.index, false).await
    }

    /// Whether a port nv set down waits to be filtered.
    pub fn has_unfiltered(&self) -> bool {
        !self.unfiltered.is_empty()
    }

    /// Tries again to filter the ports nv set down.
    pub async fn retry_unfiltered(&mut self) -> Result<()> {
        self.fd_reserve.refill();
        let ports: Vec<String> = self.unfiltered.keys().cloned().collect();
        for port in ports {
            self.refresh_port(&port).await?;
        }
        Ok(())
    }

    /// Checks what needs the host itself: the port exists, is a veth or tap, carries no host
    /// address and is not the uplink or nv's own. Returns the port's link.
    pub(super) async fn check_port(&self, r: &LookupRecord) -> Result<Option<LinkInfo>> {
        let Some(port) = &r.port else {
            return Ok(None);
        };
        if let Some(why) = super::cluster_ops::port_refusal(r, &self.uplink) {
            return Err(invalid(why));
        }
        let link = self.require_link(port, "port").await?;
        self.check_vm_link(&link).await?;
        Ok(Some(link))
    }

    /// Whether the device `link` can be a VM's port: a veth (its other end elsewhere) or a
    /// tap, of no bridge, carrying no address of the host's.
    pub(super) async fn check_vm_link(&self, link: &LinkInfo) -> Result<()> {
        let port = &link.name;
        if let Some(why) = link.vm_port_refusal() {
            return Err(invalid(why));
        }
        // A device the host itself talks through is not a VM's port.
        if let Some(addr) = self.netlink.routable_addresses(link.index).await?.first() {
            return Err(invalid(format!(
                "port '{port}' carries the host address {addr}: a VM's port carries none"
            )));
        }
        Ok(())
    }
}
