//! Next hops of other hosts' IPv4 PAs, resolved from this host's routes and neighbours, for a
//! host that does not forward on the uplink. There the datapath's FIB helper refuses (it checks
//! forwarding even for output lookups), and without these the kernel would route every NVGRE or
//! rewritten packet on its own (`bpf_redirect_neigh`). Only a unicast route out of the uplink
//! to a neighbour the kernel would send to gives an entry; anything else stays the kernel's.
//! The datapath's packets do not confirm a neighbour as the kernel's own do, so a neighbour
//! in use that has gone stale is marked used (`NTF_USE`): the kernel then probes it as it
//! would at its own next packet, and a PA that moved to another MAC is found again within
//! seconds (the probes fail, the neighbour fails, its hop goes, the kernel resolves anew).
use std::{collections::HashMap, net::Ipv4Addr};

use futures::TryStreamExt as _;
use nv_common::UnderlayHop;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteFlags, RouteType},
    },
};

use crate::{error::Result, netlink::nl_err};

/// The kernel's multicast groups of neighbour and IPv4 route changes.
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;

/// What the kernel announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A route changed (or announcements were lost: anything may have).
    Route,
    /// A neighbour on this link changed.
    Neighbour(u32),
}

/// The gateway of a route out of the uplink (`None`: on-link), when it is one unicast path;
/// `None` when there is no such route.
type RoutePath = Option<Option<Ipv4Addr>>;

/// Asks the kernel for routes and neighbours on a netlink connection of its own, and keeps the
/// routes it was told until a route changes: with thousands of hosts, asking for every PA's
/// route at every look would cost a netlink round trip each.
pub struct Resolver {
    handle: Handle,
    routes: HashMap<Ipv4Addr, RoutePath>,
}

impl Resolver {
    /// Opens the connection; its driver task runs on the current tokio runtime.
    pub fn connect() -> Result<Resolver> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| nl_err("connect", e))?;
        tokio::spawn(conn);
        Ok(Resolver {
            handle,
            routes: HashMap::new(),
        })
    }

    /// Routes are asked for again, each at its next resolution.
    pub fn forget_routes(&mut self) {
        self.routes.clear();
    }

    /// The hops of `pas` out of the uplink (ifindex `uplink`), keyed by PA in network order as
    /// the datapath reads it. A PA the host cannot route out of the uplink, routes over several
    /// paths, or whose neighbour is not resolved, has none.
    pub async fn resolve(
        &mut self,
        uplink: u32,
        pas: &[Ipv4Addr],
    ) -> Result<HashMap<u32, UnderlayHop>> {
        let mut hops = HashMap::new();
        if uplink == 0 || pas.is_empty() {
            return Ok(hops);
        }
        let neighbours = self.neighbours(uplink).await?;
        let mut stale = std::collections::HashSet::new();
        // PAs no record names any more are not kept.
        let named: std::collections::HashSet<&Ipv4Addr> = pas.iter().collect();
        self.routes.retain(|pa, _| named.contains(pa));
        for &pa in pas {
            let path = if let Some(p) = self.routes.get(&pa) {
                *p
            } else {
                let p = self.route_to(pa, uplink).await?;
                self.routes.insert(pa, p);
                p
            };
            let Some(gateway) = path else {
                continue;
            };
            let next = gateway.unwrap_or(pa);
            if let Some(&(dmac, state)) = neighbours.get(&next) {
                hops.insert(
                    u32::from_ne_bytes(pa.octets()),
                    UnderlayHop { dmac, _pad: [0; 2] },
                );
                if state == NeighbourState::Stale {
                    stale.insert(next);
                }
            }
        }
        for next in stale {
            self.mark_used(uplink, next).await;
        }
        Ok(hops)
    }

    /// Has the kernel treat neighbour `ip` on link `index` as used by a packet (`NTF_USE`):
    /// from stale it goes to delay, then to a probe. Nothing else of the entry changes.
    async fn mark_used(&self, index: u32, ip: Ipv4Addr) {
        let done = self
            .handle
            .neighbours()
            .add(index, ip.into())
            .state(NeighbourState::None)
            .flags(NeighbourFlags::Use)
            .replace()
            .execute()
            .await;
        if let Err(e) = done {
            tracing::warn!("asking the kernel to confirm neighbour {ip}: {e}");
        }
    }

    /// The gateway of the host's route to `dst` out of `uplink`, looked up as the kernel's hop
    /// (`bpf_redirect_neigh`) looks it up, with the uplink as the output link; the FIB entry
    /// itself (`RTM_F_FIB_MATCH`), so a route over several paths shows as such.
    async fn route_to(&self, dst: Ipv4Addr, uplink: u32) -> Result<RoutePath> {
        let mut query = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .output_interface(uplink)
            .build();
        query.header.flags |= RouteFlags::FibMatch;
        let mut answers = self.handle.route().get(query).execute();
        let route = match answers.try_next().await {
            Ok(Some(r)) => r,
            // Unreachable, prohibited, no route: the kernel's hop says so to the sender.
            Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => return Ok(None),
            Err(e) => return Err(nl_err(&format!("get the route to {dst}"), e)),
        };
        if route.header.kind != RouteType::Unicast {
            return Ok(None);
        }
        let (mut oif, mut gateway) = (None, None);
        for a in &route.attributes {
            match a {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
                RouteAttribute::MultiPath(_) => return Ok(None),
                _ => {}
            }
        }
        Ok((oif == Some(uplink)).then_some(gateway))
    }

    /// The IPv4 neighbours on link `index` the kernel sends to (reachable, stale, delay,
    /// probe, permanent), with their link-layer addresses and states.
    async fn neighbours(&self, index: u32) -> Result<HashMap<Ipv4Addr, ([u8; 6], NeighbourState)>> {
        let mut dump = self
            .handle
            .neighbours()
            .get()
            .set_address_family(rtnetlink::packet_route::AddressFamily::Inet)
            .execute();
        let mut out = HashMap::new();
        while let Some(n) = dump
            .try_next()
            .await
            .map_err(|e| nl_err("get neighbours", e))?
        {
            let usable = matches!(
                n.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
            );
            if n.header.ifindex != index || !usable {
                continue;
            }
            let (mut ip, mut lladdr) = (None, None);
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => ip = Some(*d),
                    NeighbourAttribute::LinkLayerAddress(l) => {
                        lladdr = <[u8; 6]>::try_from(l.as_slice()).ok();
                    }
                    _ => {}
                }
            }
            if let (Some(ip), Some(l)) = (ip, lladdr)
                && l != [0; 6]
            {
                out.insert(ip, (l, n.header.state));
            }
        }
        Ok(out)
    }
}

