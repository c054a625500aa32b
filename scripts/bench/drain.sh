#!/usr/bin/env bash
# Archiver drain: how fast does each tool empty a backlog of .ready WAL
# segments when PostgreSQL's own archiver calls it? pgvault (its defaults:
# archive-push-ahead 8, process-max 2) against pgBackRest 2.45 with
# archive-async=y, process-max=2, zstd level 3 for both.
#
#   scripts/bench/drain.sh       (as root on Debian 12; BENCH_PART=drain scripts/bench.sh)
#
# Options (environment):
#   BENCH_SEGMENTS=100   backlog: at least this many 16 MiB segments .ready
#   BENCH_ROUNDS=3       rounds; each round drains once with each tool
#   BENCH_SCALE=20       pgbench scale of the cluster that writes the WAL
#   BENCH_DIR=/var/tmp   where everything lives (one disk)
#   BENCH_OUT=FILE       also append the result tables (markdown) to FILE
#   BENCH_EXTRA="pm3 ahead0"  what-if variants of pgvault, interleaved with the
#                        others but not the run of record: pm3 = --process-max 3,
#                        ahead0 = --archive-push-ahead 0 (no look-ahead)
#   BENCH_PROFILE=1      then one more pgvault drain, each call run under
#                        /usr/bin/time (wall, CPU, faults per call: calls.txt),
#                        summarised after the results (not in the medians)
#   KEEP=1               keep the temporary directory
#
# How: a cluster archives nothing (archive_mode = on, archive_command = '':
# PostgreSQL 15's archiver then idles and keeps the .ready files) while
# `pgbench -c 4 -j 2 -T 5` runs, with a CHECKPOINT before each run (full-page
# images), until BENCH_SEGMENTS segments are .ready. The cluster is stopped
# and that data directory is the snapshot. Each round, for each tool: copy
# the snapshot, drop the page cache, start PostgreSQL (still archiving
# nothing), create the tool's stanza in a fresh repository, then in one SQL
# session ALTER SYSTEM SET archive_command = the tool, pg_reload_conf(), and
# poll pg_stat_archiver (pg_stat_clear_snapshot + pg_sleep(0.01)) until
# last_archived_wal is the newest queued segment. The time is measured inside
# that session with clock_timestamp(), from just before pg_reload_conf() to
# the poll that sees the last segment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

SEGMENTS="${BENCH_SEGMENTS:-100}"
ROUNDS="${BENCH_ROUNDS:-3}"
SCALE="${BENCH_SCALE:-20}"
BASE="${BENCH_DIR:-/var/tmp}"
[ "$(id -u)" = 0 ] || pgv_die "run as root"

pgv_bench_setup bench-drain
SNAP="$WORK/snapshot"
RUN="$WORK/run"
SOCK="$WORK/sock"
mkdir -p "$SNAP" "$SOCK"
chown "$U" "$SNAP" "$SOCK"
chmod 700 "$SNAP"
PORT="$(pgv_free_port)"
PSQL=(as_user "$BIN/psql" -XAtq -h "$SOCK" -p "$PORT" -d postgres)

