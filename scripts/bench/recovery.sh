#!/usr/bin/env bash
# Recovery (PITR replay) speed: how long PostgreSQL takes to replay the same
# >= 1 GiB of archived pgbench WAL onto the same base backup, to the same
# restore point, with the WAL coming from
#   a  pg_wal itself (no restore_command: PostgreSQL's own redo speed, the floor)
#   b  pgvault archive-get (the restore_command `pgvault restore` writes;
#      its defaults: prefetch archive-get-ahead 8)
#   c  pgBackRest 2.45 archive-get, archive-async=n
#   d  pgBackRest 2.45 archive-get, archive-async=y, process-max=2
#
#   scripts/bench/recovery.sh     (as root on Debian 12; BENCH_PART=recovery scripts/bench.sh)
#
# Options (environment):
#   BENCH_WAL_MB=1200   WAL written (and archived) after the base backup
#   BENCH_ROUNDS=2      rounds; each round replays once per variant
#   BENCH_SCALE=20      pgbench scale
#   BENCH_DIR=/var/tmp  where everything lives (one disk)
#   BENCH_OUT=FILE      also append the result tables (markdown) to FILE
#   BENCH_NICE=0        nice of the replaying server (and its restore_command,
#                       prefetcher, async process), with ionice -c2 -n0; 0 = none
#   BENCH_EXTRA=ahead0  what-if: also replay with pgvault's prefetch off
#                       (--archive-get-ahead 0), interleaved, not the record
#   BENCH_PROFILE=1     then one more pgvault replay with every restore_command
#                       call under /usr/bin/time (how long recovery waits on it)
#   KEEP=1              keep the temporary directory
#
# How: one cluster archives every segment three ways (a raw copy, pgvault,
# pgBackRest; archive_command runs all three), takes a pgvault base backup,
# then runs pgbench (CHECKPOINT before each 5 s run: full-page images) until
# BENCH_WAL_MB of WAL is written, creates the restore point 'bench' and
# switches WAL. `pgvault restore --target-name bench --target-action promote
# --archive-mode off` restores that backup once into a snapshot directory.
# Each replay starts from a copy of the snapshot; only restore_command
# differs (variant a: standby.signal instead of recovery.signal, no
# restore_command, the raw segments copied into pg_wal beforehand, since
# PostgreSQL refuses archive recovery without a restore_command). The page
# cache is dropped before each start. Timed: from `pg_ctl start` to the log
# line "database system is ready to accept connections" (written after the
# target is reached and the server promoted), polled every 50 ms; the
# startup process's own "redo done ... system usage" line (its CPU and
# elapsed time in redo) is recorded beside it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

WAL_MB="${BENCH_WAL_MB:-1200}"
ROUNDS="${BENCH_ROUNDS:-2}"
SCALE="${BENCH_SCALE:-20}"
BASE="${BENCH_DIR:-/var/tmp}"
NICE="${BENCH_NICE:-0}"
PRIO=()
[ "$NICE" = 0 ] || PRIO=(nice -n "$NICE" ionice -c 2 -n 0)
[ "$(id -u)" = 0 ] || pgv_die "run as root"

pgv_bench_setup bench-recovery
SRC="$WORK/src"
SNAP="$WORK/snapshot"
RUN="$WORK/run"
SOCK="$WORK/sock"
RAW="$WORK/raw"
mkdir -p "$SRC" "$SNAP" "$SOCK" "$RAW" "$WORK/repo-pgv" "$WORK/repo-pgbr" "$WORK/pgbr-lock" "$WORK/pgbr-log" "$WORK/state"
chown "$U" "$SRC" "$SNAP" "$SOCK" "$RAW" "$WORK/repo-pgv" "$WORK/repo-pgbr" "$WORK/pgbr-lock" "$WORK/pgbr-log" "$WORK/state"
chmod 700 "$SRC" "$SNAP"
PORT="$(pgv_free_port)"
PSQL=(as_user "$BIN/psql" -XAtq -h "$SOCK" -p "$PORT" -d postgres)

pgv_bench_traps

