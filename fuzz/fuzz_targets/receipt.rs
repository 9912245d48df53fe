//! A receipt as the audit log reads it back (inside and outside its envelope).
#![no_main]

use bytes::Bytes;
use invalbus::{Limits, Receipt};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);
    if let Ok(env) = invalbus::open(&payload, &Limits::default()) {
        let _ = Receipt::decode(&env.body);
    }
    if let Ok(r) = Receipt::decode(data) {
        assert_eq!(Receipt::decode(&r.encode()).expect("re-encodes"), r);
    }
});
