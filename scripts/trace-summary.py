#!/usr/bin/env python3
"""Summarises a MIRRORFS_TRACE run (issue 8): where each record's lag goes on its way from the
primary's journal to the mirror daemon's tree.

    MIRRORFS_TRACE=/tmp/tr/t target/release/mirrorfs-bench --targets mirrorfs-net --quick \
        --burst-files 1000 --warmup-mib 0
    scripts/trace-summary.py /tmp/tr/t.*

Every process writes PREFIX.PID (see crates/mirrorfs/src/trace.rs). The files are paired by
time: a primary's file (it has `append` events) with the daemon file (it has `recv` events) whose
events overlap it most. In each pair the burst is the longest run of appends with no gap over
--gap ms (or the seqs given with --seqs A-B). Per record of the burst:

    append   the primary journaled it (and settled it)
    pdurable the primary's journal fdatasync that covers it ended (the acknowledgement in
             `--ack local`; a primary sends only durable records)
    recv     the daemon stored it in its journal
    durable  the daemon's journal fdatasync that covers it ended (F2)
    applied  the daemon's worker applied it (it applies only durable records)
    ack      the daemon sent an ack whose `applied` covers it

and the daemon's fdatasyncs and checkpoint syncs (syncfs or per-file) during the burst; the
daemon's journal stage split into the wait for its fdatasync to start (behind an earlier one)
and that fdatasync; and the apply thread's time between two applied records, split into time
with durable records waiting (the applier is the bottleneck) and time waiting for durable ones.
For the WAN latency cells (`--wan-parts latency-target`), `--last 300` takes the measured
messages (the last 300 records appended).
"""

import argparse
import bisect
import collections
import sys


def load(path):
    ev = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            try:
                t = int(parts[0])
            except ValueError:
                continue
            ev[parts[1]].append((t, parts[2:]))
    return ev


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * len(xs) + 0.5)) - 1))
    return xs[k]


def first_at_or_after(times, values, seq, t_min):
    """First time whose value >= seq and time >= t_min (values non-decreasing in time)."""
    i = bisect.bisect_left(values, seq)
    while i < len(times):
        if times[i] >= t_min:
            return times[i]
        i += 1
    return None


def span(ev):
    ts = [t for v in ev.values() for t, _ in v]
    return (min(ts), max(ts)) if ts else (0, 0)


def durations(ev, start, end, lo, hi):
    """Pairs start/end events (one thread each) inside [lo, hi]: list of (t0, t1, arg)."""
    out = []
    ends = ev.get(end, [])
    j = 0
    for t0, a in ev.get(start, []):
        while j < len(ends) and ends[j][0] < t0:
            j += 1
        if j < len(ends) and lo <= t0 <= hi:
            out.append((t0, ends[j][0], a[0] if a else ""))
    return out


