//! `cargo xtask fuzz --packets N [--seed S]`: a long fuzzing run, see `nv_tests::fuzz`.
fn main() {
    let arg = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
    let packets = arg("--packets")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1_000_000u64);
    let seed = arg("--seed")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    println!("fuzzing {packets} frames, seed {seed}");
    match nv_tests::fuzz::run(packets, seed) {
        Ok(s) => println!(
            "{} program runs checked ({} dropped, {} delivered, {} passed to the host, {} bounced segments encapsulated, {} IPv6 frames forwarded, {} routed, {} across the IPv6 underlay, {} by IPv6 rewrite): no verdict out of contract, every drop counted, every delivered frame in its own tenant",
            s.runs,
            s.dropped,
            s.delivered,
            s.passed,
            s.bounced,
            s.ipv6_forwarded,
            s.ipv6_routed,
            s.ipv6_underlay,
            s.ipv6_rewrite
        ),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
