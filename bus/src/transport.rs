//! The links a bus publishes and receives through: a NATS connection, or an in-process hub that
//! gives the same semantics without a server (for single-process use and unit tests).

use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::broadcast;

/// Subjects of one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(namespace: &str) -> Self {
        Subjects {
            prefix: format!("invalbus.{namespace}"),
        }
    }
    /// Where `origin` publishes its batches.
    pub fn inv(&self, origin: &str) -> String {
        format!("{}.inv.{origin}", self.prefix)
    }
    /// Where `origin` publishes its heartbeats.
    pub fn hb(&self, origin: &str) -> String {
        format!("{}.hb.{origin}", self.prefix)
    }
    /// Everything of the namespace that a node listens to.
    pub fn all(&self) -> String {
        format!("{}.*.*", self.prefix)
    }
    /// Every batch of the namespace (what a JetStream stream keeps).
    pub fn all_inv(&self) -> String {
        format!("{}.inv.*", self.prefix)
    }
    /// Every heartbeat of the namespace (the stream keeps each node's latest).
    pub fn all_hb(&self) -> String {
        format!("{}.hb.*", self.prefix)
    }
    /// Splits a received subject into its kind (`inv` or `hb`) and origin.
    pub fn parse<'a>(&self, subject: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = subject.strip_prefix(self.prefix.as_str())?.strip_prefix('.')?;
        rest.split_once('.')
    }
}

/// A message received on the namespace's subjects.
pub(crate) struct Received {
    pub subject: String,
    pub payload: Bytes,
}

/// Events of the link that matter for coherence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkEvent {
    Connected,
    Disconnected,
    /// Messages were dropped before this node read them.
    SlowConsumer,
}

/// An in-process hub: buses attached to one hub exchange messages as if over one NATS server.
///
/// It keeps NATS's semantics that matter here: each subscriber gets every message in publish
/// order, and a subscriber that falls too far behind loses messages (and is told, as a slow
/// consumer would be).
///
/// ```
/// # #[tokio::main] async fn main() {
/// let hub = invalbus::InProcessHub::new();
/// let bus = invalbus::Bus::builder().in_process(&hub).namespace("demo").node_id("a").build().await.unwrap();
/// assert_eq!(bus.node_id(), "a");
/// # }
/// ```
#[derive(Clone)]
pub struct InProcessHub {
    tx: broadcast::Sender<(String, Bytes)>,
}

impl Default for InProcessHub {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcessHub {
    /// A hub whose subscribers may fall up to 65,536 messages behind.
    pub fn new() -> Self {
        InProcessHub {
            tx: broadcast::channel(65_536).0,
        }
    }
}

impl std::fmt::Debug for InProcessHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessHub")
            .field("subscribers", &self.tx.receiver_count())
            .finish()
    }
}

/// How a bus reaches its peers.
#[derive(Clone)]
pub(crate) enum Link {
    Nats(async_nats::Client),
    InProcess(InProcessHub),
}

/// Why a publish failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The transport refused or failed the publish.
    #[error("publish failed: {0}")]
    Transport(String),
    /// The publish did not complete within its deadline; the message may still arrive.
    #[error("publish timed out after {0:?}; the invalidation may still be delivered")]
    TimedOut(Duration),
    /// The bus was shut down before the invalidation was published.
    #[error("the bus is shut down")]
    Closed,
}

impl Link {
    pub async fn publish(&self, subject: String, payload: Bytes) -> Result<(), PublishError> {
        match self {
            Link::Nats(client) => client
                .publish(subject, payload)
                .await
                .map_err(|e| PublishError::Transport(e.to_string())),
            Link::InProcess(hub) => {
                // No receivers is not an error: nobody else is on the bus.
                let _ = hub.tx.send((subject, payload));
                Ok(())
            }
        }
    }

    /// Subscribes to `subject` (a `prefix.*.*` pattern) and yields messages and link events.
    pub async fn subscribe(
        &self,
        subject: String,
        capacity: usize,
    ) -> Result<BoxStream<'static, Result<Received, LinkEvent>>, String> {
        match self {
            Link::Nats(client) => {
                let sub = client.subscribe(subject).await.map_err(|e| e.to_string())?;
                let _ = capacity;
                Ok(sub
                    .map(|m| {
                        Ok(Received {
                            subject: m.subject.to_string(),
                            payload: m.payload,
                        })
                    })
                    .boxed())
            }
            Link::InProcess(hub) => {
                let prefix = subject.trim_end_matches("*.*").to_owned();
                let rx = hub.tx.subscribe();
                let stream = futures::stream::unfold(rx, move |mut rx| {
                    let prefix = prefix.clone();
                    async move {
                        loop {
                            match rx.recv().await {
                                Ok((subject, payload)) if subject.starts_with(&prefix) => {
                                    return Some((Ok(Received { subject, payload }), rx));
                                }
                                Ok(_) => continue,
                                Err(broadcast::error::RecvError::Lagged(_)) => {
                                    return Some((Err(LinkEvent::SlowConsumer), rx))
                                }
                                Err(broadcast::error::RecvError::Closed) => return None,
                            }
                        }
                    }
                });
                Ok(stream.boxed())
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Link::Nats(_) => "nats",
            Link::InProcess(_) => "in-process",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_parse() {
        let s = Subjects::new("ns");
        assert_eq!(s.parse(&s.inv("node-1")), Some(("inv", "node-1")));
        assert_eq!(s.parse(&s.hb("n")), Some(("hb", "n")));
        assert_eq!(s.parse("invalbus.other.inv.n"), None);
    }
}
