//! Port ACL rules changed through the API: numbered, checked, applied and stored, all or
//! none; then the tracked connections the new rules no longer admit are cut.
use std::collections::HashMap;

use tracing::{info, warn};

use super::Agent;
use crate::{
    control::acls::{AclName, admit_add, pick},
    error::Result,
    model::acl::{AclListed, AclRule},
    tables::Change,
};

impl Agent {
    /// Adds rules (an add is an import of one), numbering them; all or none.
    #[tracing::instrument(skip_all, fields(rules = rules.len()))]
    pub async fn add_acls(&mut self, rules: Vec<AclRule>) -> Result<Vec<AclRule>> {
        let catalog = &self.tables.catalog;
        let added = admit_add(
            catalog.acls(),
            |vsid, ca| {
                let r = catalog.get(&(vsid, ca))?;
                Some(match r.port.as_deref() {
                    Some(port) => catalog.on_port(port).iter().map(|r| r.ca).collect(),
                    None => vec![r.ca],
                })
            },
            rules,
        )?;
        let changes: Vec<Change> = added
            .iter()
            .map(|rule| Change::PutAcl { rule: rule.clone() })
            .collect();
        self.apply(&changes, &HashMap::new(), |_, _| Ok(())).await?;
        self.cut_flows();
        for r in &added {
            info!(id = r.id, "added ACL rule {} on {}", r.id, r.target());
        }
        Ok(added)
    }

    /// Takes a rule away.
    #[tracing::instrument(skip_all)]
    pub async fn remove_acl(&mut self, name: AclName) -> Result<AclRule> {
        let rule = pick(self.tables.catalog.acls(), &name)?;
        let changes = [Change::DelAcl { id: rule.id }];
        self.apply(&changes, &HashMap::new(), |_, _| Ok(())).await?;
        self.cut_flows();
        info!(
            id = rule.id,
            "deleted ACL rule {} on {}",
            rule.id,
            rule.target()
        );
        Ok(rule)
    }

    /// The rules of one VSID or all, in id order, with what each decided on this host.
    pub fn acls(&mut self, vsid: Option<u32>) -> Vec<AclListed> {
        let meters = self.datapath.acl_meters().unwrap_or_default();
        self.tables
            .catalog
            .acls()
            .list(vsid)
            .into_iter()
            .map(|rule| {
                let (mut packets, mut bytes) = (0, 0);
                for dir in [nv_common::acl::DIR_IN, nv_common::acl::DIR_OUT] {
                    let k = nv_common::acl::AclMeterKey { rule: rule.id, dir };
                    if let Some(m) = meters.get(&k) {
                        packets += m.packets;
                        bytes += m.bytes;
                    }
                }
                AclListed {
                    rule,
                    packets,
                    bytes,
                }
            })
            .collect()
    }

    /// Cuts the tracked connections the rules in the maps no longer admit.
    pub(super) fn cut_flows(&mut self) {
        match self.datapath.cut_flows() {
            Ok(0) => {}
            Ok(n) => info!("cut {n} tracked connection(s) the rules no longer admit"),
            Err(e) => warn!("could not cut the connections the rules no longer admit: {e}"),
        }
    }
}