pgv_bench_traps
seg_index() { local s="$1"; echo $(((16#${s:8:8}) * 256 + 16#${s:16:8})); }
nready() { find "$1/pg_wal/archive_status" -name '*.ready' | wc -l; }

# --- the backlog, made once ---------------------------------------------------
pgv_log "initdb, pgbench -i -s $SCALE (its WAL archived by /bin/true: not part of the backlog)"
as_user "$BIN/initdb" -D "$SNAP" -A trust >/dev/null
cat >>"$SNAP/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$SOCK'
archive_mode = on
archive_command = '/bin/true'
max_wal_size = '8GB'
checkpoint_timeout = '1h'
autovacuum = off
log_line_prefix = '%m [%p] '
CONF
CUR="$SNAP"
as_user "$BIN/pg_ctl" -D "$SNAP" -l "$SOCK/snapshot.log" -w start >/dev/null ||
    { tail -n 30 "$SOCK/snapshot.log" >&2; pgv_die "PostgreSQL did not start"; }
as_user "$BIN/pgbench" -h "$SOCK" -p "$PORT" -i -s "$SCALE" -q postgres >"$WORK/pgbench-init.log" 2>&1 ||
    { tail -n 20 "$WORK/pgbench-init.log" >&2; pgv_die "pgbench -i failed"; }
"${PSQL[@]}" -c "select pg_switch_wal()" >/dev/null
"${PSQL[@]}" -c "checkpoint" >/dev/null
for _ in $(seq 1 600); do
    [ "$(nready "$SNAP")" = 0 ] && break
    sleep 0.1
done
# From here on the archiver idles: PostgreSQL 15 keeps the .ready files while
# archive_command is empty.
"${PSQL[@]}" -c "alter system set archive_command = ''" >/dev/null
"${PSQL[@]}" -c "select pg_reload_conf()" >/dev/null
sleep 1
pgv_log "pgbench -c 4 -j 2 -T 5 (synchronous_commit off, CHECKPOINT before each run) until $SEGMENTS segments are .ready"
t0=$(date +%s)
for i in $(seq 1 200); do
    "${PSQL[@]}" -c "checkpoint" >/dev/null
    PGOPTIONS='-c synchronous_commit=off' as_user "$BIN/pgbench" -h "$SOCK" -p "$PORT" -c 4 -j 2 -T 5 -n postgres \
        >>"$WORK/pgbench-run.log" 2>&1 || { tail -n 20 "$WORK/pgbench-run.log" >&2; pgv_die "pgbench failed"; }
    n="$(nready "$SNAP")"
    pgv_log "  $n .ready after $(($(date +%s) - t0)) s (load $(cut -d' ' -f1 /proc/loadavg))"
    [ "$n" -ge "$SEGMENTS" ] && break
    [ "$i" = 200 ] && pgv_die "pgbench did not write $SEGMENTS segments"
done
GEN_SECS=$(($(date +%s) - t0))
TPS="$(grep -o 'tps = [0-9.]*' "$WORK/pgbench-run.log" | awk '{s += $3; n++} END {printf "%.0f", s / n}')"
as_user "$BIN/pg_ctl" -D "$SNAP" -m fast -w stop >/dev/null
CUR=""
N="$(nready "$SNAP")"
FIRST="$(find "$SNAP/pg_wal/archive_status" -name '*.ready' -printf '%f\n' | sort | head -1)"
LAST="$(find "$SNAP/pg_wal/archive_status" -name '*.ready' -printf '%f\n' | sort | tail -1)"
FIRST="${FIRST%.ready}"
LAST="${LAST%.ready}"
[ $(($(seg_index "$LAST") - $(seg_index "$FIRST") + 1)) = "$N" ] || pgv_die "the .ready files are not contiguous"
# zstd -3 ratio of every 10th queued segment (per segment, as both tools compress)
zin=0 zout=0
for ((k = $(seg_index "$FIRST"); k <= $(seg_index "$LAST"); k += 10)); do
    f="$SNAP/pg_wal/00000001$(printf '%08X%08X' $((k / 256)) $((k % 256)))"
    zin=$((zin + $(stat -c %s "$f")))
    zout=$((zout + $(zstd -3 -c "$f" | wc -c)))
done
ZRATIO="$(python3 -c "print(f'{$zout / $zin:.3f}')")"
pgv_log "backlog: $N segments $FIRST .. $LAST, made in $GEN_SECS s (pgbench ~$TPS tps); zstd -3 ratio (every 10th segment): $ZRATIO"

# --- pgBackRest configuration (repository and spool per round on the command line)
cat >"$WORK/pgbackrest.conf" <<CONF
[global]
compress-type=zst
compress-level=3
archive-async=y
process-max=2
log-level-console=warn
log-level-stderr=off
log-level-file=off
lock-path=$WORK/pgbr-lock
log-path=$WORK/pgbr-log
repo1-retention-full=1

[drain]
pg1-path=$RUN
pg1-socket-path=$SOCK
pg1-port=$PORT
pg1-user=$U
CONF
chmod 644 "$WORK/pgbackrest.conf"
mkdir -p "$WORK/pgbr-lock" "$WORK/pgbr-log"
chown "$U" "$WORK/pgbr-lock" "$WORK/pgbr-log"

# cpu_busy: "busy_jiffies total_jiffies" of the whole machine from /proc/stat
cpu_stat() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat; }

# --- one drain -----------------------------------------------------------------
# drain TOOL ROUND -> appends "TOOL ROUND N seconds load0 load1 busy% failed" to $WORK/times
drain() {
    local tool="$1" r="$2" d="$WORK/r$2-$1" cmd
    mkdir -p "$d"
    chown "$U" "$d"
    rm -rf "$RUN"
    cp -a "$SNAP" "$RUN"
    case "$tool" in
        pgvault | pgvault-pm3 | pgvault-ahead0)
            local extra=""
            [ "$tool" = pgvault-pm3 ] && extra="--process-max 3"
            [ "$tool" = pgvault-ahead0 ] && extra="--archive-push-ahead 0"
            as_user "$PGV" --repo "$d/repo" --stanza drain stanza-create --pgdata "$RUN" >/dev/null 2>&1
            cmd="$PGV --repo $d/repo --stanza drain --spool-path $d/spool --catalog $d/catalog.db --compress-level 3 $extra archive-push %p"
            ;;
        pgvault-profile)
            as_user "$PGV" --repo "$d/repo" --stanza drain stanza-create --pgdata "$RUN" >/dev/null 2>&1
            cmd="/usr/bin/time -a -o $d/calls.txt -f %e,%U,%S,%F,%R,%c,%w $PGV --repo $d/repo --stanza drain --spool-path $d/spool --catalog $d/catalog.db --compress-level 3 archive-push %p"
            ;;
        pgbackrest)
            mkdir -p "$d/repo" "$d/spool"
            chown "$U" "$d/repo" "$d/spool"
            cmd="pgbackrest --config=$WORK/pgbackrest.conf --stanza=drain --repo1-path=$d/repo --spool-path=$d/spool archive-push %p"
            ;;
    esac
    pgv_drop_caches
    CUR="$RUN"
    as_user "$BIN/pg_ctl" -D "$RUN" -l "$d/postgres.log" -w start >/dev/null ||
        { tail -n 30 "$d/postgres.log" >&2; pgv_die "PostgreSQL did not start"; }
    if [ "$tool" = pgbackrest ]; then
        as_user pgbackrest --config="$WORK/pgbackrest.conf" --stanza=drain --repo1-path="$d/repo" stanza-create >/dev/null
    fi
    "${PSQL[@]}" -c "alter system set archive_command = '$cmd'" >/dev/null
    sleep 1
    local load0 load1 c0 c1 secs failed
    load0="$(cut -d' ' -f1 /proc/loadavg)"
    c0="$(cpu_stat)"
    secs="$("${PSQL[@]}" -c "
        do \$\$
        declare t0 timestamptz; last text;
        begin
            t0 := clock_timestamp();
            perform pg_reload_conf();
            loop
                perform pg_stat_clear_snapshot();
                select last_archived_wal into last from pg_stat_archiver;
                exit when last = '$LAST';
                if clock_timestamp() - t0 > interval '30 minutes' then
                    raise exception 'not drained after 30 minutes (last archived: %)', last;
                end if;
                perform pg_sleep(0.01);
            end loop;
            raise notice 'SECS %', extract(epoch from clock_timestamp() - t0);
        end \$\$;" 2>&1 | sed -n 's/.*SECS //p')"
    c1="$(cpu_stat)"
    load1="$(cut -d' ' -f1 /proc/loadavg)"
    [ -n "$secs" ] || pgv_die "$tool round $r: no time (see $d/postgres.log)"
    failed="$("${PSQL[@]}" -c "select failed_count from pg_stat_archiver")"
    as_user "$BIN/pg_ctl" -D "$RUN" -m immediate -w stop >/dev/null
    CUR=""
    local busy
    busy="$(echo "$c0 $c1" | awk '{printf "%.0f", 100 * ($3 - $1) / ($4 - $2)}')"
    # every queued segment is in the repository
    local objs
    objs="$(find "$d/repo" -type f -name '0000*' | awk -F/ '{print substr($NF, 1, 24)}' | sort -u |
        awk -v f="$FIRST" -v l="$LAST" '$1 >= f && $1 <= l' | wc -l)"
    [ "$objs" = "$N" ] || pgv_die "$tool round $r: $objs of $N segments in the repository"
    if [ "$tool" = pgvault-profile ]; then
        cp "$d/calls.txt" "$WORK/calls.txt"
        echo "$secs $load0 $load1" >"$WORK/profile-drain"
        pgv_log "profiled pgvault drain: $secs s"
        rm -rf "$d" "$RUN"
        return
    fi
    echo "$tool $r $N $secs $load0 $load1 $busy $failed" >>"$WORK/times"
    pgv_log "$tool round $r: $N segments in $secs s = $(python3 -c "print(f'{1000 * $secs / $N:.1f}')") ms/segment (load $load0 -> $load1, CPU busy $busy %, failed_count $failed)"
    rm -rf "$d" "$RUN"
}

