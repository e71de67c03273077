//! Bytes as they arrive on a peer connection: the frame reader (length
//! prefix, bounded, buffered under a byte budget), then the envelope
//! decoder, frame after frame until the input ends. Must never panic or
//! allocate beyond the maximum.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use distcache_node::net::frame::read_frame;
use distcache_node::net::message::decode;
use libfuzzer_sys::fuzz_target;
use tokio::sync::Semaphore;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let budget = Arc::new(Semaphore::new(1 << 20));
        let mut input = data;
        for _ in 0..64 {
            let d = Duration::from_millis(50);
            match read_frame(&mut input, 1 << 20, d, d, Some(&budget)).await {
                Ok(Some(frame)) => {
                    assert!(frame.bytes.len() <= 1 << 20);
                    let _ = decode(&frame.bytes);
                }
                Ok(None) | Err(_) => break,
            }
        }
        assert_eq!(budget.available_permits(), 1 << 20, "budget leaked");
    });
});
