//! The client subcommands: `purge`, `nodes`, `stats` and `audit`, talking to a node's admin API,
//! printing readable tables or (`--json`) one JSON document per result.

use std::path::PathBuf;

use futures::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::pb::admin::admin_client::AdminClient;
use crate::pb::admin::*;

/// Where the node is and who we are.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Admin address of a node.
    #[arg(long, env = "INVALBUS_ADDR", default_value = "http://127.0.0.1:7700")]
    pub addr: String,
    /// Bearer token.
    #[arg(long, env = "INVALBUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate to verify a node that serves TLS (use an https:// address).
    #[arg(long, env = "INVALBUS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `invalbus-node purge`.
#[derive(clap::Args, Debug, Clone)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Key to purge (repeatable).
    #[arg(long = "key")]
    pub keys: Vec<String>,
    /// Tag to purge (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Key prefix to purge (repeatable).
    #[arg(long = "prefix")]
    pub prefixes: Vec<String>,
    /// Purge everything.
    #[arg(long)]
    pub all: bool,
    /// Only this cache (default: every cache).
    #[arg(long)]
    pub cache: Option<String>,
    /// Why (required; recorded in the audit log).
    #[arg(long)]
    pub reason: String,
    /// Wait for the receipts of the nodes that apply it.
    #[arg(long)]
    pub wait: bool,
    /// How long to wait for receipts, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub wait_timeout_ms: u32,
}

/// `invalbus-node health`.
#[derive(clap::Args, Debug, Clone)]
pub struct HealthArgs {
    /// gRPC address of a node.
    #[arg(long, env = "INVALBUS_ADDR", default_value = "http://127.0.0.1:7700")]
    pub addr: String,
    /// Service to ask about (default: the whole node).
    #[arg(long, default_value = "")]
    pub service: String,
    /// CA certificate to verify a node that serves TLS (use an https:// address).
    #[arg(long, env = "INVALBUS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
}

/// `invalbus-node audit`.
#[derive(clap::Args, Debug, Clone)]
pub struct AuditArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Invalidations that covered this key (the key, a prefix of it, everything).
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub tag: Option<String>,
    #[arg(long)]
    pub prefix: Option<String>,
    #[arg(long)]
    pub actor: Option<String>,
    /// Node that published.
    #[arg(long)]
    pub origin: Option<String>,
    #[arg(long)]
    pub purge_id: Option<String>,
    #[arg(long)]
    pub cache: Option<String>,
    /// Since: `30s`, `10m`, `2h`, `1d` ago, or µs since the Unix epoch.
    #[arg(long)]
    pub since: Option<String>,
    /// Until: same forms as --since.
    #[arg(long)]
    pub until: Option<String>,
    /// Records per page.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Continue from a previous page.
    #[arg(long)]
    pub page_token: Option<String>,
    /// Keep printing new records and receipts as they arrive.
    #[arg(long)]
    pub follow: bool,
}

type Error = Box<dyn std::error::Error + Send + Sync>;
/// Adds the bearer token to every call.
type Interceptor = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;
/// An admin client with its token.
pub type Client = AdminClient<tonic::service::interceptor::InterceptedService<Channel, Interceptor>>;

/// Connects to the node at `args.addr` with the token.
pub async fn connect(args: &ClientArgs) -> Result<Client, Error> {
    let mut endpoint = Channel::from_shared(args.addr.clone()).map_err(|e| format!("--addr {}: {e}", args.addr))?;
    if let Some(ca) = &args.tls_ca {
        let pem = std::fs::read(ca).map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
        endpoint = endpoint.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach {}: {e}", args.addr))?;
    let token: Option<MetadataValue<_>> = match &args.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| "--token: not a valid header value")?,
        ),
        None => None,
    };
    let interceptor: Interceptor = Box::new(move |mut req: tonic::Request<()>| {
        if let Some(t) = &token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    });
    Ok(AdminClient::with_interceptor(channel, interceptor))
}

fn status(e: tonic::Status) -> Error {
    format!("{:?}: {}", e.code(), e.message()).into()
}

/// Runs `health`: asks the node's `grpc.health.v1` service, prints its status, and fails
/// unless it is `SERVING`. Container health checks use it, so the image needs no other tool.
pub async fn health(a: HealthArgs) -> Result<(), Error> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let check = async {
        let mut endpoint = Channel::from_shared(a.addr.clone()).map_err(|e| format!("--addr {}: {e}", a.addr))?;
        if let Some(ca) = &a.tls_ca {
            let pem = std::fs::read(ca).map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
            endpoint = endpoint.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot reach {}: {e}", a.addr))?;
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: a.service.clone(),
            })
            .await
            .map_err(status)?
            .into_inner();
        Ok::<_, Error>(r.status())
    };
    let timeout = std::time::Duration::from_millis(a.timeout_ms);
    let s = tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| format!("{}: no answer within {timeout:?}", a.addr))??;
    println!("{}", s.as_str_name());
    if s == ServingStatus::Serving {
        Ok(())
    } else {
        Err(format!("{} is {}", a.addr, s.as_str_name()).into())
    }
}

