//! The JetStream side of a bus: the streams (created once, changed only by a node that manages
//! them), the follower that reads the batch stream in order, and the check of what the stream
//! still holds.
//!
//! The batch stream `INVALBUS_<ns>` keeps every batch (`invalbus.<ns>.inv.*`) and the recent
//! heartbeats of each node (`invalbus.<ns>.hb.*`). Heartbeats are in it because they are the
//! bus's evidence: a node's own heartbeat, delivered back by the stream in stream order, proves
//! that the node has seen every batch the stream stored before it (see `receiver`).
//!
//! The stream refuses `Nats-Rollup` headers: a rollup is allowed on every subject of a stream or
//! on none, and one `Nats-Rollup: all` from any client that may publish a heartbeat would erase
//! every stored batch. Old heartbeats are removed instead by the nodes that manage the stream
//! ([`trim_heartbeats`]), which delete each node's superseded ones: a JetStream API call that
//! the deployment's permissions grant to nodes only.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::config::JetStreamConfig;
use crate::transport::Subjects;

/// The stream that keeps every batch of a namespace (and its nodes' latest heartbeats).
pub(crate) fn stream_name(namespace: &str) -> String {
    format!("INVALBUS_{namespace}")
}

/// Who may change a stream that exists with other settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ownership {
    /// Create it if it is missing; never change it (service replicas).
    CreateOnly,
    /// Create it, and bring an existing one to these settings (nodes).
    Manage,
}

/// Why the streams could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SetupError {
    /// JetStream did not answer or is not ready (starting, electing a leader, a server down):
    /// retrying may help.
    #[error("JetStream not ready: {0}")]
    Unavailable(String),
    /// The stream exists with settings this bus cannot work with, or the server refused the
    /// request as invalid: retrying will not help.
    #[error("{0}")]
    Config(String),
}

fn classify(what: &str, err: impl std::fmt::Display, code: Option<u64>) -> SetupError {
    use jetstream::ErrorCode;
    let text = format!("{what}: {err}");
    match code.map(ErrorCode) {
        Some(
            ErrorCode::STREAM_SUBJECT_OVERLAP
            | ErrorCode::BAD_REQUEST
            | ErrorCode::INVALID_JSON
            | ErrorCode::STREAM_MISMATCH
            | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT,
        ) => SetupError::Config(text),
        // 10058: a stream of that name exists with another configuration.
        Some(ErrorCode(10058)) => SetupError::Config(text),
        _ => SetupError::Unavailable(text),
    }
}

/// The JetStream API error code carried by an error, if it carries one.
trait ApiCode {
    fn api_code(&self) -> Option<u64>;
}

impl ApiCode for jetstream::context::GetStreamError {
    fn api_code(&self) -> Option<u64> {
        match self.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(e) => Some(e.error_code().0),
            _ => None,
        }
    }
}

impl ApiCode for jetstream::context::CreateStreamError {
    fn api_code(&self) -> Option<u64> {
        match self.kind() {
            jetstream::context::CreateStreamErrorKind::JetStream(e) => Some(e.error_code().0),
            _ => None,
        }
    }
}

impl ApiCode for stream::ConsumerError {
    fn api_code(&self) -> Option<u64> {
        match self.kind() {
            stream::ConsumerErrorKind::JetStream(e) => Some(e.error_code().0),
            _ => None,
        }
    }
}

impl ApiCode for stream::InfoError {
    fn api_code(&self) -> Option<u64> {
        None
    }
}

fn api_code<E: ApiCode>(e: &E) -> Option<u64> {
    e.api_code()
}

/// What one stream must hold and keep.
pub(crate) struct StreamSpec<'a> {
    pub name: String,
    pub subjects: Vec<String>,
    /// Whether messages may roll up their subject (`Nats-Rollup`). The batch stream refuses them
    /// (see the module docs); a stream that allows them is brought to refuse them by a node.
    pub rollup: bool,
    pub config: &'a JetStreamConfig,
}

impl StreamSpec<'_> {
    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: self.subjects.clone(),
            max_age: self.config.max_age,
            max_bytes: self.config.max_bytes,
            num_replicas: self.config.replicas,
            // The server refuses a duplicate window longer than the stream's max age.
            duplicate_window: Duration::from_secs(120).min(self.config.max_age),
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::Old,
            allow_rollup: self.rollup,
            ..Default::default()
        }
    }
}

