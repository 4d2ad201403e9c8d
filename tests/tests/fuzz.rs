//! A short fuzzing run (`cargo xtask fuzz --packets N` runs a long one): see `nv_tests::fuzz`.
#[test]
fn random_and_mutated_frames_never_escape_their_tenant() -> anyhow::Result<()> {
    let s = nv_tests::fuzz::run(50_000, 0x6e76_2026)?;
    // The properties only mean something if every kind of outcome was exercised.
    anyhow::ensure!(
        s.runs == 150_000
            && s.dropped > 1000
            && s.delivered > 1000
            && s.passed > 1000
            && s.bounced > 100
            && s.routed > 100
            && s.gateway_answers > 100
            && s.dhcp > 10
            && s.nd_answers > 50
            && s.ipv6_forwarded > 100
            && s.ipv6_routed > 20
            && s.ipv6_underlay > 100
            && s.ipv6_rewrite > 50,
        "{s:?}"
    );
    Ok(())
}
