//! Entry points for the fuzz targets (`fuzz/`), behind the `fuzzing` feature: they feed bytes
//! to a bus's receiver as if they arrived from the network.

use std::sync::LazyLock;

use bytes::Bytes;

use crate::config::CacheConfig;
use crate::identity::{Identity, Kind};
use crate::transport::InProcessHub;
use crate::Bus;

pub use crate::codec::{decode_batch_with_prost, encode_batch_with_prost};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the fuzz target")
});

/// A bus on an in-process hub, with one cache holding a few entries, and the key its peers sign
/// with (trusted: pinned on first use).
static BUS: LazyLock<(Bus, Identity)> = LazyLock::new(|| {
    RUNTIME.block_on(async {
        let hub = InProcessHub::new();
        let bus = Bus::builder()
            .in_process(&hub)
            .namespace("ns")
            .node_id("fuzz")
            .build()
            .await
            .expect("the fuzz target's bus");
        let cache = bus.cache::<u8>("c", CacheConfig::new(100)).expect("cache");
        for k in ["k", "a:1", "a:2", "b"] {
            let _ = cache
                .get_or_load(k, || async {
                    Ok::<_, std::io::Error>(crate::Loaded::new(1u8).tag("t").version(3))
                })
                .await;
        }
        (bus, Identity::generate())
    })
});

/// Feeds one message to the receiver's live path. The first byte picks the subject (batch or
/// heartbeat; origin `a`, `b` or the bus's own) and whether the rest is sent as is or signed as
/// a body by a peer's key (so that what follows the signature check is fuzzed too).
pub fn receive(data: &[u8]) {
    let Some((&select, rest)) = data.split_first() else {
        return;
    };
    let (bus, key) = &*BUS;
    let (kind, label) = if select & 1 == 0 {
        (Kind::Batch, "inv")
    } else {
        (Kind::Heartbeat, "hb")
    };
    let origin = ["a", "b", "fuzz"][usize::from((select >> 1) % 3)];
    let payload = if select & 0x80 != 0 {
        Bytes::copy_from_slice(rest)
    } else {
        crate::codec::seal(key, kind, Bytes::copy_from_slice(rest))
    };
    let subject = format!("invalbus.ns.{label}.{origin}");
    RUNTIME.block_on(crate::receiver::receive_for_fuzzing(&bus.inner, &subject, payload));
}
