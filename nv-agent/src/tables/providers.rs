//! Provider addresses: this host's own (never in etcd), on the uplink, each a PA that tenant
//! traffic rides on, or a rewrite PA the datapath owns. Stored as JSON in the CLI's fields.
use std::net::IpAddr;

use nv_common::LocalPa;

use super::Table;
use crate::{error::Result, model::ProviderState};

pub struct Providers;

impl Table for Providers {
    const NAME: &'static str = "providers";
    const STORE: &'static str = "providers_v1";
    const ETCD_PREFIX: Option<&'static str> = None;
    const COLUMNS: &'static [(&'static str, &'static str)] = &[("PA", "pa"), ("DEV", "dev")];
    type Row = ProviderState;
    type Key = IpAddr;

    fn key(row: &ProviderState) -> IpAddr {
        row.pa.addr
    }

    fn validate(_row: &ProviderState) -> Result<()> {
        Ok(())
    }

    fn store_key(key: &IpAddr) -> Vec<u8> {
        key.to_string().into_bytes()
    }

    fn encode(row: &ProviderState) -> Vec<u8> {
        serde_json::to_vec(row).unwrap_or_default()
    }

    fn decode(_key: &[u8], value: &[u8]) -> std::result::Result<ProviderState, String> {
        serde_json::from_slice(value).map_err(|e| {
            format!(
                "a value does not parse ({e}): {}",
                String::from_utf8_lossy(value)
            )
        })
    }
}

/// The local-PA map's entry of a provider address: on the uplink (`nvctl provider add` puts
/// them nowhere else), owned by the datapath if it is a rewrite PA.
pub fn local_pa(p: &ProviderState, uplink_ifindex: u32) -> LocalPa {
    LocalPa::new(uplink_ifindex, if p.rewrite { LocalPa::OWNED } else { 0 })
}
