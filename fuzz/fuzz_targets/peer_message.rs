//! Every peer message: any bytes decoded as an envelope (requests and
//! responses of every kind) re-encode; a decoded metadata command, applied
//! to the state machine (empty, then after a valid first table), is
//! accepted or refused but never panics, and what it accepts passes the
//! table rules.
#![no_main]

use distcache_node::cluster::table::Table;
use distcache_node::meta::state::{MetaCmd, MetaState, Shape, validate};
use distcache_node::net::message::{Body, Request, decode, encode};
use libfuzzer_sys::fuzz_target;

const SHAPE: Shape = Shape {
    partition_count: 8,
    backup_count: 1,
};

fn check(state: &mut MetaState, cmd: MetaCmd) {
    let _ = state.apply(cmd, SHAPE);
    if let Some(t) = state.table.as_ref() {
        assert!(validate(t, SHAPE).is_ok(), "an applied table breaks the rules");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = decode(data) {
        let again = encode(&env).expect("a decoded envelope encodes");
        assert!(decode(&again).is_ok());
        if let Body::Request(Request::Meta(cmd)) = env.body {
            let mut empty = MetaState::default();
            check(&mut empty, cmd.clone());
            let mut started = MetaState::default();
            let _ = started.apply(
                MetaCmd::Table {
                    base: 0,
                    table: Table::for_test(
                        0,
                        &[&["a", "b"], &["b", "c"], &["c", "a"], &["a", "c"], &["b", "a"], &["c", "b"], &["a", "b"], &["b", "c"]],
                        &[("a", 1), ("b", 1), ("c", 1)],
                    ),
                    reset: Vec::new(),
                },
                SHAPE,
            );
            check(&mut started, cmd);
        }
    }
    // The same bytes as a bare metadata command (the Raft log's payload).
    if let Ok(cmd) = rmp_serde::from_slice::<MetaCmd>(data) {
        check(&mut MetaState::default(), cmd);
    }
});