/// Creates the stream, or checks (and, for a [`Ownership::Manage`] caller, updates) an existing
/// one. A service replica never changes a stream: one whose retention differs is kept as it is
/// (the node that manages it is the one source of truth), and one that lacks what the bus needs
/// is a configuration error that says what to do.
pub(crate) async fn ensure(
    js: &jetstream::Context,
    spec: &StreamSpec<'_>,
    ownership: Ownership,
) -> Result<stream::Stream, SetupError> {
    let want = spec.config();
    let mut existing = match js.get_stream(&want.name).await {
        Ok(s) => s,
        Err(e) => {
            let code = api_code(&e);
            if code != Some(jetstream::ErrorCode::STREAM_NOT_FOUND.0) {
                return Err(classify(&format!("stream {}", want.name), &e, code));
            }
            tracing::info!(stream = %want.name, subjects = ?want.subjects, max_age_s = want.max_age.as_secs(), replicas = want.num_replicas, "creating the stream");
            return match js.create_stream(want.clone()).await {
                Ok(s) => Ok(s),
                // Another node created it meanwhile: check that one.
                Err(e) if api_code(&e) == Some(10058) => js
                    .get_stream(&want.name)
                    .await
                    .map_err(|e| classify(&format!("stream {}", want.name), &e, api_code(&e))),
                Err(e) => Err(classify(&format!("create stream {}", want.name), &e, api_code(&e))),
            };
        }
    };
    let have = existing
        .info()
        .await
        .map_err(|e| classify(&format!("stream {}", want.name), &e, api_code(&e)))?
        .config
        .clone();
    let missing: Vec<&String> = want.subjects.iter().filter(|s| !have.subjects.contains(s)).collect();
    let lacks_rollup = want.allow_rollup && !have.allow_rollup;
    // A stream made by an older invalbus allows rollups, which lets any publisher erase it.
    let allows_rollup = !want.allow_rollup && have.allow_rollup;
    let retention_differs =
        have.max_age != want.max_age || have.max_bytes != want.max_bytes || have.num_replicas != want.num_replicas;
    match ownership {
        Ownership::CreateOnly => {
            if !missing.is_empty() || lacks_rollup {
                return Err(SetupError::Config(format!(
                    "stream {} exists without {}{}{}: it was made by an older invalbus or by hand; let an \
                     invalbus node (which manages the streams) start once, or edit the stream",
                    want.name,
                    if missing.is_empty() {
                        String::new()
                    } else {
                        format!("the subjects {missing:?}")
                    },
                    if !missing.is_empty() && lacks_rollup {
                        " and "
                    } else {
                        ""
                    },
                    if lacks_rollup { "allow_rollup_hdrs" } else { "" },
                )));
            }
            if retention_differs {
                tracing::info!(stream = %want.name, max_age_s = have.max_age.as_secs(), max_bytes = have.max_bytes, replicas = have.num_replicas,
                    "the stream exists with other retention settings; keeping them (the node that manages the stream decides)");
            }
            if allows_rollup {
                tracing::warn!(stream = %want.name,
                    "the stream allows Nats-Rollup headers (made by an older invalbus): any client that may publish on it can erase its batches until an invalbus node (which manages the streams) starts and turns them off");
            }
            Ok(existing)
        }
        Ownership::Manage => {
            if missing.is_empty() && !lacks_rollup && !allows_rollup && !retention_differs {
                return Ok(existing);
            }
            let mut update = have.clone();
            update.subjects.extend(missing.into_iter().cloned());
            update.allow_rollup = want.allow_rollup;
            update.max_age = want.max_age;
            update.max_bytes = want.max_bytes;
            update.num_replicas = want.num_replicas;
            update.duplicate_window = want.duplicate_window;
            tracing::warn!(stream = %want.name, from_max_age_s = have.max_age.as_secs(), to_max_age_s = want.max_age.as_secs(),
                from_replicas = have.num_replicas, to_replicas = want.num_replicas, subjects = ?update.subjects,
                "updating the stream to this node's settings");
            js.update_stream(update)
                .await
                .map_err(|e| classify(&format!("update stream {}", want.name), &e, api_code(&e)))?;
            js.get_stream(&want.name)
                .await
                .map_err(|e| classify(&format!("stream {}", want.name), &e, api_code(&e)))
        }
    }
}