/// Runs `purge`.
pub async fn purge(a: PurgeArgs) -> Result<(), Error> {
    let mut c = connect(&a.client).await?;
    let r = c
        .purge(PurgeRequest {
            keys: a.keys,
            tags: a.tags,
            prefixes: a.prefixes,
            all: a.all,
            cache: a.cache.unwrap_or_default(),
            reason: a.reason,
            wait: a.wait,
            wait_timeout_ms: a.wait_timeout_ms,
        })
        .await
        .map_err(status)?
        .into_inner();
    if a.client.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "purge {} accepted by {} ({} invalidation{})",
        r.purge_id,
        r.origin,
        r.invalidations,
        if r.invalidations == 1 { "" } else { "s" }
    );
    if a.wait {
        print_receipts(&r.receipts);
        if r.missing_nodes.is_empty() {
            println!("every live node applied it");
        } else {
            println!("no receipt yet from: {}", r.missing_nodes.join(", "));
        }
    }
    Ok(())
}

fn print_receipts(receipts: &[Receipt]) {
    let rows: Vec<Vec<String>> = receipts
        .iter()
        .map(|r| {
            vec![r.node.clone(), format!("{}#{}", r.origin, r.seq)]
                .into_iter()
                .chain(receipt_cells(r))
                .collect()
        })
        .collect();
    print!("{}", table(&["NODE", "BATCH", "APPLIED", "AFTER", "DROPPED"], &rows));
}

/// Runs `nodes`.
pub async fn nodes(a: ClientArgs) -> Result<(), Error> {
    let mut c = connect(&a).await?;
    // Every page, in order.
    let mut r = ListNodesResponse::default();
    let mut token = String::new();
    loop {
        let page = c
            .list_nodes(ListNodesRequest {
                page_size: 0,
                page_token: token,
            })
            .await
            .map_err(status)?
            .into_inner();
        r.nodes.extend(page.nodes);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let now = invalbus::now_us();
    let rows: Vec<Vec<String>> = r
        .nodes
        .iter()
        .map(|n| {
            vec![
                format!("{}{}", n.node_id, if n.is_self { " *" } else { "" }),
                n.address.clone(),
                format!("{:016x}", n.epoch),
                n.last_seq.to_string(),
                n.lag.to_string(),
                n.caches
                    .iter()
                    .map(|c| format!("{}={}", c.name, c.entries))
                    .collect::<Vec<_>>()
                    .join(" "),
                format!("{}s ago", now.saturating_sub(n.last_seen_us) / 1_000_000),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["NODE", "ADDRESS", "EPOCH", "LAST SEQ", "LAG", "CACHES", "SEEN"],
            &rows
        )
    );
    Ok(())
}

/// Runs `stats`.
pub async fn stats(a: ClientArgs) -> Result<(), Error> {
    let mut c = connect(&a).await?;
    let r = c.stats(StatsRequest {}).await.map_err(status)?.into_inner();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let n = r.node.unwrap_or_default();
    let p = n.propagation.unwrap_or_default();
    println!(
        "node {}  serving={}  purges={}  refused calls={}",
        n.node_id, n.serving, n.purges, n.refused_calls
    );
    println!(
        "published: {} batches, {} invalidations ({} errors)   applied: {} batches, {} invalidations",
        n.batches_published, n.invalidations_published, n.publish_errors, n.batches_received, n.invalidations_received
    );
    println!(
        "gaps {}  replayed {}  repairs {}  repair flushes {}  duplicates {}  refused messages {}  receipts {} ({} failed)",
        n.gaps,
        n.replayed,
        n.repairs,
        n.repair_flushes,
        n.duplicates,
        n.refused_messages,
        n.receipts_published,
        n.receipts_failed
    );
    println!(
        "refused: {} unsigned, {} untrusted, {} beyond their scopes   contested (applied only) {}   peers {} ({} refused, table full)   duplicate node ids {}   stream erasures {}",
        n.refused_unsigned,
        n.refused_untrusted,
        n.refused_unauthorized,
        n.contested_batches,
        n.peers,
        n.peers_refused,
        n.duplicate_node_ids,
        n.stream_erasures
    );
    println!(
        "propagation: n={} p50={} p99={} p99.9={} max={}",
        p.count,
        ms(p.p50_us),
        ms(p.p99_us),
        ms(p.p999_us),
        ms(p.max_us)
    );
    let rows: Vec<Vec<String>> = r
        .caches
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.entries.to_string(),
                c.hits.to_string(),
                c.misses.to_string(),
                format!("{:.1}%", c.hit_ratio * 100.0),
                c.invalidations_applied.to_string(),
                c.rejected_fills.to_string(),
                c.flushes.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "CACHE",
                "ENTRIES",
                "HITS",
                "MISSES",
                "HIT RATIO",
                "INVALIDATED",
                "REJECTED FILLS",
                "FLUSHES"
            ],
            &rows
        )
    );
    Ok(())
}

