//! The openraft type configuration of a site: node ids, node addresses, and the wrappers that
//! carry domain commands and their outcomes through the Raft log.
//!
//! Domain values (`Command`, `CommandOutcome`) are embedded as JSON bytes inside the
//! binary-encoded Raft structures. The domain types are owned by `tandem-core` and grow over
//! time; JSON accepts every serde feature they may use (internally tagged enums, skipped
//! fields, defaults), which a non-self-describing format such as bincode does not, and it lets
//! a newer binary read log entries written by an older one when fields are added with
//! defaults.

use std::fmt;
use std::io::Cursor;

use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use tandem_core::state::{Command, CommandOutcome};

/// A Raft node id. Stable for the life of a node; `0` is allowed but discouraged.
pub type NodeId = u64;

/// The addresses of one site manager node, replicated in the Raft membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Address (`host:port`) of the node's Raft gRPC listener.
    pub raft_addr: String,
    /// Address (`host:port`) of the node's public API listener, for client redirects.
    pub api_addr: String,
}

impl NodeInfo {
    /// A node reachable at `raft_addr` for Raft and at `api_addr` for clients.
    pub fn new(raft_addr: impl Into<String>, api_addr: impl Into<String>) -> Self {
        Self {
            raft_addr: raft_addr.into(),
            api_addr: api_addr.into(),
        }
    }
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} api={}", self.raft_addr, self.api_addr)
    }
}

/// The domain commands of one Raft log entry, applied in order. Commands proposed
/// concurrently share an entry (group commit): one fsync and one replication round for all.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal(pub Vec<Command>);

/// What applying one log entry produced: each command's outcome for normal entries, in order;
/// nothing for blank and membership entries.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyResult(pub Vec<CommandOutcome>);

openraft::declare_raft_types!(
    /// The openraft type configuration of the site configuration store.
    pub TypeConfig:
        D = Proposal,
        R = ApplyResult,
        NodeId = NodeId,
        Node = NodeInfo,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft handle type of the store.
pub type Raft = openraft::Raft<TypeConfig>;
/// A Raft log entry of the store.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id (leader term and node, index).
pub type LogId = openraft::LogId<NodeId>;
/// The membership last applied, with the log id of its entry.
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
/// Metadata of a state machine snapshot.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
/// A storage error as openraft reports it.
pub type StorageError = openraft::StorageError<NodeId>;

fn serialize_json<T: Serialize, S: Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let bytes = serde_json::to_vec(value).map_err(serde::ser::Error::custom)?;
    serializer.serialize_bytes(&bytes)
}

fn deserialize_json<'de, T: DeserializeOwned, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<T, D::Error> {
    let bytes = deserializer.deserialize_byte_buf(BytesVisitor)?;
    serde_json::from_slice(&bytes).map_err(de::Error::custom)
}

/// Accepts a byte string however the outer format represents it (bytes or a sequence).
struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string holding JSON")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
        Ok(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.as_bytes().to_vec())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(out)
    }
}

impl Serialize for Proposal {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_json(&self.0, serializer)
    }
}

impl<'de> Deserialize<'de> for Proposal {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_json(deserializer).map(Proposal)
    }
}

impl Serialize for ApplyResult {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_json(&self.0, serializer)
    }
}

impl<'de> Deserialize<'de> for ApplyResult {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize_json(deserializer).map(ApplyResult)
    }
}

#[cfg(test)]
mod tests {
    use tandem_core::error::DomainError;
    use tandem_core::ids::HostId;

    use super::*;

    #[test]
    fn proposal_round_trips_through_the_codec_and_json() {
        let p = Proposal(vec![
            Command::DeleteHost {
                id: HostId::minted("h1".into()),
            },
            Command::DeleteHost {
                id: HostId::minted("h2".into()),
            },
        ]);
        let b = crate::codec::encode(&p).unwrap();
        assert_eq!(crate::codec::decode::<Proposal>(&b).unwrap(), p);
        let j = serde_json::to_vec(&p).unwrap();
        assert_eq!(serde_json::from_slice::<Proposal>(&j).unwrap(), p);
    }

    #[test]
    fn apply_result_round_trips() {
        let r = ApplyResult(vec![Err(DomainError::NotFound {
            kind: "host".into(),
            id: "h1".into(),
        })]);
        let b = crate::codec::encode(&r).unwrap();
        assert_eq!(crate::codec::decode::<ApplyResult>(&b).unwrap(), r);
        let none = ApplyResult(Vec::new());
        let b = crate::codec::encode(&none).unwrap();
        assert_eq!(crate::codec::decode::<ApplyResult>(&b).unwrap(), none);
    }

    #[test]
    fn log_entries_round_trip_through_the_codec() {
        use std::collections::{BTreeMap, BTreeSet};

        use openraft::{CommittedLeaderId, EntryPayload, Membership};

        let log_id = LogId::new(CommittedLeaderId::new(3, 1), 42);
        let normal = Entry {
            log_id,
            payload: EntryPayload::Normal(Proposal(vec![Command::DeleteHost {
                id: HostId::minted("h9".into()),
            }])),
        };
        let nodes = BTreeMap::from([(1, NodeInfo::new("127.0.0.1:1", "127.0.0.1:2"))]);
        let membership = Entry {
            log_id,
            payload: EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1])], nodes)),
        };
        for entry in [normal, membership] {
            let bytes = crate::codec::encode(&entry).unwrap();
            let back: Entry = crate::codec::decode(&bytes).unwrap();
            assert_eq!(back.log_id, entry.log_id);
            assert_eq!(
                format!("{:?}", back.payload),
                format!("{:?}", entry.payload)
            );
        }
    }
}
