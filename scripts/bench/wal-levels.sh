#!/usr/bin/env bash
# zstd levels on real WAL (not a test): which level should archive-push use?
#
#   scripts/bench/wal-levels.sh          (as root on Debian 12)
#
# Makes WAL with a scratch PostgreSQL 15 cluster: a bulk load (pgbench -i at
# BENCH_SCALE, default 20) and then TPC-B-like updates (pgbench -c 4 for
# BENCH_SECONDS, default 40, full-page images after a checkpoint), archived
# with cp. Then, for each kind of WAL apart, `zstd -b` (in memory, one
# thread: the library pgvault links, the level's ratio and speed with no
# disk in the way) at levels --fast=5, --fast=3, --fast=1, 1, 2, 3, for
# BENCH_ROUNDS rounds (default 3) with the levels interleaved; the table
# holds the ratio and the median compression and decompression speeds.
# Speeds on a shared machine move with its load; compare levels within one
# run, and take the ratios as they are (they do not depend on load).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

SCALE="${BENCH_SCALE:-20}"
SECONDS_RUN="${BENCH_SECONDS:-40}"
ROUNDS="${BENCH_ROUNDS:-3}"
BASE="${BENCH_DIR:-/var/tmp}"
pgv_ensure_postgres
pgv_ensure_user
U="$PGV_TEST_USER"
BIN="$PGV_PGBIN"
command -v zstd >/dev/null || pgv_apt_install zstd

WORK="$(mktemp -d "$BASE/pgvault-wal-levels.XXXXXX")"
chmod 755 "$WORK"
mkdir -p "$WORK/arch"
chown -R "$U" "$WORK"
PORT="$(pgv_free_port)"
cleanup() {
    runuser -u "$U" -- "$BIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
    if [ "${KEEP:-0}" = 1 ]; then pgv_log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
psql_() { runuser -u "$U" -- "$BIN/psql" -XAtq -h "$WORK" -p "$PORT" -d postgres -c "$1"; }

runuser -u "$U" -- "$BIN/initdb" -D "$WORK/data" -A trust >/dev/null
cat >>"$WORK/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$WORK'
archive_mode = on
archive_command = 'cp %p $WORK/arch/%f'
max_wal_size = '4GB'
autovacuum = off
CONF
runuser -u "$U" -- "$BIN/pg_ctl" -D "$WORK/data" -l "$WORK/log" -w start >/dev/null
pgv_log "bulk load: pgbench -i -s $SCALE"
first_load="$(psql_ "select pg_walfile_name(pg_current_wal_lsn())")"
runuser -u "$U" -- "$BIN/pgbench" -h "$WORK" -p "$PORT" -i -s "$SCALE" -q postgres >/dev/null 2>&1
psql_ checkpoint
first_updates="$(psql_ "select pg_walfile_name(pg_switch_wal())")"
pgv_log "updates: pgbench -c 4 -T $SECONDS_RUN"
runuser -u "$U" -- "$BIN/pgbench" -h "$WORK" -p "$PORT" -c 4 -T "$SECONDS_RUN" postgres >/dev/null 2>&1
last="$(psql_ "select pg_walfile_name(pg_switch_wal())")"
for _ in $(seq 1 600); do
    [ -f "$WORK/arch/$last" ] && break
    sleep 0.1
done
runuser -u "$U" -- "$BIN/pg_ctl" -D "$WORK/data" -m fast stop >/dev/null

# The segments of each kind, whole ones only (the switch segments are
# mostly zeros and would flatter every level alike).
mapfile -t load < <(cd "$WORK/arch" && ls | awk -v a="$first_load" -v b="$first_updates" '$0 > a && $0 < b')
mapfile -t upd < <(cd "$WORK/arch" && ls | awk -v a="$first_updates" -v b="$last" '$0 > a && $0 < b')
pgv_log "${#load[@]} bulk-load segments, ${#upd[@]} update segments"

: >"$WORK/results"
for round in $(seq 1 "$ROUNDS"); do
    for kind in load upd; do
        if [ "$kind" = load ]; then files=("${load[@]}"); else files=("${upd[@]}"); fi
        for level in --fast=5 --fast=3 --fast=1 -1 -2 -3; do
            # `zstd -b` rewrites its line with \r; the last state holds
            # "in -> out (xR), C MB/s, D MB/s".
            line="$(cd "$WORK/arch" && zstd -b "$level" -i1 -T1 "${files[@]}" 2>&1 | tr '\r' '\n' | grep -E 'x[0-9.]+\), +[0-9.]+ MB/s, +[0-9.]+ MB/s' | tail -1)"
            echo "$kind $level $round $(echo "$line" | sed -E 's/.*: *([0-9]+) -> +([0-9]+) \(x[0-9.]+\), +([0-9.]+) MB\/s, +([0-9.]+) MB\/s.*/\1 \2 \3 \4/')" >>"$WORK/results"
        done
    done
done

echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $(zstd -V | sed 's/^\*\*\* //; s/ \*\*\*$//'); BENCH_SCALE=$SCALE BENCH_SECONDS=$SECONDS_RUN BENCH_ROUNDS=$ROUNDS"
python3 - "$WORK/results" <<'PY'
import sys, statistics, collections
r = collections.defaultdict(list)
for line in open(sys.argv[1]):
    kind, level, _, i, o, c, d = line.split()
    r[(kind, level)].append((int(i), int(o), float(c), float(d)))
print()
print("| WAL | level | MiB in | ratio | compress MB/s (median) | decompress MB/s (median) |")
print("|---|---|---:|---:|---:|---:|")
for (kind, level), v in r.items():
    i, o = v[0][0], v[0][1]
    print(f"| {'bulk load' if kind == 'load' else 'pgbench updates'} | {level} | {i / 1048576:.0f} | "
          f"{i / o:.2f} | {statistics.median(x[2] for x in v):.0f} | {statistics.median(x[3] for x in v):.0f} |")
PY
