//! The soak's report: its verdicts, its CSV and its plot.

use super::*;

pub(super) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Prints the verdict rows; returns whether every hard one held.
pub(super) fn verdicts(
    samples: &[Sample],
    counts: &Counts,
    rolled: &[Rolled],
    elapsed: Duration,
    warmup: Duration,
    purge_cap: usize,
    broken: &mut Vec<String>,
) -> bool {
    println!(
        "{:<58} {:>14} {:>14} {:<8} {:>7}  {:<36} met",
        "figure", "invalbus", "raw", "unit", "ratio", "goal"
    );
    let secs = elapsed.as_secs_f64();
    let sent = counts.sent.load(Ordering::Relaxed);
    let achieved = sent as f64 / secs;
    row(
        "soak: invalidations/s achieved (raw = target)",
        achieved,
        RATE as f64,
        "inv/s",
        RATE as f64 / achieved,
        ">= 95 % of target (report)",
        Some(achieved >= 0.95 * RATE as f64),
    );
    row(
        "soak: reads/s, 3 nodes together",
        counts.reads.load(Ordering::Relaxed) as f64 / secs,
        f64::NAN,
        "reads/s",
        f64::NAN,
        "report",
        None,
    );
    let lost = counts.given_up.load(Ordering::Relaxed)
        + counts.queue_full.load(Ordering::Relaxed)
        + counts.refused.load(Ordering::Relaxed);
    row(
        "soak: invalidations given up (backlog, queue full, refused)",
        lost as f64,
        f64::NAN,
        "inv",
        f64::NAN,
        "0 (report)",
        Some(lost == 0),
    );
    let gone = rolled.iter().filter(|r| r.ended.is_some()).count();
    println!(
        "  (mean invalidate call {:.2} us; {} rolling origins started, {} shut down; {} calls to a shut-down origin, {} traced tickets dropped, {} publish errors)",
        counts.call_ns.load(Ordering::Relaxed) as f64 / 1000.0 / sent.max(1) as f64,
        rolled.len(),
        gone,
        counts.closed.load(Ordering::Relaxed),
        counts.untraced.load(Ordering::Relaxed),
        counts.publish_errors.load(Ordering::Relaxed)
    );
    if samples.is_empty() {
        broken.push("no samples taken".into());
        return false;
    }
    let mut ok = true;

    // Tables, at every sample.
    let max_peers = samples.iter().flat_map(|s| s.peers).max().unwrap_or(0);
    let over = samples.iter().any(|s| s.peers.iter().any(|&p| p > s.peer_bound));
    let stale = samples.iter().map(|s| s.stale_peers).max().unwrap_or(0);
    let bound = samples.iter().map(|s| s.peer_bound).max().unwrap_or(0);
    let held = !over && stale == 0;
    row(
        "soak: peer table, max (raw = max live + expiring bound)",
        max_peers as f64,
        bound as f64,
        "peers",
        max_peers as f64 / bound as f64,
        "<= bound, gone ones expire (hard)",
        Some(held),
    );
    if !held {
        broken.push(format!(
            "a peer table exceeded its bound or kept an origin gone for over {} s",
            (PEER_EXPIRY + EXPIRY_SLACK).as_secs()
        ));
        ok = false;
    }
    let max_origins = samples.iter().flat_map(|s| s.origins).max().unwrap_or(0);
    let held = samples
        .iter()
        .all(|s| s.origins.iter().all(|&o| o <= s.peer_bound as u64));
    row(
        "soak: origins tracked, max (raw = max bound)",
        max_origins as f64,
        bound as f64,
        "origins",
        max_origins as f64 / bound as f64,
        "<= peer bound (hard)",
        Some(held),
    );
    if !held {
        broken.push("the origins tracked exceeded the live + expiring bound".into());
        ok = false;
    }
    let (tb, pb) = (tag_bound(purge_cap), prefix_bound(purge_cap));
    // Purge records per cache must stay within the names purged in a record's life (hard).
    for (kind, max, bound) in [
        ("tag", samples.iter().flat_map(|s| s.tag_records).max().unwrap_or(0), tb),
        (
            "prefix",
            samples.iter().flat_map(|s| s.prefix_records).max().unwrap_or(0),
            pb,
        ),
    ] {
        row(
            format!("soak: {kind} purge records per cache, max (raw = bound)"),
            max as f64,
            bound as f64,
            "records",
            max as f64 / bound as f64,
            "<= names purged in 14.5 s (hard)",
            Some(max <= bound),
        );
        if max > bound {
            broken.push(format!("{kind} purge records grew to {max}, past {bound}"));
            ok = false;
        }
    }
    let max_entries = samples.iter().flat_map(|s| s.entries).max().unwrap_or(0);
    row(
        "soak: cache entries per node, max (raw = capacity)",
        max_entries as f64,
        KEYS as f64,
        "entries",
        max_entries as f64 / KEYS as f64,
        "<= capacity (report)",
        Some(max_entries <= KEYS as u64),
    );

    // The rest, after the warm-up.
    let first_after = warmup.as_secs_f64() + SAMPLE_EVERY.as_secs_f64() - 1.0;
    let post: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= first_after).collect();
    let (Some(first), Some(last)) = (post.first(), post.last()) else {
        println!("  (no sample after the warm-up: RSS and p99 not judged)");
        return ok;
    };
    let flushes: u64 = (0..NODES).map(|i| last.flushes[i] - first.flushes[i]).sum();
    row(
        "soak: cache flushes after warm-up, 3 nodes (overflow, repair)",
        flushes as f64,
        f64::NAN,
        "flushes",
        f64::NAN,
        "0 (report)",
        Some(flushes == 0),
    );
    // RSS follows the heap up and down with the load (by 10 % from one sample to the next here,
    // on an allocator that returns memory), so one sample against another measures where in that
    // swing each fell; growth is the peaks climbing: the highest sample of the last third against
    // the highest of the first, as p99 is judged below by thirds.
    let third = (post.len() / 3).max(1);
    let peak = |part: &[&Sample]| part.iter().map(|s| s.rss).max().unwrap_or(0);
    let (early_peak, late_peak) = (peak(&post[..third]), peak(&post[post.len() - third..]));
    let growth = late_peak as f64 / early_peak.max(1) as f64;
    row(
        "soak: RSS, highest of the last third (raw = of the first third)",
        mib(late_peak),
        mib(early_peak),
        "MiB",
        growth,
        "< 1.05 x first third (report)",
        Some(growth < 1.05),
    );
    row(
        "soak: RSS, last sample (raw = first after warm-up)",
        mib(last.rss),
        mib(first.rss),
        "MiB",
        last.rss as f64 / first.rss as f64,
        "report",
        None,
    );
    row(
        "soak: heap in use (jemalloc), last sample (raw = first after warm-up)",
        mib(last.heap),
        mib(first.heap),
        "MiB",
        last.heap as f64 / first.heap as f64,
        "report (RSS less this: what the allocator keeps)",
        None,
    );
    let stuck: Vec<f64> = post.iter().filter(|s| s.traced == 0).map(|s| s.t_s).collect();
    row(
        "soak: windows with no traced invalidation applied on all 3",
        stuck.len() as f64,
        post.len() as f64,
        "windows",
        f64::NAN,
        "0 (hard)",
        Some(stuck.is_empty()),
    );
    if !stuck.is_empty() {
        broken.push(format!(
            "no invalidation seen applied on all nodes in the windows ending at {stuck:?} s"
        ));
        ok = false;
    }
    let traced: u64 = post.iter().map(|s| s.traced).sum();
    let missing: u64 = post.iter().map(|s| s.missing + s.lagged).sum();
    row(
        "soak: traced invalidations not seen applied on all 3 in 30 s",
        missing as f64,
        (traced + missing) as f64,
        "inv",
        missing as f64 / (traced + missing).max(1) as f64,
        "0 (report)",
        Some(missing == 0),
    );
    let p99: Vec<f64> = post
        .iter()
        .filter(|s| s.traced > 0)
        .map(|s| s.p99_us as f64 / 1000.0)
        .collect();
    if !p99.is_empty() {
        let third = (p99.len() / 3).max(1);
        let (early, late) = (median(p99[..third].to_vec()), median(p99[p99.len() - third..].to_vec()));
        row(
            "soak: propagation p99, last third (raw = first third)",
            late,
            early,
            "ms",
            late / early,
            "<= 1.5 x first third (report)",
            Some(late <= 1.5 * early),
        );
    }
    ok
}

