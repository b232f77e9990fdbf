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
use std::sync::Arc;

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
///
/// The entry's encoding (a JSON array of the commands) is made once, when proposed, and
/// kept: the leader writes the entry to its log and sends it to every follower, and
/// re-encoding it each time cost more CPU than the rest of the write path.
#[derive(Debug, Clone)]
pub struct Proposal {
    commands: Vec<Command>,
    json: Arc<[u8]>,
}

impl Proposal {
    /// A proposal of `commands`, encoded at once (tests build entries with it).
    #[cfg(test)]
    pub fn new(commands: Vec<Command>) -> Result<Self, serde_json::Error> {
        let json = serde_json::to_vec(&commands)?;
        Ok(Self {
            commands,
            json: json.into(),
        })
    }

    /// A proposal of commands that come with their own JSON encoding (as
    /// [`encode_command`] made it).
    pub fn from_encoded(parts: Vec<(Command, Vec<u8>)>) -> Self {
        let mut json =
            Vec::with_capacity(2 + parts.iter().map(|(_, j)| j.len() + 1).sum::<usize>());
        json.push(b'[');
        let mut commands = Vec::with_capacity(parts.len());
        for (k, (cmd, encoded)) in parts.into_iter().enumerate() {
            if k > 0 {
                json.push(b',');
            }
            json.extend_from_slice(&encoded);
            commands.push(cmd);
        }
        json.push(b']');
        Self {
            commands,
            json: json.into(),
        }
    }

    /// The commands, in order.
    #[cfg(test)]
    pub fn commands(&self) -> &[Command] {
        &self.commands
    }

    /// The commands, taken.
    pub fn into_commands(self) -> Vec<Command> {
        self.commands
    }
}

impl PartialEq for Proposal {
    fn eq(&self, other: &Self) -> bool {
        self.commands == other.commands
    }
}

/// One command's JSON encoding, as [`Proposal::from_encoded`] takes it.
pub fn encode_command(cmd: &Command) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(cmd)
}

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
        serializer.serialize_bytes(&self.json)
    }
}

impl<'de> Deserialize<'de> for Proposal {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = deserializer.deserialize_byte_buf(BytesVisitor)?;
        let commands = serde_json::from_slice(&bytes).map_err(de::Error::custom)?;
        Ok(Self {
            commands,
            json: bytes.into(),
        })
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
        let cmds = vec![
            Command::DeleteHost {
                id: HostId::minted("h1".into()),
            },
            Command::DeleteHost {
                id: HostId::minted("h2".into()),
            },
        ];
        let p = Proposal::new(cmds.clone()).unwrap();
        let b = crate::codec::encode(&p).unwrap();
        assert_eq!(crate::codec::decode::<Proposal>(&b).unwrap(), p);
        let j = serde_json::to_vec(&p).unwrap();
        assert_eq!(serde_json::from_slice::<Proposal>(&j).unwrap(), p);
        // Commands encoded one by one make the same entry bytes as the batch at once.
        let parts = cmds
            .iter()
            .map(|c| (c.clone(), encode_command(c).unwrap()))
            .collect();
        let joined = Proposal::from_encoded(parts);
        assert_eq!(crate::codec::encode(&joined).unwrap(), b);
        assert_eq!(joined.commands(), &cmds[..]);
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
            payload: EntryPayload::Normal(
                Proposal::new(vec![Command::DeleteHost {
                    id: HostId::minted("h9".into()),
                }])
                .unwrap(),
            ),
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
