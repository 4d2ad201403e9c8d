//! The library's errors: what failed, in words an operator can act on, with the error that
//! caused it kept whole (aya's, netlink's, redb's, etcd's, the system's) as its source. The
//! one line an operator reads, the whole chain, is made at the edge ([`one_line`]): the API's
//! answers, nvctl, the agent's log.
use thiserror::Error;

/// Sources are boxed: an error travels in every `Result` of the agent, and aya's are large.
#[derive(Debug, Error)]
pub enum NvError {
    /// The request is malformed or violates a rule; nothing was changed.
    #[error("{0}")]
    Invalid(String),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with what exists (duplicate, in use).
    #[error("{0}")]
    Conflict(String),
    #[error("store: {what}")]
    Store {
        what: String,
        #[source]
        source: Option<StoreSource>,
    },
    #[error("datapath: {what}")]
    Datapath {
        what: String,
        #[source]
        source: Option<DatapathSource>,
    },
    #[error("netlink: {what}")]
    Netlink {
        what: String,
        #[source]
        source: Option<NetlinkSource>,
    },
    /// Cluster mode: etcd is unreachable or refused the request.
    #[error("etcd: {what}")]
    Cluster {
        what: String,
        #[source]
        source: Option<Box<EtcdSource>>,
    },
}

/// The error that caused a failure of the store (redb's, the system's), of the datapath
/// (aya's, bpffs's, the kernel's BTF) or of a netlink request (rtnetlink's): kept whole, and
/// boxed, so that what only names an error (nvctl's model, say) does not carry the whole
/// datapath with it.
pub type Source = Box<dyn std::error::Error + Send + Sync>;
pub type StoreSource = Source;
pub type DatapathSource = Source;
pub type NetlinkSource = Source;

/// What made an etcd request fail. etcd's client error is kept whole, and said in words
/// ([`crate::etcd_writer::words`]), not in gRPC's.
#[derive(Debug, Error)]
pub enum EtcdSource {
    #[error("{}", crate::etcd_writer::words(.0))]
    Client(etcd_client::Error),
    #[error(transparent)]
    Write(#[from] crate::etcd_writer::EtcdError),
}

impl NvError {
    pub fn store(what: impl Into<String>) -> NvError {
        NvError::Store {
            what: what.into(),
            source: None,
        }
    }

    pub fn store_by(what: impl Into<String>, e: impl Into<StoreSource>) -> NvError {
        NvError::Store {
            what: what.into(),
            source: Some(e.into()),
        }
    }

    pub fn datapath(what: impl Into<String>) -> NvError {
        NvError::Datapath {
            what: what.into(),
            source: None,
        }
    }

    pub fn datapath_by(what: impl Into<String>, e: impl Into<DatapathSource>) -> NvError {
        NvError::Datapath {
            what: what.into(),
            source: Some(e.into()),
        }
    }

    pub fn netlink(what: impl Into<String>) -> NvError {
        NvError::Netlink {
            what: what.into(),
            source: None,
        }
    }

    pub fn netlink_by(what: impl Into<String>, e: impl Into<NetlinkSource>) -> NvError {
        NvError::Netlink {
            what: what.into(),
            source: Some(e.into()),
        }
    }

    pub fn cluster(what: impl Into<String>) -> NvError {
        NvError::Cluster {
            what: what.into(),
            source: None,
        }
    }

    pub fn cluster_by(what: impl Into<String>, e: impl Into<EtcdSource>) -> NvError {
        NvError::Cluster {
            what: what.into(),
            source: Some(Box::new(e.into())),
        }
    }
}

pub type Result<T, E = NvError> = std::result::Result<T, E>;

pub fn invalid(msg: impl Into<String>) -> NvError {
    NvError::Invalid(msg.into())
}

/// Verifier logs run to thousands of lines; the reason is at the end.
const MAX_LINE_CHARS: usize = 2000;

/// An error and its sources as the one line an operator reads: each cause after a colon,
/// none said twice, the end kept when it is too long (a verifier log's reason is at its end).
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let said = s.to_string();
        if !line.ends_with(&said) {
            line.push_str(": ");
            line.push_str(&said);
        }
        source = s.source();
    }
    let line = line.replace('\n', " ");
    if line.len() <= MAX_LINE_CHARS {
        return line;
    }
    let cut = line.len() - MAX_LINE_CHARS;
    let cut = (cut..line.len())
        .find(|i| line.is_char_boundary(*i))
        .unwrap_or(cut);
    let head = e.to_string();
    format!("{head}: ...{}", &line[cut..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied");
        let e = NvError::datapath_by("attach XDP to uplink0", io);
        assert_eq!(
            one_line(&e),
            "datapath: attach XDP to uplink0: permission denied"
        );
        assert!(std::error::Error::source(&e).is_some());
        let long = NvError::datapath_by(
            "load nv_from_vm",
            std::io::Error::other(format!("{}the reason", "verifier says\n".repeat(500))),
        );
        let line = one_line(&long);
        assert!(line.len() < 2100 && line.ends_with("the reason") && !line.contains('\n'));
    }
}