pub(super) fn to_csv(samples: &[Sample]) -> String {
    let per_node = |name: &str| (0..NODES).map(|i| format!("{name}_n{i}")).collect::<Vec<_>>().join(",");
    let mut out = format!(
        "t_s,rss_bytes,heap_bytes,inv_per_s,reads_per_s,traced,p50_us,p99_us,missing,lagged,steady_queue,rolling_live,peer_bound,stale_peers,{},{},{},{},{},{}\n",
        per_node("peers"),
        per_node("origins"),
        per_node("entries"),
        per_node("tag_records"),
        per_node("prefix_records"),
        per_node("flushes")
    );
    let join = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    for s in samples {
        let peers: Vec<u64> = s.peers.iter().map(|&p| p as u64).collect();
        out.push_str(&format!(
            "{:.1},{},{},{:.0},{:.0},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            s.t_s,
            s.rss,
            s.heap,
            s.sent as f64 / SAMPLE_EVERY.as_secs_f64(),
            s.reads as f64 / SAMPLE_EVERY.as_secs_f64(),
            s.traced,
            s.p50_us,
            s.p99_us,
            s.missing,
            s.lagged,
            s.steady_queue,
            s.rolling_live,
            s.peer_bound,
            s.stale_peers,
            join(&peers),
            join(&s.origins),
            join(&s.entries),
            join(&s.tag_records),
            join(&s.prefix_records),
            join(&s.flushes)
        ));
    }
    out
}