/// Every neighbour or IPv4 route change the kernel announces in this network namespace. A lost
/// one (the socket overran) is made up for by the periodic resolution.
pub fn changes() -> Result<tokio::sync::mpsc::UnboundedReceiver<Change>> {
    crate::netlink::announced(
        RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE,
        "neighbour and route changes",
        |payload| match payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n),
            ) => Some(Change::Neighbour(n.header.ifindex)),
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_),
            )
            | NetlinkPayload::Overrun(_) => Some(Change::Route),
            _ => None,
        },
    )
}

/// How often the hops are resolved again without a change announced: PAs that records name
/// anew get theirs (a route asked for once), the neighbours are read again, and the hops stay
/// good for another [`UNDERLAY_LIFETIME_NS`](nv_common::UNDERLAY_LIFETIME_NS).
const REFRESH: std::time::Duration = std::time::Duration::from_secs(2);
/// How often every route is asked for again in any case: changes to next-hop objects and
/// routing rules are not announced to this socket.
const ROUTES_AGAIN: u32 = 15;
/// The least time between two resolutions: a burst of changes (a link flap, a neighbour table
/// refilled, the probes the agent itself asks for) is taken as one.
const MIN_GAP: std::time::Duration = std::time::Duration::from_millis(250);

/// Keeps the datapath's underlay hops in line with the host's routes and neighbours and the
/// records' PAs: after the changes the kernel announces, and every [`REFRESH`].
pub fn follow(shared: &crate::shared::Shared) -> Result<()> {
    let mut resolver = Resolver::connect()?;
    let mut changes = Some(changes()?);
    let agent = shared.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut ticks, mut uplink) = (0u32, 0u32);
        loop {
            tokio::select! {
                c = crate::netlink::next_or_never(&mut changes) => {
                    let Some(first) = c else {
                        tracing::warn!(
                            "route and neighbour changes stopped; underlay hops are resolved every {REFRESH:?}"
                        );
                        changes = None;
                        continue;
                    };
                    tokio::time::sleep(MIN_GAP).await;
                    let mut all = vec![first];
                    if let Some(rx) = changes.as_mut() {
                        while let Ok(c) = rx.try_recv() {
                            all.push(c);
                        }
                    }
                    if all.contains(&Change::Route) {
                        resolver.forget_routes();
                    } else if !all.contains(&Change::Neighbour(uplink)) {
                        // Neighbours of other links: nothing of the uplink's hops changed.
                        continue;
                    }
                }
                _ = tick.tick() => {
                    ticks = ticks.wrapping_add(1);
                    if ticks.is_multiple_of(ROUTES_AGAIN) {
                        resolver.forget_routes();
                    }
                }
            }
            let pas;
            (uplink, pas) = agent.lock().await.underlay_targets();
            let done = match resolver.resolve(uplink, &pas).await {
                Ok(hops) => {
                    let alive = crate::datapath::clock_ns(libc::CLOCK_MONOTONIC)
                        .saturating_add(nv_common::UNDERLAY_LIFETIME_NS);
                    agent
                        .lock()
                        .await
                        .set_underlay_hops(&hops, alive)
                        .map(|changed| {
                            if changed > 0 {
                                tracing::debug!(
                                    changed,
                                    hops = hops.len(),
                                    "underlay hops updated"
                                );
                            }
                        })
                }
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                tracing::warn!(
                    "resolving the underlay's next hops: {}",
                    crate::error::one_line(&e)
                );
            }
        }
    });
    Ok(())
}
