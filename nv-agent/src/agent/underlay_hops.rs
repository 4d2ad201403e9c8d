//! The agent's side of [`crate::underlay_hops`]: what to resolve, and the map it fills.
use std::{collections::HashMap, net::Ipv4Addr};

use nv_common::UnderlayHop;

use super::Agent;
use crate::error::Result;

impl Agent {
    /// The uplink's ifindex and the other hosts' IPv4 PAs the records name.
    pub fn underlay_targets(&self) -> (u32, Vec<Ipv4Addr>) {
        (self.uplink_ifindex, self.tables.catalog.remote_pas4())
    }

    /// Makes the datapath's underlay hops `hops`, good until `alive` (`CLOCK_MONOTONIC` ns):
    /// how many entries changed.
    pub fn set_underlay_hops(
        &mut self,
        hops: &HashMap<u32, UnderlayHop>,
        alive: u64,
    ) -> Result<usize> {
        self.datapath.set_underlay_hops(hops, alive)
    }
}
