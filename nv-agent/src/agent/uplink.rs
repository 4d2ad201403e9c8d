//! The uplink and what lives on it: its MTU and MAC, the bounce pair, provider addresses,
//! and the rewrite PAs the datapath takes from the host.
use std::{collections::HashMap, net::IpAddr};

use tracing::{info, warn};

use super::Agent;
use crate::{
    error::{NvError, Result, invalid},
    model::{Provider, ProviderState, validate_ifname},
    tables::Change,
    txn::Links,
};

/// The shortest prefix a provider address may have (IPv4): the underlay of the README's
/// examples is 198.18.0.0/15.
const MIN_PROVIDER_PREFIX: u8 = 15;
/// The same for an IPv6 provider address: a site's /48.
const MIN_PROVIDER_PREFIX6: u8 = 48;

impl Agent {
    /// Follows the uplink's MTU: into the config map, and onto the ports when the VM MTU is
    /// derived from it.
    pub(super) async fn refresh_uplink(&mut self) -> Result<()> {
        let link = self.require_link(&self.uplink.clone(), "uplink").await?;
        if link.mac != self.uplink_mac {
            info!("uplink {} MAC is now {:02x?}", self.uplink, link.mac);
            self.uplink_mac = link.mac;
            self.update_config()?;
        }
        if link.mtu == self.uplink_mtu {
            return Ok(());
        }
        info!(
            "uplink {} MTU changed from {} to {}",
            self.uplink, self.uplink_mtu, link.mtu
        );
        self.uplink_mtu = link.mtu;
        self.update_config()?;
        if self.vm_mtu.is_none() {
            let ports: Vec<String> = self
                .tables
                .ports
                .attached()
                .map(|(p, _)| p.clone())
                .collect();
            for port in ports {
                if let Some(link) = self.port_link(&port).await? {
                    self.set_port_mtu(&link).await;
                }
            }
        }
        Ok(())
    }

    /// The bounce pair deleted or replaced behind the agent's back: out of the config first
    /// (super-packets are dropped and counted meanwhile), then made again.
    pub(super) async fn refresh_bounce(&mut self) -> Result<()> {
        let now = match (
            self.netlink.link(crate::netlink::BOUNCE).await?,
            self.netlink.link(crate::netlink::BOUNCE_PEER).await?,
        ) {
            (Some(a), Some(b)) => (a.index, b.index),
            _ => (0, 0),
        };
        if now == self.bounce && now.0 != 0 {
            return Ok(());
        }
        self.bounce = (0, 0);
        self.update_config()?;
        self.make_bounce().await?;
        self.update_config()?;
        info!("bounce pair {} ready again", crate::netlink::BOUNCE);
        Ok(())
    }

    /// Makes the bounce pair and puts its program on: only then may the config name it, so
    /// segments never reach a device without a program on it.
    pub(super) async fn make_bounce(&mut self) -> Result<()> {
        let pair = self.netlink.bounce_pair().await?;
        self.datapath.attach_bounce(crate::netlink::BOUNCE_PEER)?;
        self.bounce = pair;
        Ok(())
    }

    /// Rewrite PAs belong to the datapath: a provider address that a local VM's rewrite record
    /// uses becomes the datapath's (answered and filtered by it, in the maps first) and leaves
    /// the uplink, so no host process can bind it and the host's stack never answers for it,
    /// until the provider is deleted.
    pub(crate) async fn take_rewrite_pas(&mut self) -> Result<()> {
        let taken: Vec<ProviderState> = self
            .tables
            .catalog
            .providers()
            .iter()
            .filter(|p| !p.rewrite && self.tables.catalog.is_local_rewrite_pa(p.pa.addr))
            .map(|p| ProviderState {
                rewrite: true,
                ..p.clone()
            })
            .collect();
        if taken.is_empty() {
            return Ok(());
        }
        let changes: Vec<Change> = taken
            .iter()
            .map(|p| Change::PutProvider {
                provider: p.clone(),
            })
            .collect();
        self.tables.apply(
            &self.store,
            &mut self.datapath,
            &Links::default(),
            &changes,
            |_, _| Ok(()),
        )?;
        for p in &taken {
            info!(
                "provider address {} is a rewrite PA now: the datapath's, off {}",
                p.pa, p.dev
            );
            self.release_address(p).await?;
        }
        Ok(())
    }

    /// [`Agent::take_rewrite_pas`] after a change that went in: what fails is tried again at
    /// the next change and every look at the ports.
    pub(crate) async fn try_take_rewrite_pas(&mut self) {
        if let Err(e) = self.take_rewrite_pas().await {
            tracing::error!(
                "taking rewrite PAs off the host: {}; trying again shortly",
                crate::error::one_line(&e)
            );
        }
    }