/// How many heartbeat intervals pass between two trims of the stream's heartbeats.
pub(crate) const TRIM_EVERY_BEATS: u32 = 30;

/// How many deletions a trim keeps in flight at once.
const TRIM_CONCURRENCY: usize = 16;

/// The batch stream's heartbeats that a newer message on the same heartbeat subject has
/// superseded, by stream sequence, as the follower read them: what the next trim deletes.
///
/// Bounded: past [`Superseded::MAX_SUBJECTS`] subjects the table starts over, and past
/// [`Superseded::MAX_OLD`] sequences the newest are not recorded; what is not deleted is
/// removed by the stream's retention.
#[derive(Debug, Default)]
pub(crate) struct Superseded {
    /// Heartbeat subject's origin → stream sequence of its latest message.
    latest: std::collections::HashMap<String, u64>,
    /// Superseded sequences, not deleted yet.
    old: Vec<u64>,
}

impl Superseded {
    const MAX_SUBJECTS: usize = 16_384;
    const MAX_OLD: usize = 262_144;

    /// The follower read a message on `origin`'s heartbeat subject at `seq`.
    pub fn heartbeat(&mut self, origin: &str, seq: u64) {
        if self.latest.len() >= Self::MAX_SUBJECTS && !self.latest.contains_key(origin) {
            self.latest.clear();
        }
        // In any order: the backlog pass may record older ones after the follower's newer.
        let old = match self.latest.get_mut(origin) {
            Some(latest) if *latest < seq => Some(std::mem::replace(latest, seq)),
            Some(latest) if *latest > seq => Some(seq),
            Some(_) => None,
            None => {
                self.latest.insert(origin.to_owned(), seq);
                None
            }
        };
        if let Some(old) = old {
            if self.old.len() < Self::MAX_OLD {
                self.old.push(old);
            }
        }
    }

    /// The superseded sequences recorded since the last call.
    pub fn take(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.old)
    }
}

/// Deletes superseded heartbeats from the batch stream every `every`, so that the stream keeps
/// about one per node rather than one per node and interval. Run by the nodes that manage the
/// stream; several doing it at once is harmless (a message already deleted is not an error).
/// Until one runs, heartbeats pile up to the stream's retention; when it starts, it reads those
/// stored before it followed the stream too ([`backlog`]).
///
/// The heartbeats are deleted one by one (`$JS.API.STREAM.MSG.DELETE`), not with a purge
/// filtered to their subjects: nats-server before 2.10.11 moves every consumer of the stream
/// on a filtered purge, even one whose filter is wider (nats-server#3838, #5075), which stalled
/// or skipped other nodes' followers (checked against 2.9.10). Deleting single messages leaves
/// the consumers where they are. The holes the deletions leave hold no batch, and the
/// follower's check of what its consumer skipped tells them apart from skipped batches.
pub(crate) async fn trim_heartbeats(
    superseded: Arc<Mutex<Superseded>>,
    subjects: Subjects,
    stream: stream::Stream,
    followed_from: u64,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    tokio::select! {
        read = backlog(&superseded, &subjects, &stream, followed_from) => match read {
            Ok(n) => tracing::debug!(heartbeats = n, "heartbeats stored before this node followed the stream recorded"),
            Err(e) => tracing::warn!(error = %e, "cannot read the heartbeats stored before this node followed the stream; they are left to retention"),
        },
        _ = shutdown.wait_for(|s| *s) => return,
    }
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let seqs = superseded.lock().unwrap_or_else(|e| e.into_inner()).take();
        match trim_once(&stream, seqs).await {
            Ok(deleted) => {
                if failing {
                    tracing::info!(stream = %stream.cached_info().config.name, "trimming heartbeats works again");
                }
                failing = false;
                tracing::debug!(deleted, "superseded heartbeats deleted from the stream");
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(stream = %stream.cached_info().config.name, error = %e,
                    "cannot delete superseded heartbeats from the stream (does this node's NATS user lack $JS.API.STREAM.MSG.DELETE on it?); they pile up until retention removes them");
            }
            Err(e) => tracing::debug!(error = %e, "heartbeat trim failed again"),
        }
    }
}

/// Most heartbeats the backlog pass reads (what lies beyond is left to the stream's retention).
const BACKLOG_MAX: usize = 262_144;

