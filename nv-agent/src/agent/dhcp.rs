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
        let own = routes
            .subnet_of(record.vsid, ca)
            .ok_or(Unanswered::NoSubnet)?;
        let gateway = own.gateway_addr().ok_or(Unanswered::NoSubnet)?;
        // The domain's other prefixes, borrowed and no more than a reply holds (a domain of
        // ten thousand routes costs a request no more than one of ten). A domain with a
        // default route, or with more: the gateway is the default router.
        let mut prefixes: Vec<Subnet> = Vec::new();
        let mut fits = true;
        for p in routes.of_domain(rdid).map(|r| r.prefix) {
            if p.len == 0 || prefixes.len() == MAX_CLASSLESS_ROUTES {
                fits = false;
                break;
            }
            if p != own.prefix && prefixes.last() != Some(&p) {
                prefixes.push(p);
            }
        }
        let routes = fits.then_some(prefixes);
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
