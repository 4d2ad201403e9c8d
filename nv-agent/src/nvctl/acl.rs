//! `nvctl acl`: port ACL rules, through this host's agent.
use super::{
    args::{AclCmd, EtcdArgs, Output},
    client::Client,
    operator::Operator,
    render,
};
use crate::{
    control::acls::AclName,
    import,
    model::acl::AclRule,
    tables::{Table as _, acls::Acls},
};

const IMPORTED: render::Columns = &[("IMPORTED", "imported")];

pub async fn execute(
    agent: &Client,
    etcd: &EtcdArgs,
    cmd: &AclCmd,
    output: Output,
) -> anyhow::Result<()> {
    let operator = Operator::from_args(etcd, agent)?;
    let columns = Acls::COLUMNS;
    match cmd {
        AclCmd::Add(a) => {
            let rule = AclRule {
                id: 0,
                name: a.name.clone(),
                vsid: a.vsid,
                ca: a.ca,
                direction: a.direction,
                action: a.action,
                remote: a.remote,
                local: a.local,
                protocol: a.protocol,
                remote_port: a.remote_port,
                local_port: a.local_port,
                weight: a.weight,
                stateful: a.stateful,
                idle_timeout: a.idle_timeout,
            };
            let added = match &operator {
                Some(op) => op.add_acls(vec![rule]).await?.remove(0),
                None => agent.add_acl(&rule).await?,
            };
            render::one(output, &added, columns)
        }
        AclCmd::Del { id, name } => {
            let named = match (id, name) {
                (Some(id), _) => AclName::Id(*id),
                (None, Some(n)) => AclName::Name(n.clone()),
                (None, None) => anyhow::bail!("name the rule: --id N or --name TEXT"),
            };
            let deleted = match (&operator, &named) {
                (Some(op), _) => op.delete_acl(&named).await?,
                (None, AclName::Id(id)) => agent.delete_acl(&format!("id={id}")).await?,
                (None, AclName::Name(n)) => {
                    agent
                        .delete_acl(&format!("name={}", super::monitor::url_escape(n)))
                        .await?
                }
            };
            render::one(output, &deleted, columns)
        }
        AclCmd::List { vsid } => render::rows(output, &agent.acls(*vsid).await?, columns),
        AclCmd::Export { vsid } => {
            let rules: Vec<AclRule> = agent
                .acls(*vsid)
                .await?
                .into_iter()
                .map(|l| l.rule)
                .collect();
            import::write_json(&rules, &mut std::io::stdout().lock())
        }
        AclCmd::Import { file } => {
            let (text, _) = import::load(file)?;
            let rules: Vec<AclRule> = serde_json::from_slice(&text).map_err(|e| {
                anyhow::anyhow!("{}: not a JSON list of ACL rules: {e}", file.display())
            })?;
            let imported = match &operator {
                Some(op) => op
                    .add_acls(rules)
                    .await
                    .map(|added| crate::api::types::Imported {
                        imported: added.len(),
                    }),
                None => agent.import_acls(&rules).await,
            }
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            render::one(output, &imported, IMPORTED)
        }
    }
}
