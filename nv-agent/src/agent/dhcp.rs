//! What the DHCP server tells the VM behind a port: its record and its subnet
//! ([`crate::dhcp::Lease`]).
use std::net::IpAddr;

use super::Agent;
use crate::{
    dhcp::{Lease, MAX_CLASSLESS_ROUTES, Unanswered},
    model::Subnet,
};

impl Agent {
    /// The lease of the VM behind the port `ifindex`, from its IPv4 record and the on-link
    /// route of its VSID that holds its CA.
    pub fn dhcp_lease(&self, ifindex: u32) -> Result<Lease, Unanswered> {
        let port = self
            .tables
            .ports
            .attached()
            .find_map(|(name, at)| (at.ifindex == ifindex).then_some(name))
            .ok_or(Unanswered::NoRecord)?;
        let record = self
            .tables
            .catalog
            .by_port(port)
            .ok_or(Unanswered::NoRecord)?;
        let IpAddr::V4(ca) = record.ca else {
            return Err(Unanswered::NoRecord);
        };
        let routes = self.tables.catalog.routes();
        let rdid = routes.domain_of(record.vsid).ok_or(Unanswered::NoSubnet)?;
        let domain = routes.list(Some(rdid));
        let own = domain
            .iter()
            .find(|r| r.on_link() && r.vsid == record.vsid && r.prefix.contains(ca))
            .ok_or(Unanswered::NoSubnet)?;
        let gateway = own.gateway_addr().ok_or(Unanswered::NoSubnet)?;
        let mut prefixes: Vec<Subnet> = domain
            .iter()
            .map(|r| r.prefix)
            .filter(|p| *p != own.prefix)
            .collect();
        prefixes.dedup();
        // A domain with a default route, or more routes than a reply holds: the gateway is
        // the default router.
        let routes = (!prefixes.iter().any(|p| p.len == 0)
            && prefixes.len() <= MAX_CLASSLESS_ROUTES)
            .then_some(prefixes);
        Ok(Lease {
            mac: record.mac.0,
            ca,
            subnet: own.prefix,
            gateway,
            router_mac: *crate::datapath::router_mac(),
            mtu: u16::try_from(self.vm_mtu()).unwrap_or(u16::MAX),
            routes,
        })
    }
}