/// Records the heartbeats the stream stored before this node's follower started (below
/// `until`): left there while no managing node was following the stream (before this one
/// started, or while it restarted). The trims then delete the superseded ones among them too.
/// Returns how many were read.
async fn backlog(
    superseded: &Mutex<Superseded>,
    subjects: &Subjects,
    stream: &stream::Stream,
    until: u64,
) -> Result<usize, String> {
    use futures::StreamExt as _;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subjects.all_hb(),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            max_expires: BACKLOG_PULL_EXPIRY,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("create the backlog reader: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("start the backlog reader: {e}"))?;
    let mut read = 0;
    while read < BACKLOG_MAX {
        // Nothing within a few pull expiries: the backlog is read (or the server went away).
        let next = tokio::time::timeout(BACKLOG_PULL_EXPIRY * 3, messages.next()).await;
        let Ok(Some(Ok(msg))) = next else {
            break;
        };
        let Ok(info) = msg.info() else {
            break;
        };
        if info.stream_sequence >= until {
            break;
        }
        if let Some(("hb", origin)) = subjects.parse(msg.subject.as_str()) {
            superseded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .heartbeat(origin, info.stream_sequence);
        }
        read += 1;
        if info.pending == 0 {
            break;
        }
    }
    Ok(read)
}

/// Deletes the messages at `seqs` (heartbeats); returns how many were deleted. One already gone
/// (deleted by another node, or past retention) is skipped; the first other error ends the
/// trim (the rest are left to retention).
async fn trim_once(stream: &stream::Stream, seqs: Vec<u64>) -> Result<u64, String> {
    use futures::StreamExt as _;
    let mut deletions = futures::stream::iter(seqs)
        .map(|seq| async move { (seq, stream.delete_message(seq).await) })
        .buffer_unordered(TRIM_CONCURRENCY);
    let mut deleted = 0;
    while let Some((seq, outcome)) = deletions.next().await {
        match outcome {
            Ok(_) => deleted += 1,
            Err(e)
                if matches!(e.kind(), stream::DeleteMessageErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND) => {}
            Err(e) => return Err(format!("delete #{seq}: {e}")),
        }
    }
    Ok(deleted)
}

/// Retries `ensure` on [`SetupError::Unavailable`] with backoff until `deadline`.
pub(crate) async fn ensure_patiently(
    js: &jetstream::Context,
    spec: &StreamSpec<'_>,
    ownership: Ownership,
    deadline: tokio::time::Instant,
) -> Result<stream::Stream, SetupError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match ensure(js, spec, ownership).await {
            Ok(s) => return Ok(s),
            Err(SetupError::Unavailable(why)) if tokio::time::Instant::now() + backoff < deadline => {
                tracing::warn!(stream = %spec.name, error = %why, retry_in_ms = backoff.as_millis() as u64, "JetStream not ready; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long one pull request of the follower waits.
///
/// Not what recovers a follower whose server went away: the receiver restarts a follower that
/// delivers nothing while this node's heartbeat is overdue (`receiver::FollowerWatch`), within
/// half of `max_staleness`. Long rather than short because each expiry is a chance for the race
/// that watch covers (nats-server before 2.10 drops a pull request that expires as a message
/// arrives, without telling the client); 10 s makes that rare, and a pull request a second
/// (the old setting) made it a matter of a minute or so per node.
const FOLLOWER_PULL_EXPIRY: Duration = Duration::from_secs(10);

/// How long one pull request of the start-up backlog reader waits; it stops after three
/// without a message.
const BACKLOG_PULL_EXPIRY: Duration = Duration::from_secs(1);

/// How long the follower waits before trying again to (re)create its consumer.
const FOLLOWER_RETRY: Duration = Duration::from_millis(250);

/// The batch stream read in order from where this node started following it.
///
/// It rides on an ordered consumer, which recreates itself after lost messages and restarts,
/// but which was seen here to skip hundreds of stored batches after a connection reset (it
/// resumed at the tip of the stream). So the follower does not take its word for it: every
/// sequence it skips is checked with the stream's leader ([`Follower::check_hole`]), and a
/// skipped batch makes it read again from the hole.
pub(crate) struct Follower {
    stream: stream::Stream,
    messages: Option<jetstream::consumer::pull::Ordered>,
    /// The stream sequence the next message must have (anything below is behind us).
    pub next: u64,
    /// Every batch subject of the namespace.
    batches: String,
    /// When to try again to create the consumer, after a failure.
    retry_at: Option<tokio::time::Instant>,
}

/// What a hole in the follower's sequence was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hole {
    /// Only heartbeats were there (trimmed since): nothing to apply.
    Harmless,
    /// The stream no longer holds its start (retention passed, or the stream was purged):
    /// what was there is lost; it starts at `first`.
    Clipped { first: u64 },
    /// A batch is there that the consumer skipped: read again from the hole.
    Skipped { batch: u64 },
    /// The leader could not be asked.
    Unknown(String),
}

impl Follower {
    /// Starts following `stream` from the next message it stores.
    pub async fn start(stream: &stream::Stream, batches: String) -> Result<Follower, SetupError> {
        let last = stream
            .get_info()
            .await
            .map_err(|e| classify("stream info", &e, api_code(&e)))?
            .state
            .last_sequence;
        let mut f = Follower {
            stream: stream.clone(),
            messages: None,
            next: last.saturating_add(1),
            batches,
            retry_at: None,
        };
        f.messages = Some(consumer(f.stream.clone(), f.next).await?);
        Ok(f)
    }
}

/// An ordered consumer of `stream` from `from`.
async fn consumer(stream: stream::Stream, from: u64) -> Result<jetstream::consumer::pull::Ordered, SetupError> {
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: from },
            max_expires: FOLLOWER_PULL_EXPIRY,
            ..Default::default()
        })
        .await
        .map_err(|e| classify("create the stream follower", &e, api_code(&e)))?;
    consumer
        .messages()
        .await
        .map_err(|e| SetupError::Unavailable(format!("start the stream follower: {e}")))
}

