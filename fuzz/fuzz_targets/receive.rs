//! The whole receiving side of one message: envelope, signature, trust policy, sequence
//! tracking and caches (`invalbus::fuzz_receive`, which feeds bytes to a bus's receiver as if
//! they arrived on a subject). Nothing may panic, whatever arrives.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    invalbus::fuzzing::receive(data);
});
