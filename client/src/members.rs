//! The member list the operator publishes for the nodes (ConfigMap key
//! [`MEMBERS_JSON_KEY`]): stable names, addresses, readiness, the pod each
//! member runs in, and the expected cluster size. The operator writes it,
//! the nodes' Kubernetes membership provider watches it.

use serde::{Deserialize, Serialize};

/// ConfigMap key of the JSON member list.
pub const MEMBERS_JSON_KEY: &str = "members.json";
/// ConfigMap key of the same list as `NAME=GRPC/PEER` text (the
/// `--members-file` syntax).
pub const MEMBERS_TEXT_KEY: &str = "members";

/// The published member list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedMembers {
    /// Members the cluster should have now.
    pub expected_size: u32,
    /// One entry per expected member, by stable name.
    pub members: Vec<PublishedMember>,
}

/// One published member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedMember {
    /// Stable name (the pod name).
    pub name: String,
    /// Client (gRPC) address.
    pub grpc: String,
    /// Peer address.
    pub peer: String,
    /// The pod passes its readiness probe.
    #[serde(default)]
    pub ready: bool,
    /// UID of the pod the member runs in; empty when no pod exists (deleted,
    /// not created yet). A change means the previous process is gone.
    #[serde(default)]
    pub pod_uid: String,
}

impl PublishedMembers {
    /// Parses the JSON form.
    pub fn from_json(s: &str) -> Result<PublishedMembers, String> {
        let m: PublishedMembers =
            serde_json::from_str(s).map_err(|e| format!("{MEMBERS_JSON_KEY}: {e}"))?;
        if m.members.len() != m.expected_size as usize {
            return Err(format!(
                "{MEMBERS_JSON_KEY}: expectedSize {} but {} members listed",
                m.expected_size,
                m.members.len()
            ));
        }
        Ok(m)
    }

    /// The `NAME=GRPC/PEER` text form, one member per line.
    pub fn to_text(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}/{}", m.name, m.grpc, m.peer))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_checks_the_size() {
        let m = PublishedMembers {
            expected_size: 1,
            members: vec![PublishedMember {
                name: "c-0".into(),
                grpc: "10.0.0.1:7000".into(),
                peer: "10.0.0.1:7001".into(),
                ready: true,
                pod_uid: "u1".into(),
            }],
        };
        let json = serde_json::to_string(&m).expect("json");
        assert!(json.contains("\"expectedSize\":1") && json.contains("\"podUid\":\"u1\""));
        assert_eq!(PublishedMembers::from_json(&json), Ok(m.clone()));
        assert_eq!(m.to_text(), "c-0=10.0.0.1:7000/10.0.0.1:7001");
        let bad = json.replace("\"expectedSize\":1", "\"expectedSize\":2");
        assert!(PublishedMembers::from_json(&bad).is_err());
        assert!(PublishedMembers::from_json("{").is_err());
    }
}
