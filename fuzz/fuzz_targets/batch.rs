//! A batch as it comes off the network: the signed envelope, then the batch inside it. Neither
//! may panic; the borrowed decoder the receiver uses must accept and refuse what prost's
//! generated code does, and decode it alike; and what decodes must re-encode, byte for byte as
//! prost encodes it, to something that decodes the same.
#![no_main]

use bytes::Bytes;
use invalbus::fuzzing::{decode_batch_with_prost, encode_batch_with_prost};
use invalbus::Limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let payload = Bytes::copy_from_slice(data);
    if let Ok(env) = invalbus::open(&payload, &limits) {
        let _ = invalbus::decode_batch(&env.body, "ns", &limits);
    }
    let ours = invalbus::decode_batch(data, "ns", &limits);
    match (&ours, decode_batch_with_prost(data, "ns", &limits)) {
        (Ok(a), Ok(b)) => assert_eq!(a, &b, "the two decoders read the batch differently"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("the two decoders disagree: {a:?} against {b:?}"),
    }
    if let Ok(batch) = ours {
        let bytes = invalbus::encode_batch(&batch);
        assert_eq!(bytes, encode_batch_with_prost(&batch), "encoded unlike prost");
        let again = invalbus::decode_batch(&bytes, "ns", &limits).expect("a decoded batch re-encodes to a valid one");
        assert_eq!(again, batch);
    }
});
