//! Admin requests a node reads from its callers: audit filters (as protobuf) and page tokens.
#![no_main]

use invalbus::Limits;
use invalbus_node::pb::admin::AuditFilter;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = AuditFilter::decode(data) {
        let _ = invalbus_node::audit::Filter::from_pb(Some(&f), &Limits::default());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = invalbus_node::audit::parse_page_token(text);
    }
});
