#!/usr/bin/env python3
"""Tables (markdown) from the times file scripts/bench/incr.sh writes.

    incr-report.py TIMES INCRS
"""
import statistics
import sys

path, incrs = sys.argv[1], int(sys.argv[2])
MiB = 1048576
timed = {}  # (tool, kind, n) -> (secs, rss_kib, read_bytes, cpu, load)
walsender = {}  # (kind, n) -> (read_bytes, rss_kib)
added = {}  # (tool, kind, n) -> bytes
size15 = size17 = 0
for line in open(path):
    p = line.split()
    if p[0] == "size":
        size15, size17 = int(p[1]), int(p[2])
    elif p[0] == "labels":
        continue
    elif p[0] == "walsender":
        walsender[(p[2], p[3])] = (int(p[4]), int(p[5]))
    elif p[0] == "added":
        added[(p[1], p[2], p[3])] = int(p[4])
    else:
        # a restore is timed once per round: every sample kept
        timed.setdefault((p[0], p[1], p[2]), []).append((float(p[3]), int(p[4]), int(p[5]), float(p[6]), p[7]))

TOOLS = ["pgvault", "pgbackrest", "pg_basebackup"]
NAMES = {"pgvault": "pgvault", "pgbackrest": "pgBackRest block incr", "pg_basebackup": "pg_basebackup 17"}
print(f"Data directories (without pg_wal): PostgreSQL 15 {size15 / MiB:.0f} MiB, PostgreSQL 17 {size17 / MiB:.0f} MiB.")
print()
print("Every backup (read: bytes the process tree made the disk read, repository included; "
      "pg_basebackup: its client + the walsender, which reads the data directory):")
print()
print("| backup | tool | s | read MiB | added to repository MiB | peak RSS MiB | CPU s | 1-min load |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
steps = [("full", "0")] + [("incr", str(i)) for i in range(1, incrs + 1)] + [("full", str(incrs + 1))]
for kind, n in steps:
    for t in TOOLS:
        secs, rss, rb, cpu, load = timed[(t, kind, n)][0]
        rss_s = f"{rss / 1024:.0f}"
        if t == "pg_basebackup":
            wrb, wrss = walsender.get((kind, n), (0, 0))
            rb += wrb
            rss_s = f"{rss / 1024:.0f} + walsender {wrss / 1024:.0f}"
        print(f"| {kind} {n} | {NAMES[t]} | {secs:.2f} | {rb / MiB:.1f} | {added[(t, kind, n)] / MiB:.1f} | {rss_s} | {cpu:.1f} | {load} |")
print()


def incr_values(t, idx):
    out = []
    for i in range(1, incrs + 1):
        v = timed[(t, "incr", str(i))][0]
        if idx == "added":
            out.append(added[(t, "incr", str(i))])
        elif idx == "read":
            rb = v[2] + (walsender.get(("incr", str(i)), (0, 0))[0] if t == "pg_basebackup" else 0)
            out.append(rb)
        else:
            out.append(v[idx])
    return out


med = {t: {k: statistics.median(incr_values(t, k)) for k in (0, "read", "added", 1)} for t in TOOLS}
print(f"Incremental backups, medians over the {incrs}:")
print()
print("| tool | s | read MiB | added MiB | peak RSS MiB (client) |")
print("|---|---:|---:|---:|---:|")
for t in TOOLS:
    m = med[t]
    print(f"| {NAMES[t]} | {m[0]:.2f} | {m['read'] / MiB:.1f} | {m['added'] / MiB:.1f} | {m[1] / 1024:.0f} |")
print()
r_time = [a / b for a, b in zip(incr_values("pgvault", 0), incr_values("pgbackrest", 0))]
r_bytes = [a / b for a, b in zip(incr_values("pgvault", "added"), incr_values("pgbackrest", "added"))]
print(f"pgvault / pgBackRest, incremental: time {med['pgvault'][0] / med['pgbackrest'][0]:.3f}× of the medians "
      f"(per backup {min(r_time):.3f}–{max(r_time):.3f}×); bytes added "
      f"{med['pgvault']['added'] / med['pgbackrest']['added']:.2f}× (per backup {min(r_bytes):.2f}–{max(r_bytes):.2f}×); "
      f"pgvault / pg_basebackup time {med['pgvault'][0] / med['pg_basebackup'][0]:.3f}×.")
print()
rounds = len(timed[("pgvault", "restore", "full")])
print(f"Restores (s, the median of {rounds} round(s); peak RSS MiB, the largest):")
print()
full, one, last, same = "full", "full+1", f"full+{incrs}", "full-same-data"
print(f"| tool | {full} | {one} | {last} | full of the same data as {last} | {one} / {full} | {last} / full (same data) |")
print("|---|---:|---:|---:|---:|---:|---:|")
rtools = {"pgvault": "pgvault", "pgbackrest": "pgbackrest", "pg_combinebackup": "pg_combinebackup"}
for t in rtools:
    v = {w: (statistics.median(x[0] for x in timed[(t, "restore", w)]), max(x[1] for x in timed[(t, "restore", w)]))
         for w in (full, one, last, same)}
    cells = " | ".join(f"{v[w][0]:.2f} ({v[w][1] / 1024:.0f})" for w in (full, one, last, same))
    print(f"| {t} | {cells} | {v[one][0] / v[full][0]:.2f}× | {v[last][0] / v[same][0]:.2f}× |")
print()
if rounds > 1:
    print()
    print("Every restore (s), round by round:")
    print()
    for t in rtools:
        print(f"- {t}: " + "; ".join(f"{w} " + ", ".join(f"{x[0]:.2f}" for x in timed[(t, "restore", w)])
                                    for w in (full, one, last, same)))
print()
peak = max(x[1] for k, v in timed.items() if k[0] == "pgvault" for x in v)
print(f"pgvault's peak RSS over every backup and restore above: {peak / 1024:.1f} MiB.")
