//! Writes to etcd that outlive a member: every change nv makes to etcd's records goes through
//! [`EtcdWriter::write`], a transaction that compares before it writes (a key must be absent,
//! or at the revision the writer read). A request that fails in transport (the member closed
//! the connection, went away, or did not answer in time) may or may not have been applied, so
//! it is sent again to the next member, and the retry's answer is read with that in mind: when
//! its comparison fails because the keys already hold exactly what was written (or, for a
//! delete, nothing), the first attempt was applied and the write succeeded. Only when no member
//! can be reached does the caller hear "etcd is unreachable". Errors say in words what
//! happened, never gRPC's codes.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse,
};
use thiserror::Error;

/// How long one request may take before its member counts as gone.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a write keeps trying members (leader elections take a second or two).
const WRITE_BUDGET: Duration = Duration::from_secs(10);
/// How long a member may take to answer the first read on a new connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The key a new connection reads: one every identity of nv may read (hosts and operators
/// read all of `/nv/v1/`), absent or not.
const PROBE_KEY: &str = "/nv/v1/";
/// Pause after a round in which every member failed, before the next.
const ROUND_PAUSE: Duration = Duration::from_millis(250);

/// Why a write or a read did not happen.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// No member could be reached: the write was not made.
    #[error("no member answered ({0})")]
    Unreachable(String),
    /// A comparison failed: someone else changed the keys since they were read.
    #[error("the records changed in etcd meanwhile")]
    Conflict,
    /// etcd answered and said no (permissions, limits).
    #[error("etcd refused the request: {0}")]
    Refused(String),
}

/// What a key must hold for a write to go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key was last changed at this revision (what the writer read).
    At(i64),
}

/// One key of a write: what it must hold, and what it becomes (`None`: deleted).
#[derive(Clone, Debug)]
pub struct KeyWrite {
    pub key: String,
    pub expect: Expect,
    pub value: Option<Vec<u8>>,
}

/// A key as etcd holds it: its value and the revision of its last change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// The member failed: the connection to it is dropped and `observer` hears its endpoint.
type Observer = Box<dyn Fn(&str) + Send + Sync>;

/// One client of etcd's members for writes and the reads they depend on: a member at a time,
/// the next one when it fails.
pub struct EtcdWriter {
    endpoints: Vec<String>,
    options: ConnectOptions,
    /// The member in use (an index into `endpoints`) and its client, once connected.
    conn: tokio::sync::Mutex<(usize, Option<Client>)>,
    on_member_failed: Mutex<Option<Arc<Observer>>>,
}

/// How a request to one member ended, when it did not answer.
enum Failure {
    /// Never reached etcd: nothing was applied.
    Unreached(String),
    /// Sent, and the answer lost: it may have been applied.
    Uncertain(String),
    /// etcd answered no.
    Refused(String),
}

impl EtcdWriter {
    pub fn new(endpoints: Vec<String>, options: ConnectOptions) -> EtcdWriter {
        EtcdWriter {
            endpoints,
            options,
            conn: tokio::sync::Mutex::new((0, None)),
            on_member_failed: Mutex::new(None),
        }
    }

