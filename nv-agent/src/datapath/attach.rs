//! Attaching programs to devices through links pinned by name, replaced in place
//! (`bpf_link_update`) when they exist.
use std::{fs, io, path::Path};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::XdpLink,
};
use nv_common::program_names;
use tracing::debug;

use super::{Datapath, dp_err, program};
use crate::{config::DecapHook, error::Result};

/// Removes a link's pin (its program leaves the device with it); none there is fine.
fn unpin(pin: &Path) -> Result<()> {
    match fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(dp_err(format!("remove {}", pin.display()), e)),
    }
}

fn port_link_name(ifname: &str) -> String {
    format!("port-{ifname}")
}

/// A program that lives on a device through a link pinned by name.
trait Linked {
    /// Replaces the program of the link `old` (pinned by an earlier run) with this one.
    fn replace(&mut self, old: FdLink) -> Result<()>;
    /// Attaches this program to `ifname` afresh; the new link, to be pinned.
    fn attach_new(&mut self, ifname: &str) -> Result<FdLink>;
}

impl Linked for Xdp {
    fn replace(&mut self, old: FdLink) -> Result<()> {
        let link = XdpLink::try_from(old).map_err(|e| dp_err("open pinned XDP link", e))?;
        self.attach_to_link(link)
            .map(drop)
            .map_err(|e| dp_err("replace XDP program", e))
    }

    fn attach_new(&mut self, ifname: &str) -> Result<FdLink> {
        let id = self
            .attach(ifname, XdpMode::default())
            .map_err(|e| dp_err(format!("attach XDP to {ifname}"), e))?;
        FdLink::try_from(self.take_link(id).map_err(|e| dp_err("take XDP link", e))?)
            .map_err(|e| dp_err("XDP link is not an fd link", e))
    }
}

impl Linked for SchedClassifier {
    fn replace(&mut self, old: FdLink) -> Result<()> {
        let link =
            SchedClassifierLink::try_from(old).map_err(|e| dp_err("open pinned TC link", e))?;
        self.attach_to_link(link)
            .map(drop)
            .map_err(|e| dp_err("replace TC program", e))
    }

    fn attach_new(&mut self, ifname: &str) -> Result<FdLink> {
        attach_tcx(self, ifname, TcAttachType::Ingress)
    }
}

/// A TC program for a device's egress.
struct Egress<'a>(&'a mut SchedClassifier);

impl Linked for Egress<'_> {
    fn replace(&mut self, old: FdLink) -> Result<()> {
        self.0.replace(old)
    }

    fn attach_new(&mut self, ifname: &str) -> Result<FdLink> {
        attach_tcx(self.0, ifname, TcAttachType::Egress)
    }
}

/// Attaches `prog` first on `ifname`'s TCX hook `at`; the new link, to be pinned.
fn attach_tcx(prog: &mut SchedClassifier, ifname: &str, at: TcAttachType) -> Result<FdLink> {
    let id = prog
        .attach_with_options(ifname, at, TcAttachOptions::TcxOrder(LinkOrder::first()))
        .map_err(|e| dp_err(format!("attach TC {at:?} to {ifname}"), e))?;
    FdLink::try_from(prog.take_link(id).map_err(|e| dp_err("take TC link", e))?)
        .map_err(|e| dp_err("TC link is not an fd link", e))
}

/// Puts `prog` on `ifname` through the link pinned at `pin`: the pinned link's program is
/// replaced in place when there is one (no moment without a program), else it is attached
/// afresh and its link pinned.
fn attach_pinned(prog: &mut impl Linked, ifname: &str, pin: &Path) -> Result<()> {
    let replaced = PinnedLink::from_pin(pin)
        .map_err(|e| dp_err("no pinned link", e))
        .and_then(|old| prog.replace(FdLink::from(old)));
    if let Err(e) = replaced {
        debug!("attaching to {ifname} afresh ({e})");
        let _ = fs::remove_file(pin);
        prog.attach_new(ifname)?
            .pin(pin)
            .map(drop)
            .map_err(|e| dp_err(format!("pin {}", pin.display()), e))?;
    }
    Ok(())
}

impl Datapath {
    /// Attaches TC ingress and egress, and XDP unless decapsulation runs on TC, to the uplink,
    /// replacing earlier links in place.
    pub fn attach_uplink(&mut self, ifname: &str, hook: DecapHook) -> Result<()> {
        self.attach_tc(program_names::UPLINK_TC, ifname, "uplink-tc")?;
        let pin = self.links_dir.join("uplink-egress");
        let egress: &mut SchedClassifier = program(&mut self.ebpf, program_names::UPLINK_EGRESS)?;
        attach_pinned(&mut Egress(egress), ifname, &pin)?;
        if hook == DecapHook::Xdp {
            self.attach_uplink_xdp(ifname)?;
        }
        Ok(())
    }

    /// Detaches the uplink's XDP program, if any (after switching to TC decapsulation; call it
    /// once the maps say so, so no frame falls between the two).
    pub fn detach_uplink_xdp(&mut self) -> Result<()> {
        unpin(&self.links_dir.join("uplink-xdp"))
    }

    fn attach_uplink_xdp(&mut self, ifname: &str) -> Result<()> {
        let pin = self.links_dir.join("uplink-xdp");
        let xdp: &mut Xdp = program(&mut self.ebpf, program_names::UPLINK_XDP)?;
        attach_pinned(xdp, ifname, &pin)
    }

    /// Attaches the program that takes back a VM tunnel's segmented super-packets.
    pub fn attach_bounce(&mut self, ifname: &str) -> Result<()> {
        self.attach_tc(program_names::FROM_BOUNCE, ifname, "bounce")
    }

    /// Attaches the from-VM program to a VM port's ingress.
    pub fn attach_port(&mut self, ifname: &str) -> Result<()> {
        self.attach_tc(program_names::FROM_VM, ifname, &port_link_name(ifname))
    }

    /// Detaches the from-VM program from a port by removing its link's pin.
    pub fn detach_port(&mut self, ifname: &str) -> Result<()> {
        unpin(&self.links_dir.join(port_link_name(ifname)))
    }

    /// Ports that have a pinned link (from this run or an earlier one).
    pub fn attached_ports(&self) -> Result<Vec<String>> {
        let entries = fs::read_dir(&self.links_dir)
            .map_err(|e| dp_err(format!("read {}", self.links_dir.display()), e))?;
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("port-").map(str::to_owned))
            })
            .collect())
    }

    fn attach_tc(&mut self, prog_name: &str, ifname: &str, link_name: &str) -> Result<()> {
        let pin = self.links_dir.join(link_name);
        let prog: &mut SchedClassifier = program(&mut self.ebpf, prog_name)?;
        attach_pinned(prog, ifname, &pin)
    }
}