: >"$WORK/times"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
    echo "versions: $("$PGV" --version) (git $(git -C "$ROOT" rev-parse --short HEAD)), $(pgbackrest version), $("$BIN/postgres" --version)"
    echo "backlog: $N segments $FIRST .. $LAST (pgbench -s $SCALE, ~$TPS tps; zstd -3 ratio of every 10th segment $ZRATIO)"
} >"$WORK/machine.txt"
for r in $(seq 1 "$ROUNDS"); do
    # alternate which tool goes first
    if [ $((r % 2)) = 1 ]; then order="pgvault pgbackrest"; else order="pgbackrest pgvault"; fi
    for x in ${BENCH_EXTRA:-}; do order="$order pgvault-$x"; done
    for t in $order; do drain "$t" "$r"; done
done

{
    cat "$WORK/machine.txt"
    echo
    python3 - "$WORK/times" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
ms = {}
print("| round | tool | segments | drain s | ms / segment | 1-min load before -> after | CPU busy (both cores) | failed_count |")
print("|---:|---|---:|---:|---:|---|---:|---:|")
for tool, r, n, secs, l0, l1, busy, failed in rows:
    m = 1000 * float(secs) / int(n)
    ms.setdefault(tool, []).append(m)
    print(f"| {r} | {tool} | {n} | {float(secs):.2f} | {m:.1f} | {l0} -> {l1} | {busy} % | {failed} |")
print()
print("| | median ms / segment | min | max |")
print("|---|---:|---:|---:|")
for t, v in ms.items():
    print(f"| {t} | **{statistics.median(v):.1f}** | {min(v):.1f} | {max(v):.1f} |")
per_round = {}
for tool, r, n, secs, *_ in rows:
    per_round.setdefault(r, {})[tool] = 1000 * float(secs) / int(n)
ratios = [v["pgvault"] / v["pgbackrest"] for v in per_round.values() if "pgvault" in v and "pgbackrest" in v]
print()
print(f"pgvault / pgBackRest: **{statistics.median(ms['pgvault']) / statistics.median(ms['pgbackrest']):.2f}** of the medians; "
      f"per round {', '.join(f'{x:.2f}' for x in ratios)} (target <= 0.5)")
for t in ms:
    if t.startswith("pgvault-"):
        rr = [v[t] / v["pgbackrest"] for v in per_round.values() if t in v and "pgbackrest" in v]
        print(f"what-if {t} / pgBackRest: {statistics.median(ms[t]) / statistics.median(ms['pgbackrest']):.2f} of the medians; "
              f"per round {', '.join(f'{x:.2f}' for x in rr)}")
PY
} | tee -a "${BENCH_OUT:-/dev/null}"