/// Parses `30s`, `10m`, `2h`, `1d` (ago) or µs since the Unix epoch.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if let Ok(us) = s.parse::<u64>() {
        return Ok(us);
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: use 30s, 10m, 2h, 1d (ago) or microseconds since the Unix epoch"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    Ok(invalbus::now_us().saturating_sub(secs * 1_000_000))
}

/// Runs `audit`.
pub async fn audit(a: AuditArgs) -> Result<(), Error> {
    let filter = AuditFilter {
        key: a.key.unwrap_or_default(),
        tag: a.tag.unwrap_or_default(),
        prefix: a.prefix.unwrap_or_default(),
        actor: a.actor.unwrap_or_default(),
        origin: a.origin.unwrap_or_default(),
        purge_id: a.purge_id.unwrap_or_default(),
        cache: a.cache.unwrap_or_default(),
        since_us: a.since.as_deref().map(parse_time).transpose()?.unwrap_or(0),
        until_us: a.until.as_deref().map(parse_time).transpose()?.unwrap_or(0),
    };
    let mut c = connect(&a.client).await?;
    if a.follow {
        let mut stream = c
            .watch_audit(WatchAuditRequest { filter: Some(filter) })
            .await
            .map_err(status)?
            .into_inner();
        while let Some(ev) = stream.next().await {
            let ev = ev.map_err(status)?;
            if a.client.json {
                println!("{}", serde_json::to_string(&ev)?);
                continue;
            }
            match ev.event {
                Some(audit_event::Event::Record(r)) => print_record(&r, false),
                Some(audit_event::Event::Receipt(r)) => println!(
                    "  receipt {:<16} {}#{}  applied {}  dropped {}{}",
                    r.node,
                    r.origin,
                    r.seq,
                    time(r.applied_us),
                    r.dropped,
                    if r.flushed { " (flushed)" } else { "" }
                ),
                None => {}
            }
        }
        return Ok(());
    }
    let r = c
        .query_audit(QueryAuditRequest {
            filter: Some(filter),
            page_size: a.limit,
            page_token: a.page_token.unwrap_or_default(),
        })
        .await
        .map_err(status)?
        .into_inner();
    if a.client.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    if r.records.is_empty() {
        println!("no matching records");
    }
    for rec in &r.records {
        print_record(rec, true);
    }
    if !r.next_page_token.is_empty() {
        println!("more: --page-token {}", r.next_page_token);
    }
    Ok(())
}

fn print_record(r: &AuditRecord, receipts: bool) {
    println!(
        "{}  {}#{} (epoch {:016x})  {} of {} invalidation(s)  {}",
        time(r.published_us),
        r.origin,
        r.seq,
        r.epoch,
        r.invalidations.len(),
        r.batch_size,
        signature(&r.signer, r.verified, &r.unverified)
    );
    for i in &r.invalidations {
        println!(
            "  {} {}{}  cache={}  actor={}  reason={:?}{}",
            i.kind,
            i.target,
            i.version.map(|v| format!(" v{v}")).unwrap_or_default(),
            if i.cache.is_empty() { "*" } else { &i.cache },
            i.actor,
            i.reason,
            if i.purge_id.is_empty() {
                String::new()
            } else {
                format!("  purge={}", i.purge_id)
            }
        );
    }
    if receipts {
        let rows: Vec<Vec<String>> = r
            .receipts
            .iter()
            .map(|c| {
                vec![format!("  {}", c.node)]
                    .into_iter()
                    .chain(receipt_cells(c))
                    .collect()
            })
            .collect();
        print!("{}", table(&["  NODE", "APPLIED", "AFTER", "DROPPED"], &rows));
    }
}

/// Who signed a record or receipt, as the audit prints it.
fn signature(signer: &str, verified: bool, why: &str) -> String {
    let short: String = signer.chars().take(12).collect();
    if verified {
        format!("signed {short}…")
    } else {
        format!("UNVERIFIED ({why}; signer {short}…)")
    }
}

/// The APPLIED, AFTER and DROPPED cells of a receipt, as both receipt tables show them.
fn receipt_cells(r: &Receipt) -> [String; 3] {
    let after = if r.local {
        "origin".into()
    } else {
        ms(r.applied_us.saturating_sub(r.published_us))
    };
    let mut dropped = if r.flushed {
        "flushed".into()
    } else {
        r.dropped.to_string()
    };
    if !r.verified {
        dropped = format!("{dropped}  UNVERIFIED ({})", r.unverified);
    }
    [time(r.applied_us), after, dropped]
}

/// Left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn ms(us: u64) -> String {
    if us < 10_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{}ms", us / 1000)
    }
}

/// `YYYY-MM-DD HH:MM:SS.mmm` UTC.
pub fn time(us: u64) -> String {
    if us == 0 {
        return "-".into();
    }
    let secs = (us / 1_000_000) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        (us / 1000) % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_tables_read_well() {
        assert_eq!(time(1_700_000_000_123_000), "2023-11-14 22:13:20.123");
        assert!(parse_time("10m").unwrap() < invalbus::now_us());
        assert!(parse_time("10x").is_err());
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
