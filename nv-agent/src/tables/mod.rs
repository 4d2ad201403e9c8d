//! The tables nv keeps, one module each: lookup records (shared by every host, through etcd in
//! cluster mode) and provider addresses (each host's own). A table says, for its rows, the
//! rules a row keeps on its own, the store's form, where rows live in etcd (if they are
//! shared), and nvctl's columns; the store's framing, the cluster adapter and nvctl read them
//! from here, so a new table (routes, ACLs) is a new module and a line in [`Change`].
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    error::Result,
    model::{LookupRecord, ProviderState, Rdid, RouteKey, RouteRecord, Subnet},
};

pub mod acls;
pub mod lookups;
pub mod providers;
pub mod routes;

pub use acls::Acls;
pub use lookups::Lookups;
pub use providers::Providers;
pub use routes::Routes;

/// What a table is to the generic machinery around it.
pub trait Table {
    /// Its name: the API's path (`/v1/NAME`), and what nvctl calls it.
    const NAME: &'static str;
    /// Its table in the store (with the form's version).
    const STORE: &'static str;
    /// Where its rows live in etcd, in cluster mode (`None`: each host's own).
    const ETCD_PREFIX: Option<&'static str>;
    /// nvctl's columns: (header, the row's JSON field).
    const COLUMNS: &'static [(&'static str, &'static str)];
    /// A row, in the CLI's field names.
    type Row: Clone + Serialize + for<'de> Deserialize<'de>;
    /// What names a row.
    type Key;

    fn key(row: &Self::Row) -> Self::Key;
    /// The rules a row keeps on its own (those between rows are the table's index's).
    fn validate(row: &Self::Row) -> Result<()>;
    /// The store's form: the key's bytes, and the row's.
    fn store_key(key: &Self::Key) -> Vec<u8>;
    fn encode(row: &Self::Row) -> Vec<u8>;
    fn decode(key: &[u8], value: &[u8]) -> std::result::Result<Self::Row, String>;
}

/// Every table's rows: what a store holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub providers: Vec<ProviderState>,
    pub lookups: Vec<LookupRecord>,
    #[serde(default)]
    pub routes: Vec<RouteRecord>,
    #[serde(default)]
    pub acls: Vec<crate::model::acl::AclRule>,
}

/// One change to one table. Each table adds its variants; everything else about a change
/// (how the store writes it, what it does to the maps) asks the table's module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    PutLookup {
        record: LookupRecord,
    },
    DelLookup {
        vsid: u32,
        ca: IpAddr,
    },
    PutProvider {
        provider: ProviderState,
    },
    DelProvider {
        pa: IpAddr,
    },
    PutRoute {
        route: RouteRecord,
    },
    DelRoute {
        rdid: Rdid,
        prefix: Subnet,
        nexthop: std::net::IpAddr,
    },
    PutAcl {
        rule: crate::model::acl::AclRule,
    },
    DelAcl {
        id: u32,
    },
}

/// A change as the store writes it: in `table`, the row under `key` becomes `value`
/// (`None`: deleted).
pub struct StoreWrite {
    pub table: &'static str,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

impl Change {
    pub fn store_write(&self) -> StoreWrite {
        match self {
            Change::PutLookup { record } => put::<Lookups>(record),
            Change::DelLookup { vsid, ca } => del::<Lookups>(&(*vsid, *ca)),
            Change::PutProvider { provider } => put::<Providers>(provider),
            Change::DelProvider { pa } => del::<Providers>(pa),
            Change::PutRoute { route } => put::<Routes>(route),
            Change::DelRoute {
                rdid,
                prefix,
                nexthop,
            } => del::<Routes>(&(rdid.clone(), *prefix, *nexthop)),
            Change::PutAcl { rule } => put::<Acls>(rule),
            Change::DelAcl { id } => del::<Acls>(id),
        }
    }

    pub fn is_acl(&self) -> bool {
        matches!(self, Change::PutAcl { .. } | Change::DelAcl { .. })
    }

    pub fn is_route(&self) -> bool {
        matches!(self, Change::PutRoute { .. } | Change::DelRoute { .. })
    }

    /// The change that deletes the route of `key`.
    pub fn del_route((rdid, prefix, nexthop): RouteKey) -> Change {
        Change::DelRoute {
            rdid,
            prefix,
            nexthop,
        }
    }
}

fn put<T: Table>(row: &T::Row) -> StoreWrite {
    StoreWrite {
        table: T::STORE,
        key: T::store_key(&T::key(row)),
        value: Some(T::encode(row)),
    }
}

fn del<T: Table>(key: &T::Key) -> StoreWrite {
    StoreWrite {
        table: T::STORE,
        key: T::store_key(key),
        value: None,
    }
}
