//! A batch as it comes off the network: the signed envelope, then the batch inside it. Neither
//! may panic, and what decodes must re-encode to something that decodes the same.
#![no_main]

use bytes::Bytes;
use invalbus::Limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let payload = Bytes::copy_from_slice(data);
    if let Ok(env) = invalbus::open(&payload, &limits) {
        let _ = invalbus::decode_batch(&env.body, "ns", &limits);
    }
    if let Ok(batch) = invalbus::decode_batch(data, "ns", &limits) {
        let again = invalbus::decode_batch(&invalbus::encode_batch(&batch), "ns", &limits)
            .expect("a decoded batch re-encodes to a valid one");
        assert_eq!(again, batch);
    }
});