impl Follower {
    /// The next message the consumer delivers (pending while the consumer is being recreated).
    pub async fn recv(&mut self) -> Option<Result<jetstream::Message, jetstream::consumer::pull::OrderedError>> {
        loop {
            if let Some(m) = self.messages.as_mut() {
                return futures::StreamExt::next(m).await;
            }
            if let Some(at) = self.retry_at {
                tokio::time::sleep_until(at).await;
            }
            match consumer(self.stream.clone(), self.next).await {
                Ok(m) => {
                    self.messages = Some(m);
                    self.retry_at = None;
                }
                Err(e) => {
                    tracing::debug!(error = %e, from = self.next, "cannot recreate the stream follower yet");
                    self.retry_at = Some(tokio::time::Instant::now() + FOLLOWER_RETRY);
                }
            }
        }
    }

    /// Whether a consumer is in place (false while it is being recreated).
    pub fn is_following(&self) -> bool {
        self.messages.is_some()
    }

    /// Drops the consumer and reads again from `self.next` at once (the consumer went quiet).
    pub fn restart(&mut self) {
        self.messages = None;
        self.retry_at = None;
    }

    /// Drops the consumer and reads again from `self.next` (after a short pause).
    pub fn reread(&mut self) {
        self.messages = None;
        self.retry_at = Some(tokio::time::Instant::now() + FOLLOWER_RETRY);
    }

    /// Asks the stream's leader what lay in `from..to`, which the consumer skipped.
    pub fn check_hole(
        &self,
        from: u64,
        to: u64,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Hole> + Send + 'static {
        check_hole(self.stream.clone(), self.batches.clone(), from, to, timeout)
    }
}

async fn check_hole(stream: stream::Stream, batches: String, from: u64, to: u64, timeout: Duration) -> Hole {
    {
        let first = match tokio::time::timeout(timeout, stream.get_info()).await {
            Ok(Ok(info)) => info.state.first_sequence,
            Ok(Err(e)) => return Hole::Unknown(e.to_string()),
            Err(_) => return Hole::Unknown(format!("no answer within {timeout:?}")),
        };
        if first > from {
            return Hole::Clipped { first };
        }
        let next_batch = tokio::time::timeout(timeout, stream.get_first_raw_message_by_subject(&batches, from)).await;
        match next_batch {
            Ok(Ok(m)) if m.sequence < to => Hole::Skipped { batch: m.sequence },
            Ok(Ok(_)) => Hole::Harmless,
            Ok(Err(e)) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Hole::Harmless,
            Ok(Err(e)) => Hole::Unknown(e.to_string()),
            Err(_) => Hole::Unknown(format!("no answer within {timeout:?}")),
        }
    }
}
