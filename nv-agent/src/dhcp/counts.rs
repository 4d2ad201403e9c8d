//! What the DHCP server counts, read by the metrics endpoint: requests by kind, answers by
//! kind, frames unanswered by reason; and the router advertisements the slow path sent.
use std::sync::atomic::{AtomicU64, Ordering};

use dhcproto::v4::MessageType;

use super::{REPLY_KINDS, Unanswered, v6};

/// Request kinds as Prometheus labels (`nv_dhcp_requests_total{type}`).
pub const REQUEST_KINDS: [&str; 6] = [
    "discover", "request", "inform", "release", "decline", "other",
];

/// Why a router advertisement was sent (`nv_router_adverts_total{why}`).
pub const ADVERT_WHYS: [&str; 2] = ["solicited", "periodic"];

/// What the server counted since the agent started.
#[derive(Debug, Default)]
pub struct Counts {
    requests: [AtomicU64; REQUEST_KINDS.len()],
    replies: [AtomicU64; REPLY_KINDS.len()],
    unanswered: [AtomicU64; Unanswered::ALL.len()],
    adverts: [AtomicU64; ADVERT_WHYS.len()],
    requests6: [AtomicU64; v6::REQUEST_KINDS.len()],
    replies6: [AtomicU64; v6::REPLY_KINDS.len()],
}

impl Counts {
    /// Requests by kind, replies by kind and frames unanswered by reason.
    pub fn read(&self) -> CountsNow {
        let read = |a: &[AtomicU64], names: &[&'static str]| {
            names
                .iter()
                .zip(a)
                .map(|(n, v)| (*n, v.load(Ordering::Relaxed)))
                .collect()
        };
        let reasons: Vec<&'static str> = Unanswered::ALL.iter().map(|u| u.name()).collect();
        CountsNow {
            requests: read(&self.requests, &REQUEST_KINDS),
            replies: read(&self.replies, &REPLY_KINDS),
            unanswered: read(&self.unanswered, &reasons),
            adverts: read(&self.adverts, &ADVERT_WHYS),
            requests6: read(&self.requests6, &v6::REQUEST_KINDS),
            replies6: read(&self.replies6, &v6::REPLY_KINDS),
        }
    }

    pub(super) fn request(&self, kind: MessageType) {
        let i = match kind {
            MessageType::Discover => 0,
            MessageType::Request => 1,
            MessageType::Inform => 2,
            MessageType::Release => 3,
            MessageType::Decline => 4,
            _ => 5,
        };
        self.requests[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn reply(&self, kind: &str) {
        if let Some(i) = REPLY_KINDS.iter().position(|k| *k == kind) {
            self.replies[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One more `DHCPv6` message of kind `i` ([`v6::REQUEST_KINDS`]).
    pub(super) fn request6(&self, i: usize) {
        if let Some(n) = self.requests6.get(i) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn reply6(&self, kind: &str) {
        if let Some(i) = v6::REPLY_KINDS.iter().position(|k| *k == kind) {
            self.replies6[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One more advertisement sent: `solicited`, else periodic.
    pub(super) fn advert(&self, solicited: bool) {
        self.adverts[usize::from(!solicited)].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn unanswered(&self, why: Unanswered) {
        if let Some(i) = Unanswered::ALL.iter().position(|u| *u == why) {
            self.unanswered[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// [`Counts`] at one moment, by label.
#[derive(Clone, Debug, Default)]
pub struct CountsNow {
    pub requests: Vec<(&'static str, u64)>,
    pub replies: Vec<(&'static str, u64)>,
    pub unanswered: Vec<(&'static str, u64)>,
    pub adverts: Vec<(&'static str, u64)>,
    pub requests6: Vec<(&'static str, u64)>,
    pub replies6: Vec<(&'static str, u64)>,
}