# pgBackRest: one configuration for the synchronous archive-get, one for the
# asynchronous one (spool path per replay, on the command line).
pgbr_conf() {
    local f="$1" async="$2"
    cat >"$f" <<CONF
[global]
repo1-path=$WORK/repo-pgbr
repo1-retention-full=99
compress-type=zst
compress-level=3
archive-async=$async
process-max=$([ "$async" = y ] && echo 2 || echo 1)
start-fast=y
lock-path=$WORK/pgbr-lock
log-path=$WORK/pgbr-log
spool-path=$WORK/pgbr-spool
log-level-console=warn
log-level-stderr=off
log-level-file=off

[bench]
pg1-path=$SRC
pg1-socket-path=$SOCK
pg1-port=$PORT
pg1-user=$U
CONF
    chmod 644 "$f"
}
pgbr_conf "$WORK/pgbr.conf" n
pgbr_conf "$WORK/pgbr-async.conf" y
mkdir -p "$WORK/pgbr-spool"
chown "$U" "$WORK/pgbr-spool"

# --- the WAL, made once ---------------------------------------------------------
pgv_log "initdb; archive_command: raw copy + pgvault + pgBackRest"
as_user "$BIN/initdb" -D "$SRC" -A trust >/dev/null
cat >>"$SRC/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$SOCK'
archive_mode = on
archive_command = 'cp %p $RAW/%f.tmp && mv $RAW/%f.tmp $RAW/%f && $PGV --repo $WORK/repo-pgv --stanza bench --catalog off --spool-path $WORK/state/push-spool --compress-level 3 archive-push %p && pgbackrest --config=$WORK/pgbr.conf --stanza=bench archive-push %p'
max_wal_size = '8GB'
checkpoint_timeout = '1h'
autovacuum = off
log_line_prefix = '%m [%p] '
CONF
as_user "$PGV" --repo "$WORK/repo-pgv" --stanza bench stanza-create --pgdata "$SRC" >/dev/null
CUR="$SRC"
as_user "$BIN/pg_ctl" -D "$SRC" -l "$SOCK/src.log" -w start >/dev/null ||
    { tail -n 30 "$SOCK/src.log" >&2; pgv_die "PostgreSQL did not start"; }
as_user pgbackrest --config="$WORK/pgbr.conf" --stanza=bench stanza-create >/dev/null
pgv_log "pgbench -i -s $SCALE"
as_user "$BIN/pgbench" -h "$SOCK" -p "$PORT" -i -s "$SCALE" -q postgres >"$WORK/pgbench-init.log" 2>&1 ||
    { tail -n 20 "$WORK/pgbench-init.log" >&2; pgv_die "pgbench -i failed"; }
"${PSQL[@]}" -c "checkpoint" >/dev/null
pgv_log "pgvault backup (the base backup of every replay)"
as_user "$PGV" --repo "$WORK/repo-pgv" --stanza bench --catalog off --spool-path "$WORK/state/push-spool" \
    backup --type full --pgdata "$SRC" --pg-host "$SOCK" --pg-port "$PORT" --start-fast >"$WORK/backup.log" 2>&1 ||
    { cat "$WORK/backup.log" >&2; pgv_die "pgvault backup failed"; }
START_LSN="$("${PSQL[@]}" -c "select pg_current_wal_lsn()")"
pgv_log "pgbench -c 4 -j 2 -T 5 (synchronous_commit off, CHECKPOINT before each run) until $WAL_MB MiB of WAL"
t0=$(date +%s)
for i in $(seq 1 300); do
    "${PSQL[@]}" -c "checkpoint" >/dev/null
    PGOPTIONS='-c synchronous_commit=off' as_user "$BIN/pgbench" -h "$SOCK" -p "$PORT" -c 4 -j 2 -T 5 -n postgres \
        >>"$WORK/pgbench-run.log" 2>&1 || { tail -n 20 "$WORK/pgbench-run.log" >&2; pgv_die "pgbench failed"; }
    mb="$("${PSQL[@]}" -c "select (pg_wal_lsn_diff(pg_current_wal_lsn(), '$START_LSN') / 1048576)::int")"
    pgv_log "  $mb MiB after $(($(date +%s) - t0)) s (load $(cut -d' ' -f1 /proc/loadavg))"
    [ "$mb" -ge "$WAL_MB" ] && break
    [ "$i" = 300 ] && pgv_die "pgbench did not write $WAL_MB MiB of WAL"