/// The plot: RSS over time above, propagation p50/p99 below, the warm-up's end marked.
pub(super) fn plot(
    samples: &[Sample],
    minutes: u64,
    achieved: f64,
    warmup: Duration,
) -> Result<String, Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 760)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(
            &format!(
                "invalbus soak: {minutes} min, {achieved:.0} invalidations/s achieved (target {RATE}), {NODES} nodes"
            ),
            ("sans-serif", 22),
        )?;
        let panels = root.split_evenly((2, 1));
        let x_max = (minutes * 60) as f64;
        let warm = warmup.as_secs_f64();
        // Orange, so that the warm-up's end does not hide behind a grid line.
        let grey = RGBColor(255, 140, 0);

        let rss: Vec<(f64, f64)> = samples.iter().map(|s| (s.t_s, mib(s.rss))).collect();
        let heap: Vec<(f64, f64)> = samples.iter().map(|s| (s.t_s, mib(s.heap))).collect();
        let traced = |ms: fn(&Sample) -> u64| -> Vec<(f64, f64)> {
            samples
                .iter()
                .filter(|s| s.traced > 0)
                .map(|s| (s.t_s, ms(s) as f64 / 1000.0))
                .collect()
        };
        panel(
            &panels[0],
            "process RSS, and the heap in use (jemalloc stats.allocated)",
            "MiB",
            vec![("RSS", rss, BLUE), ("heap in use", heap, MAGENTA)],
            (x_max, warm, grey),
            SeriesLabelPosition::LowerRight,
        )?;
        panel(
            &panels[1],
            "propagation, origin to applied on all 3 nodes, per 10 s window",
            "latency (ms)",
            vec![("p99", traced(|s| s.p99_us), RED), ("p50", traced(|s| s.p50_us), GREEN)],
            (x_max, warm, grey),
            SeriesLabelPosition::UpperRight,
        )?;
        root.present()?;
    }
    Ok(svg)
}

/// A line of a plot panel: its label, its points (seconds, value) and its colour.
type Line<'a> = (&'a str, Vec<(f64, f64)>, plotters::style::RGBColor);

/// One panel of the plot: `lines` over time from 0 to `x_max` seconds, and a vertical line where
/// the warm-up ends.
fn panel(
    area: &plotters::drawing::DrawingArea<plotters::prelude::SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    lines: Vec<Line<'_>>,
    (x_max, warm, warm_colour): (f64, f64, plotters::style::RGBColor),
    legend: plotters::chart::SeriesLabelPosition,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let y_max = lines
        .iter()
        .flat_map(|(_, points, _)| points.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("time (s)")
        .y_desc(y_desc)
        .draw()?;
    for (label, points, colour) in lines {
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    chart
        .draw_series(LineSeries::new(vec![(warm, 0.0), (warm, y_max)], warm_colour))?
        .label("end of warm-up")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], warm_colour));
    chart
        .configure_series_labels()
        .position(legend)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    Ok(())
}