    /// Tells `f` the endpoint of every member a request found gone (the watcher following it
    /// can move on at once).
    pub fn on_member_failed(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        *self
            .on_member_failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(Box::new(f)));
    }

    /// Writes every key of `writes` in one transaction, all or none, when each holds what its
    /// [`Expect`] says. Returns the revision at which etcd holds the write.
    pub async fn write(&self, writes: &[KeyWrite]) -> Result<i64, EtcdError> {
        let compares: Vec<Compare> = writes
            .iter()
            .map(|w| match w.expect {
                Expect::Absent => Compare::create_revision(w.key.clone(), CompareOp::Equal, 0),
                Expect::At(rev) => Compare::mod_revision(w.key.clone(), CompareOp::Equal, rev),
            })
            .collect();
        let ops: Vec<TxnOp> = writes
            .iter()
            .map(|w| match &w.value {
                Some(v) => TxnOp::put(w.key.clone(), v.clone(), None),
                None => TxnOp::delete(w.key.clone(), None),
            })
            .collect();
        // When the comparison fails, the same transaction reads the keys back: a retry learns
        // in one answer whether its first attempt was applied.
        let reads: Vec<TxnOp> = writes
            .iter()
            .map(|w| TxnOp::get(w.key.clone(), None))
            .collect();
        let txn = Txn::new().when(compares).and_then(ops).or_else(reads);
        let (resp, uncertain) = self
            .retry(|mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await?;
        let revision = resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        if resp.succeeded() {
            return Ok(revision);
        }
        if uncertain && holds(writes, &read_back(&resp.op_responses())) {
            tracing::info!(
                keys = writes.len(),
                "a retried write found etcd holding what it wrote: the first attempt was applied"
            );
            return Ok(revision);
        }
        Err(EtcdError::Conflict)
    }

    /// The key as etcd holds it now (`None`: absent).
    pub async fn get(&self, key: &str) -> Result<Option<Held>, EtcdError> {
        let (resp, _) = self
            .retry(|mut client| {
                let key = key.to_owned();
                async move { client.get(key, Some(GetOptions::new())).await }
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| Held {
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
        }))
    }

    /// Every key under `prefix` and its value, at one revision (which it says), a page at a
    /// time.
    pub async fn range(&self, prefix: &str) -> Result<(i64, Vec<(Vec<u8>, Vec<u8>)>), EtcdError> {
        let (read, _) = self
            .retry(|mut client| {
                let prefix = prefix.to_owned();
                async move { read_prefix(&mut client, &prefix).await }
            })
            .await?;
        Ok(read)
    }

    /// Runs `request` on a member, on the next one when it fails in transport, until one
    /// answers, etcd refuses, or every member failed to be reached in a round (or the time is
    /// up). Also says whether an attempt before the answer may have been applied.
    async fn retry<T, F, Fut>(&self, request: F) -> Result<(T, bool), EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let started = Instant::now();
        let mut uncertain = false;
        let mut round: Vec<String> = Vec::new();
        let mut reached_in_round = false;
        loop {
            let (member, client) = match self.client().await {
                Ok(c) => c,
                Err((member, why)) => {
                    round.push(format!("{}: {why}", self.endpoints[member]));
                    self.next_member(member).await;
                    if self
                        .end_of_round(&mut round, &mut reached_in_round, started)
                        .await
                    {
                        return Err(EtcdError::Unreachable(round.join("; ")));
                    }
                    continue;
                }
            };
            let failure = match tokio::time::timeout(REQUEST_TIMEOUT, request(client)).await {
                Ok(Ok(answer)) => return Ok((answer, uncertain)),
                Ok(Err(e)) => classify(&e),
                Err(_) => {
                    Failure::Uncertain(format!("no answer in {} s", REQUEST_TIMEOUT.as_secs()))
                }
            };
            let why = match failure {
                Failure::Refused(why) => return Err(EtcdError::Refused(why)),
                Failure::Unreached(why) => why,
                Failure::Uncertain(why) => {
                    uncertain = true;
                    reached_in_round = true;
                    why
                }
            };
            tracing::warn!(
                member = %self.endpoints[member],
                "etcd request failed ({why}); trying the next member"
            );
            round.push(format!("{}: {why}", self.endpoints[member]));
            self.next_member(member).await;
            if self
                .end_of_round(&mut round, &mut reached_in_round, started)
                .await
            {
                return Err(EtcdError::Unreachable(round.join("; ")));
            }
        }
    }

    /// After a failed attempt: at the end of a round over every member, either gives up (no
    /// member was reached at all, or the time is up) or pauses before the next round.
    async fn end_of_round(
        &self,
        round: &mut Vec<String>,
        reached_in_round: &mut bool,
        started: Instant,
    ) -> bool {
        if started.elapsed() > WRITE_BUDGET {
            return true;
        }
        if round.len() < self.endpoints.len() {
            return false;
        }
        if !*reached_in_round {
            return true;
        }
        round.clear();
        *reached_in_round = false;
        tokio::time::sleep(ROUND_PAUSE).await;
        false
    }

    /// The client of the member in use, connecting to it if need be. Connecting is lazy, so
    /// a new client is asked a read the member answers alone (no leader needed): only an
    /// answer says a request sent there can reach etcd, and a failure here applied nothing.
    async fn client(&self) -> Result<(usize, Client), (usize, String)> {
        let mut conn = self.conn.lock().await;
        let member = conn.0;
        if let Some(c) = &conn.1 {
            return Ok((member, c.clone()));
        }
        let endpoint = &self.endpoints[member];
        let mut client = Client::connect([endpoint.as_str()], Some(self.options.clone()))
            .await
            .map_err(|e| (member, words(&e)))?;
        let probe = client.get(PROBE_KEY, Some(GetOptions::new().with_serializable()));
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err((member, words(&e))),
            Err(_) => {
                return Err((
                    member,
                    format!("no answer in {} s", PROBE_TIMEOUT.as_secs()),
                ));
            }
        }
        conn.1 = Some(client.clone());
        Ok((member, client))
    }

    /// Leaves `member` (if still in use) for the next one.
    async fn next_member(&self, member: usize) {
        {
            let mut conn = self.conn.lock().await;
            if conn.0 == member {
                *conn = ((member + 1) % self.endpoints.len(), None);
            }
        }
        let observer = self
            .on_member_failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(f) = observer {
            f(&self.endpoints[member]);
        }
    }
}

/// Keys read a request at a time by [`read_prefix`].
const PAGE: i64 = 10_000;