done
TARGET_LSN="$("${PSQL[@]}" -c "select pg_create_restore_point('bench')")"
TARGET_SEG="$("${PSQL[@]}" -c "select pg_walfile_name('$TARGET_LSN')")"
"${PSQL[@]}" -c "select pg_switch_wal()" >/dev/null
pgv_log "restore point 'bench' at $TARGET_LSN ($TARGET_SEG); waiting for the archiver"
for _ in $(seq 1 3000); do
    done_wal="$("${PSQL[@]}" -c "select coalesce(last_archived_wal, '') from pg_stat_archiver")"
    [[ "$done_wal" > "$TARGET_SEG" || "$done_wal" = "$TARGET_SEG" ]] && break
    sleep 0.1
done
[[ "$done_wal" > "$TARGET_SEG" || "$done_wal" = "$TARGET_SEG" ]] || pgv_die "the archiver did not reach $TARGET_SEG"
REPLAY_MB="$("${PSQL[@]}" -c "select (pg_wal_lsn_diff('$TARGET_LSN', '$START_LSN') / 1048576)::int")"
TPS="$(grep -o 'tps = [0-9.]*' "$WORK/pgbench-run.log" | awk '{s += $3; n++} END {printf "%.0f", s / n}')"
as_user "$BIN/pg_ctl" -D "$SRC" -m fast -w stop >/dev/null
CUR=""
rm -rf "$WORK/state/push-spool"

pgv_log "pgvault restore into the snapshot (target: restore point 'bench', promote)"
as_user "$PGV" --repo "$WORK/repo-pgv" --stanza bench --catalog off restore --pgdata "$SNAP" \
    --target-name bench --target-action promote --archive-mode off >"$WORK/restore.log" 2>&1 ||
    { cat "$WORK/restore.log" >&2; pgv_die "pgvault restore failed"; }
[ -f "$SNAP/recovery.signal" ] || pgv_die "pgvault restore wrote no recovery.signal"
PGV_RESTORE_CMD="$(sed -n "s/^restore_command = '\(.*\)'\$/\1/p" "$SNAP/postgresql.auto.conf" | tail -1 | sed "s/''/'/g")"
[ -n "$PGV_RESTORE_CMD" ] || pgv_die "no restore_command in $SNAP/postgresql.auto.conf"
# the snapshot's port and socket stay those of the source cluster (it is stopped)
BACKUP_SEG="$(sed -n 's/^START WAL LOCATION: .*(file \(.*\))$/\1/p' "$SNAP/backup_label")"
pgv_log "restore_command written by pgvault restore: $PGV_RESTORE_CMD"

# set_restore_command DIR CMD: replace the restore_command in DIR/postgresql.auto.conf
set_restore_command() {
    local dir="$1" cmd="$2" f="$1/postgresql.auto.conf"
    grep -v '^restore_command' "$f" >"$f.new"
    [ -n "$cmd" ] && printf "restore_command = '%s'\n" "${cmd//\'/\'\'}" >>"$f.new"
    chown "$U" "$f.new"
    mv "$f.new" "$f"
}

