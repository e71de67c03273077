//! Writes one encoded example of each peer message into the corpora
//! (`corpus/peer_message/` as envelopes, `corpus/peer_frame/` framed).

use bytes::Bytes;
use distcache_node::cluster::table::Table;
use distcache_node::meta::state::{MetaCmd, MetaReply};
use distcache_node::net::message::{
    Body, CollectionOp, ReplItem, Envelope, Heartbeat, PROTOCOL_VERSION, Request, Response, WireError,
    encode,
};
use distcache_node::replica::{PartitionSnapshot, ReplOp};

fn main() {
    let table = Table::for_test(3, &[&["a", "b"], &["b", "a"]], &[("a", 1), ("b", 2)]);
    let put = ReplOp::Put {
        collection: "c".into(),
        key: Bytes::from_static(b"k"),
        value: Bytes::from_static(b"v"),
        expires_at: 5,
    };
    let requests = vec![
        Request::Heartbeat(Heartbeat {
            name: "a".into(),
            incarnation: 1,
            epoch: 3,
            leaving: false,
            quorum: true,
            seq: 9,
            unloaded: vec![1, 2],
            wall_ms: 1_700_000_000_000,
            skewed: false,
        }),
        Request::Meta(MetaCmd::Table {
            base: 2,
            table: table.clone(),
            reset: vec![0],
        }),
        Request::Meta(MetaCmd::Shrink {
            epoch: 3,
            partitions: vec![0, 1],
            primary: "a".into(),
            member: "b".into(),
        }),
        Request::Meta(MetaCmd::Expand {
            epoch: 3,
            partition: 0,
            primary: "a".into(),
            member: "b".into(),
        }),
        Request::Meta(MetaCmd::Forget { member: "b".into() }),
        Request::Replicate {
            from: "a".into(),
            items: vec![ReplItem {
                partition: 0,
                epoch: 3,
                stream: 9,
                seq: 2,
                ops: vec![
                    put.clone(),
                    ReplOp::Delete {
                        collection: "c".into(),
                        key: Bytes::from_static(b"k"),
                    },
                    ReplOp::Clear {
                        collection: "c".into(),
                    },
                ],
            }],
        },
        Request::Snapshot {
            from: "a".into(),
            epoch: 3,
            partition: 1,
            chunk: 0,
            last: true,
            snapshot: PartitionSnapshot {
                collections: vec![("c".into(), vec![(Bytes::from_static(b"k"), Bytes::from_static(b"v"), 0)])],
                locks: Vec::new(),
                lock_high_water: 4,
            },
            stream: 9,
            seq: 2,
        },
        Request::Digest {
            epoch: 3,
            partition: 0,
        },
        Request::Collection(CollectionOp::Create {
            name: "c".into(),
            default_ttl_ms: 0,
            max_entries: 10,
        }),
        Request::Collection(CollectionOp::Delete { name: "c".into() }),
        Request::ListCollections,
    ];
    let responses = vec![
        Response::Ok,
        Response::Meta {
            reply: MetaReply::Refused("no".into()),
            index: 7,
        },
        Response::Digest {
            digest: 42,
            stream: 9,
            seq: 2,
        },
        Response::Replicated(vec![
            None,
            Some(WireError {
                reason: 14,
                message: "gap".into(),
            }),
        ]),
        Response::Collections(vec![("c".into(), 0, 10)]),
        Response::Error(WireError {
            reason: 14,
            message: "unavailable".into(),
        }),
    ];
    let bodies = requests
        .into_iter()
        .map(Body::Request)
        .chain(responses.into_iter().map(Body::Response));
    for dir in ["corpus/peer_message", "corpus/peer_frame"] {
        std::fs::create_dir_all(dir).expect("corpus dir");
    }
    for (i, body) in bodies.enumerate() {
        let bytes = encode(&Envelope {
            version: PROTOCOL_VERSION,
            id: i as u64,
            body,
        })
        .expect("encode");
        std::fs::write(format!("corpus/peer_message/seed-{i:02}"), &bytes).expect("write");
        let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        framed.extend_from_slice(&framed.clone());
        std::fs::write(format!("corpus/peer_frame/seed-{i:02}"), framed).expect("write");
    }
}
