//! The agent as the API, the etcd watcher and the background tasks share it. Changes take
//! its lock, one at a time; observation never does: `nvctl status` and `/metrics` read what
//! was published when the last change let the lock go, and the datapath's counters straight
//! from their pinned maps. So status and metrics answer while an import runs.
use std::{
    ops::{Deref, DerefMut},
    sync::Arc,
};

use tokio::sync::{Mutex, MutexGuard, watch};

pub use crate::agent::Published;
use crate::{agent::Agent, cluster::Cluster, datapath::CounterReader};

struct Inner {
    agent: Mutex<Agent>,
    published: watch::Sender<Arc<Published>>,
    counters: CounterReader,
    cluster: Option<Cluster>,
    dhcp: crate::dhcp::counts::Counts,
}

#[derive(Clone)]
pub struct Shared(Arc<Inner>);

impl Shared {
    pub fn new(agent: Agent) -> crate::error::Result<Shared> {
        let counters = agent.counter_reader()?;
        let cluster = agent.cluster();
        let published = watch::channel(Arc::new(agent.published())).0;
        Ok(Shared(Arc::new(Inner {
            agent: Mutex::new(agent),
            published,
            counters,
            cluster,
            dhcp: crate::dhcp::counts::Counts::default(),
        })))
    }

    /// The agent, for a change (or a read that needs it whole); what a change did is
    /// published when the guard goes.
    pub async fn lock(&self) -> Guard<'_> {
        Guard {
            agent: self.0.agent.lock().await,
            published: &self.0.published,
            changed: false,
        }
    }

    /// The agent's state as of the last change, with cluster mode's as of now.
    pub fn published(&self) -> Published {
        let mut p = Published::clone(&self.0.published.borrow());
        if let Some(c) = &self.0.cluster {
            p.status.cluster = Some(c.status());
            p.metrics.cluster = Some(c.status());
        }
        p
    }

    /// The datapath's counters, read from their maps.
    pub fn counters(&self) -> &CounterReader {
        &self.0.counters
    }

    /// What the DHCP server counted.
    pub fn dhcp_counts(&self) -> &crate::dhcp::counts::Counts {
        &self.0.dhcp
    }

    pub fn cluster(&self) -> Option<&Cluster> {
        self.0.cluster.as_ref()
    }
}

/// The agent, locked. Taken mutably, it publishes the agent's state when dropped.
pub struct Guard<'a> {
    agent: MutexGuard<'a, Agent>,
    published: &'a watch::Sender<Arc<Published>>,
    changed: bool,
}

impl Deref for Guard<'_> {
    type Target = Agent;
    fn deref(&self) -> &Agent {
        &self.agent
    }
}

impl DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Agent {
        self.changed = true;
        &mut self.agent
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.changed {
            self.published
                .send_replace(Arc::new(self.agent.published()));
        }
    }
}
