//! The slow-path server: reads the frames the datapath handed over (its slow-path ring), answers
//! each from the agent's records and routes (a DHCP request with
//! [`Agent::dhcp_lease`](crate::agent::Agent), an IPv6 router solicitation with
//! [`Agent::router_advert`](crate::agent::Agent)), and writes the answer into the VM's port
//! through a packet socket that only sends (protocol 0: the kernel hands it no frame, so it
//! costs the datapath nothing). It also advertises the router to every VM with an IPv6 subnet
//! every [`ra::INTERVAL`].
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use aya::maps::{MapData, RingBuf};
use nv_common::slow_path::{SLOW_FRAME_BYTES, SlowFrame};
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use super::{Unanswered, answer, request_of, v6};
use crate::{ra, shared::Shared};

/// Answers the datapath's slow-path frames, and advertises the router, for as long as the
/// agent runs.
pub fn spawn(agent: Shared, ring: RingBuf<MapData>) -> io::Result<()> {
    let writer = std::sync::Arc::new(PortWriter::new()?);
    tokio::spawn(advertise(agent.clone(), writer.clone()));
    // SAFETY: the AsyncFd owns the ring buffer, and with it the map's descriptor, which
    // stays open for as long as it is registered.
    let mut ring = unsafe { AsyncFd::register(ring) }?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = ring.readable_mut().await else {
                tracing::error!("the slow-path ring buffer cannot be read any more: DHCP stops");
                return;
            };
            let mut frames = Vec::new();
            let inner = guard.get_inner_mut();
            while let Some(item) = inner.next() {
                if let Some(frame) = frame_of(&item) {
                    frames.push(frame);
                }
            }
            guard.clear_ready();
            for (ifindex, bytes) in frames {
                serve(&agent, &writer, ifindex, &bytes).await;
            }
        }
    });
    Ok(())
}

/// The port and the bytes of one ring entry.
fn frame_of(item: &[u8]) -> Option<(u32, Vec<u8>)> {
    if item.len() < std::mem::size_of::<SlowFrame>() {
        return None;
    }
    // SAFETY: the datapath writes whole SlowFrames (repr(C), integers and bytes only); the
    // length was checked; read unaligned.
    let f = unsafe { item.as_ptr().cast::<SlowFrame>().read_unaligned() };
    let len = (f.len as usize).min(SLOW_FRAME_BYTES);
    Some((f.ifindex, f.bytes[..len].to_vec()))
}

/// Every VM with an IPv6 subnet is told of its router every [`ra::INTERVAL`], the first time
/// right away (VMs up before the agent).
async fn advertise(agent: Shared, writer: std::sync::Arc<PortWriter>) {
    let mut every = tokio::time::interval(ra::INTERVAL);
    loop {
        every.tick().await;
        let adverts = agent.lock().await.router_adverts();
        for (ifindex, a) in adverts {
            send_advert(&agent, &writer, ifindex, &a, false);
        }
    }
}

fn send_advert(agent: &Shared, writer: &PortWriter, ifindex: u32, a: &ra::Advert, asked: bool) {
    match writer.send(ifindex, &ra::frame(a)) {
        Ok(()) => agent.dhcp_counts().advert(asked),
        Err(e) => debug!(
            ifindex,
            "router advertisement: cannot write into the port: {e}"
        ),
    }
}

async fn serve(agent: &Shared, writer: &PortWriter, ifindex: u32, frame: &[u8]) {
    if ra::is_solicitation(frame) {
        let advert = agent.lock().await.router_advert(ifindex);
        if let Some(a) = advert {
            send_advert(agent, writer, ifindex, &a, true);
        }
        return;
    }
    if v6::is_request(frame) {
        return serve6(agent, writer, ifindex, frame).await;
    }
    let counts = agent.dhcp_counts();
    let req = match request_of(frame) {
        Ok(req) => req,
        Err(why) => return counts.unanswered(why),
    };
    counts.request(req.kind);
    let lease = agent.lock().await.dhcp_lease(ifindex);
    let answered = lease.and_then(|lease| {
        let (frame, kind) = answer(&req, &lease)?;
        writer.send(ifindex, &frame).map_err(|e| {
            warn!(ifindex, "DHCP: cannot write into the port: {e}");
            Unanswered::SendFailed
        })?;
        debug!(ifindex, ca = %lease.ca, "DHCP {kind}");
        Ok(kind)
    });
    match answered {
        Ok(kind) => counts.reply(kind),
        Err(why) => counts.unanswered(why),
    }
}

/// A `DHCPv6` client's message: answered from the VM's IPv6 record.
async fn serve6(agent: &Shared, writer: &PortWriter, ifindex: u32, frame: &[u8]) {
    let counts = agent.dhcp_counts();
    let req = match v6::request_of(frame) {
        Ok(req) => req,
        Err(why) => return counts.unanswered(why),
    };
    counts.request6(v6::kind_of(&req));
    let lease = agent.lock().await.dhcp6_lease(ifindex);
    let answered = lease.and_then(|lease| {
        let (frame, kind) = v6::answer(&req, &lease)?;
        writer.send(ifindex, &frame).map_err(|e| {
            warn!(ifindex, "DHCPv6: cannot write into the port: {e}");
            Unanswered::SendFailed
        })?;
        debug!(ifindex, ca = %lease.ca, "DHCPv6 {kind}");
        Ok(kind)
    });
    match answered {
        Ok(kind) => counts.reply6(kind),
        Err(why) => counts.unanswered(why),
    }
}

/// A packet socket that writes frames into ports and reads none.
struct PortWriter(OwnedFd);

impl PortWriter {
    fn new() -> io::Result<PortWriter> {
        // SAFETY: plain system call; the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        Ok(PortWriter(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends `frame` (a whole Ethernet frame) out of the port `ifindex`: into its VM.
    fn send(&self, ifindex: u32, frame: &[u8]) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::sa_family_t::try_from(libc::AF_PACKET).unwrap_or_default();
        to.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::ErrorKind::InvalidInput)?;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(frame.get(..6).ok_or(io::ErrorKind::InvalidInput)?);
        // SAFETY: the buffer and address are valid for the call's duration.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const to).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(u32::MAX),
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