    /// Takes a rewrite PA off its device, where the host's stack would answer for it.
    pub(super) async fn release_address(&self, p: &ProviderState) -> Result<()> {
        if let Some(link) = self.netlink.link(&p.dev).await?
            && self.netlink.has_address(link.index, p.pa.addr).await?
        {
            info!(
                "taking rewrite PA {} off {}: the datapath answers for it",
                p.pa, p.dev
            );
            self.netlink.del_address(link.index, p.pa.addr).await?;
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(pa = %p.pa, dev = ?p.dev))]
    pub async fn add_provider(&mut self, p: Provider) -> Result<ProviderState> {
        if let IpAddr::V6(a) = p.pa.addr
            && (a.is_unicast_link_local() || a.to_ipv4_mapped().is_some())
        {
            return Err(invalid(format!(
                "provider address {} is link-local or IPv4-mapped: give the host's global or \
                 unique local IPv6 address on the underlay, with its prefix",
                p.pa
            )));
        }
        if p.pa.addr.is_unspecified()
            || p.pa.addr.is_multicast()
            || p.pa.addr.is_loopback()
            || p.pa.len == 0
        {
            return Err(invalid(format!(
                "provider address {} is not a usable unicast address with a prefix",
                p.pa
            )));
        }
        // The prefix becomes a route on the underlay: a short one would make much of the
        // Internet on-link there.
        let min = if p.pa.addr.is_ipv4() {
            MIN_PROVIDER_PREFIX
        } else {
            MIN_PROVIDER_PREFIX6
        };
        if p.pa.len < min {
            return Err(invalid(format!(
                "provider address {}: a prefix shorter than /{min} would make that much \
                 address space on-link on the underlay; give the provider network's own prefix",
                p.pa
            )));
        }
        let remote = self.tables.catalog.remote_users_of(p.pa.addr);
        if remote > 0 {
            return Err(NvError::Conflict(format!(
                "provider address {} is another host's: {remote} lookup record(s) name it as \
                 the PA of a VM elsewhere; move or delete them first",
                p.pa.addr
            )));
        }
        let dev = p.dev.clone().unwrap_or_else(|| self.uplink.clone());
        validate_ifname("device", &dev)?;
        if dev != self.uplink {
            return Err(invalid(format!(
                "provider addresses go on the uplink ({}), not on '{dev}'",
                self.uplink
            )));
        }
        if let Some(existing) = self
            .tables
            .catalog
            .providers()
            .iter()
            .find(|e| e.pa.addr == p.pa.addr)
        {
            return Err(NvError::Conflict(format!(
                "provider address {} already exists on {}",
                existing.pa, existing.dev
            )));
        }
        let link = self.require_link(&dev, "device").await?;
        if let Some(other) = self.netlink.holder_of(p.pa.addr, link.index).await? {
            return Err(invalid(format!(
                "{} is an address of {other} on this host (the host's own): a provider \
                 address lives on the uplink ({dev}) alone",
                p.pa.addr
            )));
        }
        let present = self.netlink.has_address(link.index, p.pa.addr).await?;
        let state = ProviderState {
            pa: p.pa,
            dev,
            added_address: !present,
            rewrite: false,
        };
        if !present {
            self.netlink
                .add_address(link.index, p.pa.addr, p.pa.len)
                .await?;
        }
        let change = Change::PutProvider {
            provider: state.clone(),
        };
        if let Err(e) = self.apply(&[change], &HashMap::new(), |_, _| Ok(())).await {
            if !present {
                let _ = self.netlink.del_address(link.index, p.pa.addr).await;
            }
            return Err(e);
        }
        info!("added provider address {} on {}", state.pa, state.dev);
        if let Err(e) = self.retry_left_out().await {
            warn!(
                "trying the records left out again: {}",
                crate::error::one_line(&e)
            );
        }
        Ok(state)
    }

    #[tracing::instrument(skip(self))]
    pub async fn del_provider(&mut self, pa: IpAddr) -> Result<ProviderState> {
        let Some(removed) = self
            .tables
            .catalog
            .providers()
            .iter()
            .find(|p| p.pa.addr == pa)
            .cloned()
        else {
            return Err(NvError::NotFound(format!("no provider address {pa}")));
        };
        let users = self.tables.catalog.local_users_of(pa);
        if users > 0 {
            return Err(NvError::Conflict(format!(
                "provider address {pa} is used by {users} local lookup record(s); delete or move them first"
            )));
        }
        self.apply(
            &[Change::DelProvider { pa }],
            &HashMap::new(),
            |_, _| Ok(()),
        )
        .await?;
        // A rewrite PA left the host when the datapath took it.
        if removed.added_address
            && !removed.rewrite
            && let Some(link) = self.netlink.link(&removed.dev).await?
        {
            self.netlink.del_address(link.index, pa).await?;
        }
        info!("deleted provider address {}", removed.pa);
        if let Err(e) = self.retry_left_out().await {
            warn!(
                "trying the records left out again: {}",
                crate::error::one_line(&e)
            );
        }
        Ok(removed)
    }
}
