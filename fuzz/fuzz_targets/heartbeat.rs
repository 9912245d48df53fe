//! A heartbeat as it comes off the network (inside and outside its envelope).
#![no_main]

use bytes::Bytes;
use invalbus::Limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let payload = Bytes::copy_from_slice(data);
    if let Ok(env) = invalbus::open(&payload, &limits) {
        let _ = invalbus::decode_heartbeat(&env.body, "ns", &limits);
    }
    if let Ok(hb) = invalbus::decode_heartbeat(data, "ns", &limits) {
        let again = invalbus::decode_heartbeat(&invalbus::encode_heartbeat(&hb), "ns", &limits)
            .expect("a decoded heartbeat re-encodes to a valid one");
        assert_eq!(again, hb);
    }
});
