#!/usr/bin/env bash
# What encryption costs (issue 11: at most 10 % slower with it): pgvault
# without and with repo-cipher-type = xchacha20-poly1305, interleaved in one
# run on one cluster, so that both see the same load:
#   archive-push of BENCH_SEGMENTS (default 20) real pgbench segments, one
#   process per segment as PostgreSQL runs it, into a fresh repository;
#   full backup (process-max BENCH_PROCESS_MAX, default 2) of pgbench at
#   BENCH_SCALE (default 50); restore of that backup.
# BENCH_ROUNDS (default 3) rounds; the order of the two variants is reversed
# every other round. Page cache dropped before each backup and restore (not
# before the pushes: PostgreSQL hands archive-push a segment it just wrote).
# Wall time, peak RSS and CPU from /usr/bin/time; the 1-min load average.
#
#   scripts/bench/cipher.sh          (as root; BENCH_PART=cipher scripts/bench.sh)
#
# Options: BENCH_SCALE=50 BENCH_SEGMENTS=20 BENCH_ROUNDS=3 BENCH_PROCESS_MAX=2
# BENCH_NICE=-10 BENCH_DIR=/var/tmp BENCH_OUT=FILE KEEP=1
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

SCALE="${BENCH_SCALE:-50}"
SEGMENTS="${BENCH_SEGMENTS:-20}"
ROUNDS="${BENCH_ROUNDS:-3}"
PM="${BENCH_PROCESS_MAX:-2}"
NICE="${BENCH_NICE:--10}"
BASE="${BENCH_DIR:-/var/tmp}"
case "$SCALE$SEGMENTS$ROUNDS$PM" in *[!0-9]*) pgv_die "BENCH_SCALE, BENCH_SEGMENTS, BENCH_ROUNDS and BENCH_PROCESS_MAX must be numbers" ;; esac
[ "$(id -u)" = 0 ] || pgv_die "run as root"
unset BENCH_CIPHER PGVAULT_REPO_CIPHER_TYPE PGVAULT_REPO_CIPHER_KEY_FILE

pgv_bench_setup bench-cipher
pgv_bench_traps
PRIO=()
[ "$NICE" = 0 ] || PRIO=(nice -n "$NICE" ionice -c 2 -n 0)
PGDATA="$WORK/data"
RUN="$WORK/run"
mkdir -p "$PGDATA" "$RUN" "$WORK/state" "$WORK/walcopy" "$WORK/segments"
chown "$U" "$PGDATA" "$RUN" "$WORK/state" "$WORK/walcopy"
chmod 700 "$PGDATA"
head -c 48 /dev/urandom | base64 -w0 >"$WORK/repo.key"
chown "$U" "$WORK/repo.key"
chmod 600 "$WORK/repo.key"
# one wrapper per variant, for the archiver and the timed commands alike
for v in plain enc; do
    {
        echo '#!/bin/sh'
        echo "export XDG_STATE_HOME='$WORK/state' PGVAULT_ARCHIVE_GET_AHEAD=0"
        [ "$v" = plain ] || echo "export PGVAULT_REPO_CIPHER_TYPE=xchacha20-poly1305 PGVAULT_REPO_CIPHER_KEY_FILE='$WORK/repo.key'"
        echo "exec '$PGV' --stanza c --catalog off \"\$@\""
    } >"$WORK/pgv-$v"
    chmod 755 "$WORK/pgv-$v"
    mkdir -p "$WORK/repo-$v"
    chown "$U" "$WORK/repo-$v"
done