def summarise(pname, prim, dname, dmn, args):
    appends = [(t, int(a[1])) for t, a in prim["append"]]
    if not appends:
        return
    # Burst: longest run of appends without a gap over args.gap ms.
    runs, cur = [], [appends[0]]
    for x in appends[1:]:
        if x[0] - cur[-1][0] > args.gap * 1000:
            runs.append(cur)
            cur = []
        cur.append(x)
    runs.append(cur)
    if args.seqs:
        a, b = (int(v) for v in args.seqs.split("-"))
        lo_seq, hi_seq = a, b
    elif args.last:
        hi_seq = appends[-1][1]
        lo_seq = max(1, hi_seq - args.last + 1)
    else:
        run = max(runs, key=len)
        # The first append of the run settles from the previous end.
        prev = [s for t, s in appends if t < run[0][0]]
        lo_seq = (prev[-1] + 1) if prev else 1
        hi_seq = run[-1][1]
    # Per seq: first append event whose last >= seq.
    ap_t = [t for t, _ in appends]
    ap_v = [s for _, s in appends]
    recv = sorted((t, int(a[1])) for t, a in dmn["recv"])
    rc_t, rc_v = [t for t, _ in recv], [s for _, s in recv]
    dur = [(t, int(a[0])) for t, a in dmn["durable"]]
    du_t, du_v = [t for t, _ in dur], [s for _, s in dur]
    fss = [(t, int(a[0])) for t, a in dmn["fdatasync_start"]]
    fs_t, fs_v = [t for t, _ in fss], [s for _, s in fss]
    pdur = [(t, int(a[0])) for t, a in prim["durable"]]
    pd_t, pd_v = [t for t, _ in pdur], [s for _, s in pdur]
    appl = {}
    for t, a in dmn["applied"]:
        appl.setdefault(int(a[0]), t)
    acks = [(t, int(a[2])) for t, a in dmn["ack"]]
    ak_t, ak_v = [t for t, _ in acks], [s for _, s in acks]

    rows = []
    for seq in range(lo_seq, hi_seq + 1):
        t_ap = first_at_or_after(ap_t, ap_v, seq, 0)
        t_rc = first_at_or_after(rc_t, rc_v, seq, 0)
        if t_ap is None or t_rc is None or seq not in appl:
            continue
        t_du = first_at_or_after(du_t, du_v, seq, t_rc)
        t_apl = appl[seq]
        t_ak = first_at_or_after(ak_t, ak_v, seq, t_apl)
        if t_du is None:
            continue
        # The daemon's fdatasync that covers it (started after it was stored), and the
        # primary's.
        t_fs = first_at_or_after(fs_t, fs_v, seq, t_rc)
        t_pd = first_at_or_after(pd_t, pd_v, seq, t_ap)
        rows.append((seq, t_ap, t_rc, t_du, t_apl, t_ak, t_fs, t_pd))
    if not rows:
        print(f"{pname} / {dname}: no record of seqs {lo_seq}..{hi_seq} went through")
        return
    t_lo, t_hi = rows[0][1], max(r[4] for r in rows)
    print(f"primary {pname}, daemon {dname}: seqs {lo_seq}..{hi_seq}, {len(rows)} records, "
          f"first append -> last applied {(t_hi - t_lo) / 1000:.1f} ms")
    stages = [
        ("append -> recv (primary + link)", lambda r: r[2] - r[1]),
        ("  append -> primary durable (primary F2)",
         lambda r: (r[7] - r[1]) if r[7] and r[7] <= r[2] else None),
        ("  primary durable -> recv (sender + link)",
         lambda r: (r[2] - r[7]) if r[7] and r[7] <= r[2] else None),
        ("recv -> durable (daemon journal F2)", lambda r: r[3] - r[2]),
        ("  recv -> its fdatasync starts", lambda r: (r[6] - r[2]) if r[6] and r[6] <= r[3] else None),
        ("  its fdatasync", lambda r: (r[3] - r[6]) if r[6] and r[6] <= r[3] else None),
        ("durable -> applied (apply queue + apply)", lambda r: r[4] - r[3]),
        ("append -> applied (total)", lambda r: r[4] - r[1]),
        ("primary durable -> applied (WAN lag, --ack local)",
         lambda r: (r[4] - r[7]) if r[7] and r[7] <= r[2] else None),
        ("applied -> ack sent", lambda r: (r[5] - r[4]) if r[5] else None),
    ]
    print(f"  {'stage':44} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, f in stages:
        xs = [f(r) / 1000 for r in rows if f(r) is not None]
        print(f"  {name:44} {pct(xs, 50):8.2f} {pct(xs, 90):8.2f} {pct(xs, 99):8.2f} "
              f"{max(xs) if xs else float('nan'):8.2f}")
    # The tail: the slowest 1 % by total, and where their time went.
    tail = sorted(rows, key=lambda r: r[4] - r[1])[-max(1, len(rows) // 100):]
    n = len(tail)
    print(f"  slowest {n} (1 %) by total, mean ms: append->recv "
          f"{sum(r[2] - r[1] for r in tail) / n / 1000:.2f}, recv->durable "
          f"{sum(r[3] - r[2] for r in tail) / n / 1000:.2f}, durable->applied "
          f"{sum(r[4] - r[3] for r in tail) / n / 1000:.2f}")
    # The apply thread between two applied records of the range: busy while durable records
    # waited (the applier is the bottleneck), or waiting for the next durable record.
    applied = sorted((appl[r[0]], r[0]) for r in rows)
    busy = starved = 0
    for (t0, s0), (t1, _) in zip(applied, applied[1:]):
        i = bisect.bisect_right(du_t, t0) - 1
        if i >= 0 and du_v[i] > s0:
            busy += t1 - t0
        else:
            starved += t1 - t0
    if len(applied) > 1:
        print(f"  daemon apply thread, first to last applied {(applied[-1][0] - applied[0][0]) / 1000:.1f} ms: "
              f"{busy / 1000:.1f} ms with durable records waiting, {starved / 1000:.1f} ms waiting "
              f"for the next durable record")
    lo, hi = t_lo, t_hi
    for label, ev, s, e in [
        ("daemon journal fdatasync", dmn, "fdatasync_start", "durable"),
        ("daemon checkpoint sync", dmn, "ckpt_start", "ckpt_end"),
        ("daemon barrier sync (apply thread)", dmn, "barrier_sync_start", "barrier_sync_end"),
        ("primary journal fdatasync", prim, "fdatasync_start", "durable"),
    ]:
        ds = durations(ev, s, e, lo, hi)
        if not ds:
            print(f"  {label}: none")
            continue
        xs = [(b - a) / 1000 for a, b, _ in ds]
        busy = sum(xs)
        kinds = collections.Counter(k.split(":")[0] for _, _, k in ds
                                    if k and not k.isdigit())
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        print(f"  {label}: {len(ds)}{' (' + kinds + ')' if kinds else ''}, p50 {pct(xs, 50):.2f} "
              f"p99 {pct(xs, 99):.2f} max {max(xs):.2f} ms, busy {busy:.1f} ms of "
              f"{(hi - lo) / 1000:.1f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--gap", type=float, default=50.0,
                    help="a pause longer than this (ms) ends a burst of appends")
    ap.add_argument("--seqs", help="A-B: these seqs instead of the longest burst")
    ap.add_argument("--last", type=int,
                    help="N: the last N records appended instead of the longest burst")
    args = ap.parse_args()
    prims, dmns = [], []
    for f in args.files:
        ev = load(f)
        if ev.get("recv"):
            dmns.append((f, ev))
        elif ev.get("append"):
            prims.append((f, ev))
    if not prims or not dmns:
        print("need a primary's trace (append events) and a daemon's (recv events)",
              file=sys.stderr)
        return 1
    for pname, prim in prims:
        plo, phi = span(prim)

        def overlap(d):
            lo, hi = span(d[1])
            return min(hi, phi) - max(lo, plo)

        dname, dmn = max(dmns, key=overlap)
        if overlap((dname, dmn)) <= 0:
            continue
        summarise(pname, prim, dname, dmn, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
