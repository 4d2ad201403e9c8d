//! The agent's side of [`crate::underlay_hops`]: what to resolve, and the map it fills.
use std::{collections::HashMap, net::Ipv4Addr};

use nv_common::UnderlayHop;

use super::Agent;
use crate::error::Result;

impl Agent {
    /// The uplink (ifindex and MAC) and the other hosts' IPv4 PAs the records name.
    pub fn underlay_targets(&self) -> (u32, [u8; 6], Vec<Ipv4Addr>) {
        (
            self.uplink_ifindex,
            self.uplink_mac,
            self.tables.catalog.remote_pas4(),
        )
    }

    /// Makes the datapath's underlay hops `hops`: how many entries changed.
    pub fn set_underlay_hops(&mut self, hops: &HashMap<u32, UnderlayHop>) -> Result<usize> {
        self.datapath.set_underlay_hops(hops)
    }
}
