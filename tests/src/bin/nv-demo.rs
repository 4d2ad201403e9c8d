//! `cargo xtask demo`: two hosts, RED and BLUE tenants with the same customer addresses,
//! configured only through nvctl; shows the tables, the traffic, what the underlay carries
//! (decoded by tshark) and that the tenants never see each other. Removes everything on exit,
//! Ctrl-C included, unless `--keep`.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use nv_tests::{
    capture::{self, Capture},
    checks,
    guest::Guest,
    testbed::{RED_VSID, TapVm, TwoHosts, tcp_transfer, tcp_transfer_from},
};

/// The demo's real VM: a Linux guest under QEMU on a tap port, as libvirt attaches VMs.
const RED_3: TapVm = TapVm {
    name: "RED-3",
    host: 0,
    vsid: RED_VSID,
    ca: "10.0.0.3",
    mac: "02:00:00:00:01:03",
    port: "red3",
    rewrite_pa: None,
};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn step(stop: &AtomicBool, title: &str) -> anyhow::Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted; cleaning up");
    }
    println!("\n== {title}");
    Ok(())
}

fn run() -> anyhow::Result<()> {
    let keep = std::env::args().any(|a| a == "--keep");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("install Ctrl-C handler")?;

    println!(
        "nv demo: two hosts, tenants RED (VSID 5001) and BLUE (VSID 6001), same addresses on both."
    );
    let bed = TwoHosts::build("demo")?;
    step(&stop, "configured through nvctl only")?;
    bed.configure()?;
    for h in &bed.hosts {
        println!("-- {} (nvctl --socket {} ...)", h.name, h.socket.display());
        print!("{}", h.nvctl(&["provider", "list"])?);
        print!("{}", h.nvctl(&["lookup", "list"])?);
    }

    traffic_and_underlay(&bed, &stop)?;
    isolation(&bed, &stop)?;
    let guest = real_guest(&bed, &stop)?;

    step(&stop, "datapath counters on host2 (nvctl stats)")?;
    print!("{}", bed.hosts[1].nvctl(&["stats"])?);

    if keep {
        println!("\n--keep: hosts stay up. Try:");
        println!("  ip netns exec {}-red1 ping 10.0.0.2", bed.prefix);
        println!(
            "  ip netns exec {}-red1 ping 10.0.0.3   # RED-3, the QEMU guest on host1's tap red3",
            bed.prefix
        );
        println!(
            "  {}/nvctl --socket {} lookup list",
            nv_tests::sys::bin_dir().display(),
            bed.hosts[0].socket.display()
        );
        println!("Press Ctrl-C to remove everything.");
        while !stop.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(200));
        }
    }
    println!("\nremoving the guest, namespaces, agents and pins...");
    drop(guest);
    drop(bed);
    println!("done.");
    Ok(())
}