if [ "${BENCH_PROFILE:-0}" = 1 ]; then
    drain pgvault-profile P
    python3 - "$WORK/calls.txt" "$WORK/profile-drain" "$N" <<'PY' | tee -a "${BENCH_OUT:-/dev/null}"
import sys, statistics
calls = [list(map(float, l.strip().split(","))) for l in open(sys.argv[1]) if l.strip() and l[0].isdigit()]
secs, l0, l1 = open(sys.argv[2]).read().split()
n = int(sys.argv[3])
wall = [c[0] for c in calls]
cpu = [c[1] + c[2] for c in calls]
print()
print(f"Profiled pgvault drain (every archive-push call under /usr/bin/time): {n} segments in {float(secs):.2f} s "
      f"({1000 * float(secs) / n:.1f} ms/segment; load {l0} -> {l1}); {len(calls)} calls")
print()
print("| calls | wall s (sum) | CPU s user+sys (sum) | CPU / wall | median wall ms | median CPU ms |")
print("|---|---:|---:|---:|---:|---:|")
slow = [c for c in calls if c[0] >= 0.2]
fast = [c for c in calls if c[0] < 0.2]
for label, cs in (("all", calls), ("slow (>= 200 ms: pushes, with look-ahead)", slow), ("fast (< 200 ms: answered from the look-ahead record)", fast)):
    if not cs:
        continue
    w = sum(c[0] for c in cs)
    u = sum(c[1] + c[2] for c in cs)
    print(f"| {label}: {len(cs)} | {w:.2f} | {u:.2f} | {u / w:.2f} | {1000 * statistics.median(c[0] for c in cs):.0f} | "
          f"{1000 * statistics.median(c[1] + c[2] for c in cs):.0f} |")
print()
print("Calls in order (wall ms / CPU ms):", " ".join(f"{1000 * c[0]:.0f}/{1000 * (c[1] + c[2]):.0f}" for c in calls))
PY
fi
