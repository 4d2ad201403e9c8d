//! What the slow path tells the VM behind a port: its DHCP lease ([`crate::dhcp::Lease`]) and
//! its router advertisement ([`crate::ra::Advert`]), from its records and their subnets.
use std::net::IpAddr;

use super::Agent;
use crate::{
    dhcp::{Lease, MAX_CLASSLESS_ROUTES, Unanswered, v6::Lease6},
    model::Subnet,
    ra::{Advert, slaac_address},
};

impl Agent {
    /// The name of the VM port `ifindex`.
    fn port_at(&self, ifindex: u32) -> Option<&String> {
        self.tables
            .ports
            .attached()
            .find_map(|(name, at)| (at.ifindex == ifindex).then_some(name))
    }

    /// The router advertisement for the VM behind the port `ifindex`: from its IPv6 record
    /// and the on-link IPv6 route of its VSID that holds its CA.
    pub fn router_advert(&self, ifindex: u32) -> Option<Advert> {
        let port = self.port_at(ifindex)?;
        let record = self
            .tables
            .catalog
            .on_port(port)
            .into_iter()
            .find(|r| r.ca.is_ipv6())?;
        let IpAddr::V6(ca) = record.ca else {
            return None;
        };
        let subnet = self
            .tables
            .catalog
            .routes()
            .subnet_of(record.vsid, record.ca)?;
        let IpAddr::V6(prefix) = subnet.prefix.addr else {
            return None;
        };
        let len = subnet.prefix.len;
        Some(Advert {
            vm_mac: record.mac.0,
            router_mac: *crate::datapath::router_mac(),
            prefix,
            len,
            slaac: len == 64 && slaac_address(prefix, record.mac.0) == ca,
            mtu: self.vm_mtu_over(record.pa),
        })
    }

    /// The `DHCPv6` lease of the VM behind the port `ifindex`: its IPv6 record, in an IPv6
    /// subnet of its VSID.
    pub fn dhcp6_lease(&self, ifindex: u32) -> Result<Lease6, Unanswered> {
        let port = self.port_at(ifindex).ok_or(Unanswered::NoRecord)?;
        let record = self
            .tables
            .catalog
            .on_port(port)
            .into_iter()
            .find(|r| r.ca.is_ipv6())
            .ok_or(Unanswered::NoRecord)?;
        let IpAddr::V6(ca) = record.ca else {
            return Err(Unanswered::NoRecord);
        };
        self.tables
            .catalog
            .routes()
            .subnet_of(record.vsid, record.ca)
            .ok_or(Unanswered::NoSubnet)?;
        Ok(Lease6 {
            mac: record.mac.0,
            ca,
            router_mac: *crate::datapath::router_mac(),
        })
    }

    /// Every VM port's advertisement, for the periodic round.
    pub fn router_adverts(&self) -> Vec<(u32, Advert)> {
        self.tables
            .ports
            .attached()
            .filter_map(|(_, at)| Some((at.ifindex, self.router_advert(at.ifindex)?)))
            .collect()
    }

    /// The lease of the VM behind the port `ifindex`, from its IPv4 record and the on-link
    /// route of its VSID that holds its CA.
    pub fn dhcp_lease(&self, ifindex: u32) -> Result<Lease, Unanswered> {
        let port = self.port_at(ifindex).ok_or(Unanswered::NoRecord)?;
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
            .subnet_of(record.vsid, IpAddr::V4(ca))
            .ok_or(Unanswered::NoSubnet)?;
        let Some(IpAddr::V4(gateway)) = own.gateway_addr() else {
            return Err(Unanswered::NoSubnet);
        };
        // The domain's other prefixes, borrowed and no more than a reply holds (a domain of
        // ten thousand routes costs a request no more than one of ten). A domain with a
        // default route, or with more: the gateway is the default router.
        let mut prefixes: Vec<Subnet> = Vec::new();
        let mut fits = true;
        // IPv4's only: the domain's IPv6 prefixes are the advertisements' to tell.
        for p in routes
            .of_domain(rdid)
            .map(|r| r.prefix)
            .filter(|p| p.addr.is_ipv4())
        {
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
            mtu: u16::try_from(self.vm_mtu_over(record.pa)).unwrap_or(u16::MAX),
            routes,
        })
    }
}