# --- one replay --------------------------------------------------------------------
# replay VARIANT ROUND -> "VARIANT ROUND wall_s log_s redo_cpu_s redo_elapsed_s load0 load1 busy%" in $WORK/times
cpu_stat() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat; }
replay() {
    local v="$1" r="$2" d="$WORK/r$2-$1" log
    rm -rf "$RUN" "$d"
    mkdir -p "$d"
    chown "$U" "$d"
    cp -a "$SNAP" "$RUN"
    case "$v" in
        a-pg_wal)
            rm -f "$RUN/recovery.signal"
            as_user touch "$RUN/standby.signal"
            set_restore_command "$RUN" ""
            find "$RAW" -name '0000*' ! -name '*.tmp' ! -name '*.backup' -printf '%f\n' | while read -r f; do
                [[ "$f" < "$BACKUP_SEG" ]] || cp -p "$RAW/$f" "$RUN/pg_wal/$f"
            done
            chown "$U" "$RUN"/pg_wal/*
            ;;
        b-pgvault) set_restore_command "$RUN" "$PGV_RESTORE_CMD" ;;
        b-pgvault-ahead0) set_restore_command "$RUN" "${PGV_RESTORE_CMD/ archive-get / --archive-get-ahead 0 archive-get }" ;;
        b-pgvault-profile) set_restore_command "$RUN" "/usr/bin/time -a -o $d/calls.txt -f %e,%U,%S,%x $PGV_RESTORE_CMD" ;;
        c-pgbackrest-sync) set_restore_command "$RUN" "pgbackrest --config=$WORK/pgbr.conf --stanza=bench --pg1-path=$RUN archive-get %f \"%p\"" ;;
        d-pgbackrest-async)
            mkdir -p "$d/spool"
            chown "$U" "$d/spool"
            set_restore_command "$RUN" "pgbackrest --config=$WORK/pgbr-async.conf --stanza=bench --pg1-path=$RUN --spool-path=$d/spool archive-get %f \"%p\""
            ;;
    esac
    log="$d/postgres.log"
    pgv_drop_caches
    local load0 load1 c0 c1 t0 t1
    load0="$(cut -d' ' -f1 /proc/loadavg)"
    c0="$(cpu_stat)"
    CUR="$RUN"
    t0="$(date +%s.%N)"
    # pgvault's local state (catalog, prefetch spool) goes to $d/state, not to ~pgvtest
    "${PRIO[@]}" runuser -u "$U" -- env XDG_STATE_HOME="$d/state" "$BIN/pg_ctl" -D "$RUN" -l "$log" start >/dev/null
    for _ in $(seq 1 12000); do
        grep -q 'database system is ready to accept connections$' "$log" 2>/dev/null && break
        if grep -q 'FATAL\|PANIC' "$log" 2>/dev/null; then tail -n 30 "$log" >&2; pgv_die "$v: recovery failed"; fi
        sleep 0.05
    done
    t1="$(date +%s.%N)"
    c1="$(cpu_stat)"
    load1="$(cut -d' ' -f1 /proc/loadavg)"
    grep -q 'database system is ready to accept connections$' "$log" || { tail -n 30 "$log" >&2; pgv_die "$v: not promoted after 10 minutes"; }
    grep -q 'recovery stopping at restore point "bench"' "$log" || { tail -n 30 "$log" >&2; pgv_die "$v: did not stop at the restore point"; }
    as_user "$BIN/pg_ctl" -D "$RUN" -m immediate -w stop >/dev/null
    CUR=""
    # helpers started by the restore_command (pgvault's prefetcher, pgBackRest's
    # async process) finish before the next replay
    for _ in $(seq 1 300); do
        pgrep -f -- "^$WORK/pgvault |pgbackrest .*$WORK/" >/dev/null || break
        sleep 0.1
    done
    [ "$v" = b-pgvault-profile ] && cp "$d/calls.txt" "$WORK/calls.txt" && cp "$log" "$WORK/profile.log"
    python3 - "$log" "$v" "$r" "$t0" "$t1" "$load0" "$load1" "$c0 $c1" >>"$WORK/times" <<'PY'
import re, sys
from datetime import datetime
log, v, r, t0, t1, l0, l1, cs = sys.argv[1:]
lines = open(log).read().splitlines()
def ts(line):
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
first = next(l for l in lines if re.match(r"\d{4}-", l))
ready = next(l for l in lines if l.endswith("database system is ready to accept connections"))
redo = next((l for l in lines if "redo done at" in l), "")
m = re.search(r"CPU: user: ([\d.]+) s, system: ([\d.]+) s, elapsed: ([\d.]+) s", redo)
cpu, el = (float(m[1]) + float(m[2]), float(m[3])) if m else (-1, -1)
b0, a0, b1, a1 = map(float, cs.split())
print(v, r, f"{float(t1) - float(t0):.3f}", f"{ts(ready) - ts(first):.3f}", f"{cpu:.2f}", f"{el:.2f}", l0, l1, f"{100 * (b1 - b0) / (a1 - a0):.0f}")
PY
    pgv_log "$v round $r: $(tail -1 "$WORK/times")"
    rm -rf "$RUN" "$d"
}

: >"$WORK/times"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r), $(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
    echo "versions: $("$PGV" --version) (git $(git -C "$ROOT" rev-parse --short HEAD)), $(pgbackrest version), $("$BIN/postgres" --version)"
    echo "WAL replayed: $REPLAY_MB MiB from the backup's start ($BACKUP_SEG) to the restore point ($TARGET_SEG); pgbench -s $SCALE, ~$TPS tps"
    echo "pgvault restore_command: $PGV_RESTORE_CMD"
} >"$WORK/machine.txt"
VARIANTS=(a-pg_wal b-pgvault c-pgbackrest-sync d-pgbackrest-async)
for r in $(seq 1 "$ROUNDS"); do
    # reverse the order every other round
    if [ $((r % 2)) = 1 ]; then order=("${VARIANTS[@]}"); else order=(d-pgbackrest-async c-pgbackrest-sync b-pgvault a-pg_wal); fi
    for x in ${BENCH_EXTRA:-}; do order+=("b-pgvault-$x"); done
    for v in "${order[@]}"; do replay "$v" "$r"; done
done
if [ "${BENCH_PROFILE:-0}" = 1 ]; then
    replay b-pgvault-profile P
    grep -v ' P ' "$WORK/times" >"$WORK/times.rounds" || true
    grep ' P ' "$WORK/times" >"$WORK/times.profile" || true
    mv "$WORK/times.rounds" "$WORK/times"
fi

{
    cat "$WORK/machine.txt"
    echo
    python3 - "$WORK/times" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
print("| round | variant | start -> promoted, wall s | same, from the log s | redo CPU s (startup process) | redo elapsed s | 1-min load before -> after | CPU busy (both cores) |")
print("|---:|---|---:|---:|---:|---:|---|---:|")
by = {}
for v, r, wall, logs, cpu, el, l0, l1, busy in sorted(rows, key=lambda x: (x[1], x[0])):
    by.setdefault(v, []).append(float(logs))
    print(f"| {r} | {v} | {float(wall):.2f} | {float(logs):.2f} | {cpu} | {el} | {l0} -> {l1} | {busy} % |")
print()
a = statistics.median(by["a-pg_wal"])
print("| variant | median s (log) | / a (pg_wal) | per-round ratio to a |")
print("|---|---:|---:|---|")
per = {}
for v, r, wall, logs, *_ in rows:
    per.setdefault(r, {})[v] = float(logs)
for v in sorted(by):
    m = statistics.median(by[v])
    rr = ", ".join(f"{p[v] / p['a-pg_wal']:.2f}" for p in per.values() if v in p and "a-pg_wal" in p)
    print(f"| {v} | **{m:.2f}** | {m / a:.2f} | {rr} |")
b = statistics.median(by["b-pgvault"])
print()
print(f"pgvault / pg_wal {b / a:.2f} (target <= 1.2); pgvault / pgBackRest sync {b / statistics.median(by['c-pgbackrest-sync']):.2f}, "
      f"/ pgBackRest async {b / statistics.median(by['d-pgbackrest-async']):.2f} (target < 1)")
PY
    if [ -f "$WORK/calls.txt" ]; then
        python3 - "$WORK/calls.txt" "$WORK/times.profile" <<'PY'
import sys, statistics
calls = [l.strip().split(",") for l in open(sys.argv[1]) if l.strip() and l[0].isdigit()]
v, r, wall, logs, cpu, el, l0, l1, busy = open(sys.argv[2]).read().split()
ok = [c for c in calls if c[3] == "0"]
miss = [c for c in calls if c[3] != "0"]
w = [float(c[0]) for c in ok]
u = [float(c[1]) + float(c[2]) for c in ok]
print()
print(f"Profiled pgvault replay (every restore_command call under /usr/bin/time): {float(logs):.2f} s start -> promoted, "
      f"redo elapsed {el} s, redo CPU {cpu} s, load {l0} -> {l1}")
print()
print(f"- {len(ok)} calls that restored a file: {sum(w):.2f} s of wall time in total (recovery waits for each), "
      f"median {1000 * statistics.median(w):.1f} ms, p90 {1000 * sorted(w)[int(0.9 * len(w))]:.1f} ms, max {1000 * max(w):.1f} ms; "
      f"CPU {sum(u):.2f} s in total, median {1000 * statistics.median(u):.1f} ms")
print(f"- {len(miss)} calls for files the archive does not hold (history files, the segment after the target): "
      f"{sum(float(c[0]) for c in miss):.2f} s in total")
print(f"- every call, in order (ms): {' '.join(f'{1000 * float(c[0]):.0f}' for c in calls)}")
PY
    fi
} | tee -a "${BENCH_OUT:-/dev/null}"