fn traffic_and_underlay(bed: &TwoHosts, stop: &AtomicBool) -> anyhow::Result<()> {
    step(
        stop,
        "RED-1 and BLUE-1 (both 10.0.0.1 on host1) ping 10.0.0.2 on host2",
    )?;
    let file = bed.tmp_dir().join("underlay.pcap");
    let cap = Capture::start(&bed.underlay, "br0", &file, 60)?;
    for vm in ["RED-1", "BLUE-1"] {
        let got = bed.ping(vm, "10.0.0.2", 5)?;
        println!("{vm} -> 10.0.0.2: {got}/5 replies");
        if got != 5 {
            bail!("{vm} lost pings");
        }
    }
    for (server, client) in [("RED-2", "RED-1"), ("BLUE-2", "BLUE-1")] {
        let (sent, received) = tcp_transfer(bed.vm(server), bed.vm(client), "10.0.0.2", 4 << 20)?;
        let ok = if sent == received {
            "content identical"
        } else {
            "CONTENT DIFFERS"
        };
        println!(
            "{client} -> {server} TCP 4 MiB: sha256 sent {}, received {} ({ok})",
            short(&sent),
            short(&received)
        );
    }
    let packets = capture::decode(&cap.stop()?)?;

    step(stop, "what the underlay carried (tshark)")?;
    let mut by_vsid = std::collections::BTreeMap::new();
    let mut bare = 0;
    for p in &packets {
        match (p.gre_key, p.ip_src.first()) {
            (Some(key), _) => *by_vsid.entry(key >> 8).or_insert(0) += 1,
            (None, Some(src)) if src.starts_with("10.") => bare += 1,
            _ => {}
        }
    }
    for (vsid, n) in &by_vsid {
        println!("NVGRE VSID {vsid}: {n} packets between 198.18.0.1 and 198.18.0.2");
    }
    println!("customer addresses outside GRE: {bare} packets");
    if let Some(p) = packets.iter().find(|p| p.gre_key.is_some()) {
        println!(
            "one of them: outer {} -> {}, GRE key {:#010x}, inner {} -> {} ({})",
            p.ip_src[0],
            p.ip_dst[0],
            p.gre_key.unwrap_or(0),
            p.ip_src.get(1).map_or("?", String::as_str),
            p.ip_dst.get(1).map_or("?", String::as_str),
            p.protocols
        );
    }

    Ok(())
}

fn isolation(bed: &TwoHosts, stop: &AtomicBool) -> anyhow::Result<()> {
    step(
        stop,
        "isolation: RED-1 pings 10.0.0.2 while BLUE-2 (also 10.0.0.2) listens",
    )?;
    let (leaked, control) = checks::frames_seen_by(bed, "BLUE-2", "RED-1", "BLUE-1")?;
    println!("BLUE-2 saw {leaked} frames from RED-1 (and {control} from BLUE-1, its own tenant)");
    if leaked != 0 {
        bail!("isolation broken: BLUE-2 saw RED's packets");
    }
    Ok(())
}

fn real_guest(bed: &TwoHosts, stop: &AtomicBool) -> anyhow::Result<Guest> {
    step(
        stop,
        "a real VM: RED-3 (10.0.0.3), a Linux guest under QEMU on tap port red3 of host1",
    )?;
    bed.plug_tap(&RED_3)?;
    let mut guest = Guest::boot(bed.guest_spec(&RED_3, None))?;
    println!(
        "booted Debian's kernel with virtio-net; host1 says: {}",
        port_line(bed, "red3")?
    );
    print!("{}", bed.hosts[0].nvctl(&["status"])?);
    let got = guest.ping("10.0.0.2", 5)?;
    println!("RED-3 -> RED-2 (10.0.0.2 on host2): {got}/5 replies");
    if got != 5 {
        bail!("RED-3 lost pings");
    }
    let made = guest.make_file(2 << 20)?;
    let got = tcp_transfer_from(bed.vm("RED-2"), 47003, || {
        guest.send_file("10.0.0.2", 47003)
    })?;
    let ok = if made == got {
        "content identical"
    } else {
        "CONTENT DIFFERS"
    };
    println!(
        "RED-3 -> RED-2 TCP 2 MiB: sha256 sent {}, received {} ({ok})",
        short(&made),
        short(&got)
    );
    if made != got {
        bail!("the guest's transfer arrived changed");
    }
    Ok(guest)
}

/// What `nvctl status` says of one port.
fn port_line(bed: &TwoHosts, port: &str) -> anyhow::Result<String> {
    let status = bed.hosts[0].nvctl_json(&["status"])?;
    let p = status["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["port"] == port))
        .with_context(|| format!("{port} is not attached: {status}"))?;
    Ok(format!(
        "port {port} is a {}, {}; VMs should use MTU {}",
        p["kind"].as_str().unwrap_or("?"),
        if p["running"] == true {
            "running"
        } else {
            "down"
        },
        status["vm_mtu"]
    ))
}

fn short(digest: &str) -> String {
    let hash = digest.split_whitespace().nth(1).unwrap_or(digest);
    hash.chars().take(12).collect()
}