/// Every key under `prefix` with its value, at the revision of the first page (which it
/// says), a page at a time.
pub async fn read_prefix(
    client: &mut Client,
    prefix: &str,
) -> Result<(i64, Vec<(Vec<u8>, Vec<u8>)>), etcd_client::Error> {
    let end = {
        let mut e = prefix.as_bytes().to_vec();
        if let Some(last) = e.last_mut() {
            *last += 1;
        }
        e
    };
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut out = Vec::new();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let resp = client.get(from.clone(), Some(options)).await?;
        if revision == 0 {
            revision = resp
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision);
        }
        for kv in resp.kvs() {
            out.push((kv.key().to_vec(), kv.value().to_vec()));
        }
        match resp.kvs().last() {
            Some(kv) if resp.more() => {
                from = kv.key().to_vec();
                from.push(0);
            }
            _ => return Ok((revision, out)),
        }
    }
}

/// The values a failed comparison read back, key by key (`None`: absent).
fn read_back(reads: &[TxnOpResponse]) -> Vec<Option<Vec<u8>>> {
    reads
        .iter()
        .map(|r| match r {
            TxnOpResponse::Get(got) => got.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        })
        .collect()
}

/// Whether etcd's keys, as read back, hold exactly what `writes` wrote (a deleted key: none).
fn holds(writes: &[KeyWrite], read: &[Option<Vec<u8>>]) -> bool {
    writes.len() == read.len() && writes.iter().zip(read).all(|(w, r)| w.value == *r)
}

/// How a failed request ended, in words.
fn classify(e: &etcd_client::Error) -> Failure {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            Failure::Unreached(words(e))
        }
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            Code::Cancelled | Code::Unavailable | Code::DeadlineExceeded | Code::Unknown => {
                Failure::Uncertain(words(e))
            }
            _ => Failure::Refused(words(e)),
        },
        _ => Failure::Refused(words(e)),
    }
}

/// An etcd client error as an operator reads it: what happened, then etcd's own words where
/// they say more than gRPC's code.
pub fn words(e: &etcd_client::Error) -> String {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(t) => {
            format!("cannot connect: {}", root_cause(t))
        }
        etcd_client::Error::GRpcStatus(s) => {
            let what = match s.code() {
                Code::Cancelled => "the member closed the connection",
                Code::Unavailable => "the member is unavailable",
                Code::DeadlineExceeded => "the member did not answer in time",
                Code::PermissionDenied => "permission denied to this identity",
                Code::Unauthenticated => "this client is not authenticated",
                Code::InvalidArgument => "etcd found the request invalid",
                Code::ResourceExhausted => "etcd is out of room",
                Code::FailedPrecondition => "etcd cannot do that now",
                _ => "the request failed",
            };
            let said = s.message();
            // gRPC's own texts say nothing more than the code; etcd's ("etcdserver: ...") do.
            if said.is_empty()
                || said.contains("operation was canceled")
                || said == "transport error"
            {
                what.to_owned()
            } else {
                format!("{what}: {}", said.trim_start_matches("etcdserver: "))
            }
        }
        other => other.to_string(),
    }
}

/// The innermost cause of an error (`connection refused`, not the layers above it).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> KeyWrite {
        KeyWrite {
            key: key.into(),
            expect: Expect::Absent,
            value: Some(value.as_bytes().to_vec()),
        }
    }

    #[test]
    fn words_name_what_happened() {
        let cancelled =
            etcd_client::Error::GRpcStatus(tonic::Status::cancelled("operation was canceled"));
        assert_eq!(words(&cancelled), "the member closed the connection");
        assert!(matches!(classify(&cancelled), Failure::Uncertain(_)));
        let no_leader =
            etcd_client::Error::GRpcStatus(tonic::Status::unavailable("etcdserver: no leader"));
        assert_eq!(words(&no_leader), "the member is unavailable: no leader");
        let denied = etcd_client::Error::GRpcStatus(tonic::Status::permission_denied(
            "etcdserver: permission denied",
        ));
        assert!(
            matches!(classify(&denied), Failure::Refused(w) if w.contains("permission denied"))
        );
    }

    #[test]
    fn a_retry_is_a_success_only_when_etcd_holds_exactly_what_was_written() {
        let writes = [put("/a", "1"), put("/b", "2")];
        let v = |s: &str| Some(s.as_bytes().to_vec());
        assert!(holds(&writes, &[v("1"), v("2")]));
        // Another writer's value, a key missing, or fewer keys read: not ours.
        assert!(!holds(&writes, &[v("1"), v("3")]));
        assert!(!holds(&writes, &[v("1"), None]));
        assert!(!holds(&writes, &[v("1")]));
        let delete = [KeyWrite {
            key: "/gone".into(),
            expect: Expect::At(7),
            value: None,
        }];
        assert!(holds(&delete, &[None]));
        assert!(!holds(&delete, &[v("back again")]));
    }
}