PORT="$(pgv_free_port)"
as_user "$BIN/initdb" -D "$PGDATA" -A trust >/dev/null
cat >>"$PGDATA/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$RUN'
archive_mode = on
archive_command = 'cp %p $WORK/walcopy/%f && $WORK/pgv-plain --repo $WORK/repo-plain archive-push %p && $WORK/pgv-enc --repo $WORK/repo-enc archive-push %p'
max_wal_size = '4GB'
wal_keep_size = '4GB'
autovacuum = off
CONF
as_user "$BIN/pg_ctl" -D "$PGDATA" -l "$RUN/pg.log" -w start >/dev/null
CUR="$PGDATA"
for v in plain enc; do as_user "$WORK/pgv-$v" --repo "$WORK/repo-$v" stanza-create --pgdata "$PGDATA" >/dev/null; done
PSQL=(as_user "$BIN/psql" -XAtq -h "$RUN" -p "$PORT" -d postgres)
wait_archived() {
    local seg done_wal
    seg="$("${PSQL[@]}" -c "select pg_walfile_name(pg_switch_wal())")"
    for _ in $(seq 1 6000); do
        done_wal="$("${PSQL[@]}" -c "select coalesce(last_archived_wal, '') from pg_stat_archiver")"
        [[ "$done_wal" > "$seg" || "$done_wal" = "$seg" ]] && return 0
        sleep 0.1
    done
    pgv_die "the archiver did not catch up to $seg in 10 minutes"
}
pgv_log "pgbench -i -s $SCALE"
as_user "$BIN/pgbench" -h "$RUN" -p "$PORT" -i -s "$SCALE" -q postgres >/dev/null 2>&1
"${PSQL[@]}" -c checkpoint
# the pushed segments: TPC-B-like updates after a checkpoint (full-page images)
first="$("${PSQL[@]}" -c "select pg_walfile_name(pg_current_wal_lsn())")"
pgv_log "pgbench updates until $SEGMENTS segments after $first"
seg_index() { local s="$1"; echo $(((16#${s:8:8}) * 256 + 16#${s:16:8})); }
want=$(($(seg_index "$first") + SEGMENTS + 1))
for i in $(seq 1 120); do
    as_user "$BIN/pgbench" -h "$RUN" -p "$PORT" -c 4 -j 2 -T 5 -n postgres >/dev/null 2>&1
    cur="$("${PSQL[@]}" -c "select pg_walfile_name(pg_current_wal_lsn())")"
    [ "$(seg_index "$cur")" -ge "$want" ] && break
    [ "$i" = 120 ] && pgv_die "pgbench did not write $SEGMENTS segments in 10 minutes"
done
wait_archived
find "$WORK/walcopy" -name '[0-9A-F]*' | awk -F/ -v f="$first" 'length($NF) == 24 && ("" $NF) > ("" f)' | sort | head -n "$SEGMENTS" |
    xargs -I{} cp {} "$WORK/segments/"
chown -R "$U" "$WORK/segments"
got="$(find "$WORK/segments" -type f | wc -l)"
[ "$got" = "$SEGMENTS" ] || pgv_die "expected $SEGMENTS segments, have $got"
rm -rf "$WORK/walcopy"
mkdir "$WORK/walcopy" && chown "$U" "$WORK/walcopy"
"${PSQL[@]}" -c checkpoint
wait_archived
SIZE="$(du -sb --exclude=pg_wal "$PGDATA" | cut -f1)"

: >"$WORK/times"
# timed OP VARIANT ROUND CMD...
timed() {
    local op="$1" v="$2" r="$3" load
    shift 3
    [ "$op" = push ] || pgv_drop_caches
    load="$(cut -d' ' -f1 /proc/loadavg)"
    "${PRIO[@]}" /usr/bin/time -o "$WORK/t.out" -f "%e %M %U %S" "$@" >"$WORK/cmd.log" 2>&1 ||
        { tail -20 "$WORK/cmd.log" >&2; pgv_die "$op $v failed"; }
    echo "$op $v $r $(cat "$WORK/t.out") $load" >>"$WORK/times"
    pgv_log "  $op $v round $r: $(cat "$WORK/t.out") (s, KiB, user s, sys s; load $load)"
}
for r in $(seq 1 "$ROUNDS"); do
    order="plain enc"
    [ $((r % 2)) = 1 ] || order="enc plain"
    for v in $order; do
        rm -rf "$WORK/push-$v" && mkdir "$WORK/push-$v" && chown "$U" "$WORK/push-$v"
        as_user "$WORK/pgv-$v" --repo "$WORK/push-$v" stanza-create --pgdata "$PGDATA" >/dev/null
        cat "$WORK"/segments/* >/dev/null
        timed push "$v" "$r" runuser -u "$U" -- sh -c "for s in '$WORK'/segments/*; do '$WORK/pgv-$v' --repo '$WORK/push-$v' archive-push \"\$s\" || exit 1; done"
    done
    for v in $order; do
        timed backup "$v" "$r" runuser -u "$U" -- "$WORK/pgv-$v" --repo "$WORK/repo-$v" --process-max "$PM" \
            backup --type full --pgdata "$PGDATA" --pg-host "$RUN" --pg-port "$PORT" --start-fast
    done
    for v in $order; do
        rm -rf "$WORK/restore" && mkdir -m 700 "$WORK/restore" && chown "$U" "$WORK/restore"
        timed restore "$v" "$r" runuser -u "$U" -- "$WORK/pgv-$v" --repo "$WORK/repo-$v" --process-max "$PM" \
            restore --pgdata "$WORK/restore" --archive-mode off
    done
    rm -rf "$WORK/restore"
done

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); BENCH_SCALE=$SCALE BENCH_SEGMENTS=$SEGMENTS BENCH_ROUNDS=$ROUNDS BENCH_PROCESS_MAX=$PM BENCH_NICE=$NICE; data directory $((SIZE / 1048576)) MiB"
    echo "pgvault: $("$PGV" --version) (git $(git -C "$ROOT" rev-parse --short HEAD)); $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    echo
    python3 - "$WORK/times" "$SEGMENTS" <<'PY'
import sys, collections, statistics
segs = int(sys.argv[2])
t = collections.defaultdict(dict)
print("| operation | round | variant | s | peak RSS MiB | CPU s (user+sys) | 1-min load |")
print("|---|---:|---|---:|---:|---:|---:|")
for line in open(sys.argv[1]):
    op, v, r, secs, rss, usr, sy, load = line.split()
    t[op][(v, r)] = (float(secs), float(usr) + float(sy), int(rss))
    print(f"| {op} | {r} | {v} | {float(secs):.2f} | {int(rss) / 1024:.0f} | {float(usr) + float(sy):.2f} | {load} |")
print()
print("| operation | plain s (median) | encrypted s (median) | encrypted / plain (medians) | per round | CPU: encrypted / plain (medians) | peak RSS MiB plain / encrypted |")
print("|---|---:|---:|---:|---|---:|---|")
for op in ("push", "backup", "restore"):
    rounds = sorted({r for _, r in t[op]}, key=int)
    p = statistics.median(t[op][("plain", r)][0] for r in rounds)
    e = statistics.median(t[op][("enc", r)][0] for r in rounds)
    pc = statistics.median(t[op][("plain", r)][1] for r in rounds)
    ec = statistics.median(t[op][("enc", r)][1] for r in rounds)
    per = ", ".join(f"{t[op][('enc', r)][0] / t[op][('plain', r)][0]:.2f}" for r in rounds)
    rp = max(t[op][("plain", r)][2] for r in rounds) // 1024
    re = max(t[op][("enc", r)][2] for r in rounds) // 1024
    name = f"archive-push ×{segs}" if op == "push" else op
    print(f"| {name} | {p:.2f} | {e:.2f} | **{e / p:.3f}×** | {per} | {ec / pc:.3f}× | {rp} / {re} |")
PY
} | tee -a "${BENCH_OUT:-/dev/null}"
