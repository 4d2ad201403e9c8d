//! Port tracking: which VM ports carry nv's filter, and for whom. Pure bookkeeping; the agent
//! attaches and detaches the filters, and the transaction path updates this with the maps.
use std::collections::HashMap;

use crate::translate::Attached;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortTracker {
    /// Ports with the from-VM program attached for a record, as they were then. A record
    /// whose port is missing is not here; its entries point at `IFINDEX_GONE`.
    attached: HashMap<String, Attached>,
    /// Ports nv filtered that no record names any more (deleted or moved away while the VM
    /// runs, or added by a change that was rolled back), by ifindex: their filter stays, with
    /// no port entry, so every frame they send is dropped and counted, until the device goes.
    orphans: HashMap<String, u32>,
}

impl PortTracker {
    pub fn get(&self, port: &str) -> Option<Attached> {
        self.attached.get(port).copied()
    }

    pub fn attached(&self) -> impl Iterator<Item = (&String, &Attached)> {
        self.attached.iter()
    }

    pub fn len(&self) -> usize {
        self.attached.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attached.is_empty()
    }

    pub fn orphans(&self) -> impl Iterator<Item = (&String, &u32)> {
        self.orphans.iter()
    }

    pub fn is_attached(&self, port: &str) -> bool {
        self.attached.contains_key(port)
    }

    /// Whether the device `port` at `ifindex` still needs the filter: it is neither attached
    /// nor an orphan at that ifindex (a re-created device has a new one).
    pub fn needs_filter(&self, port: &str, ifindex: u32) -> bool {
        self.attached.get(port).map(|a| a.ifindex) != Some(ifindex)
            && self.orphans.get(port) != Some(&ifindex)
    }

    /// A record's port, filtered, is at `at` now.
    pub fn attach(&mut self, port: &str, at: Attached) {
        self.orphans.remove(port);
        self.attached.insert(port.to_owned(), at);
    }

    /// A record's port is missing now.
    pub fn forget(&mut self, port: &str) -> Option<Attached> {
        self.attached.remove(port)
    }

    /// No record names `port` any more: its filter stays, and it becomes an orphan.
    pub fn release(&mut self, port: &str) -> Option<Attached> {
        let a = self.attached.remove(port)?;
        self.orphans.insert(port.to_owned(), a.ifindex);
        Some(a)
    }

    /// A filtered port no record names (found at start).
    pub fn orphan(&mut self, port: &str, ifindex: u32) {
        self.orphans.insert(port.to_owned(), ifindex);
    }

    /// An orphan's device is gone and its filter was detached.
    pub fn drop_orphan(&mut self, port: &str) {
        self.orphans.remove(port);
    }

    /// After a rolled-back change: each port it filtered that is not attached at that ifindex
    /// keeps its filter (taking it off would hand the VM's frames to the host) as an orphan.
    pub fn adopt_filtered(&mut self, filtered: &[(String, u32)]) {
        for (port, ifindex) in filtered {
            if self.get(port).is_none() {
                self.orphans.insert(port.clone(), *ifindex);
            }
        }
    }
}
