#!/usr/bin/env bash
# Benchmark (not a test): archive-push of real 16 MiB pgbench WAL segments,
# pgvault against pgBackRest 2.45 (Debian's package) at the same zstd level,
# and the floor (`zstd -3` of the segment to a file + fsync of that file);
# then full backup and restore (scripts/bench/backup-restore.sh).
#
#   scripts/bench.sh                  as root on Debian 12; installs what it needs
#   BENCH_PART=archive|backup|all     which part [default: all]
#   BENCH_PART=drain                  archiver drain of a .ready backlog (scripts/bench/drain.sh)
#   BENCH_PART=recovery               replay speed with each restore_command (scripts/bench/recovery.sh)
#   BENCH_PART=incr                   incremental backups: pgvault, pgBackRest block incr,
#                                     pg_basebackup --incremental (scripts/bench/incr.sh)
#   BENCH_PART=s3expire               expire, info, verify of 10 backups of 20,000 tables on moto
#                                     (scripts/bench/s3-expire.sh)
#   BENCH_PART=cipher                 archive-push, backup and restore by pgvault without and with
#                                     encryption, interleaved, for encryption's cost (issue 11)
#                                     (scripts/bench/cipher.sh; BENCH_CIPHER=1 below encrypts in
#                                     any other part)
#
# Options (environment):
#   BENCH_ROUNDS=3        rounds; every round pushes into fresh repositories
#   BENCH_SEGMENTS=20     segments per round (all from one pgbench run)
#   BENCH_DIR=/var/tmp    where the cluster, the segments and both repositories
#                         live (one disk for all of them)
#   BENCH_NICE=-10        scheduling priority of the timed part (all three tools
#                         alike, with ionice best-effort 0), so that other work
#                         on a shared machine disturbs it less; 0 = as it comes
#   BENCH_PROFILE=1       also profile one pgvault push (perf + strace)
#   BENCH_OUT=FILE        also write the results (markdown) to FILE
#   BENCH_SKIP_PGVAULT=1  measure only pgBackRest and the floor (to try the
#                         harness while pgvault does not work)
#   BENCH_CIPHER=1        pgvault encrypts every object (repo-cipher-type =
#                         xchacha20-poly1305, a key file in the work directory)
#   KEEP=1                keep the temporary directory (cluster stopped)
#
# What is measured and how: see docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PART="${BENCH_PART:-all}"
case "$PART" in
    archive | all) ;;
    backup) exec scripts/bench/backup-restore.sh ;;
    drain) exec scripts/bench/drain.sh ;;
    recovery) exec scripts/bench/recovery.sh ;;
    incr) exec scripts/bench/incr.sh ;;
    s3expire) exec scripts/bench/s3-expire.sh ;;
    cipher) exec scripts/bench/cipher.sh ;;
    *) echo "BENCH_PART must be archive, backup, drain, recovery, incr, s3expire, cipher or all" >&2; exit 2 ;;
esac
if [ "$PART" = all ]; then
    # The archive part first, in a subshell of its own, then backup/restore.
    BENCH_PART=archive "$ROOT/scripts/bench.sh"
    exec scripts/bench/backup-restore.sh
fi
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

ROUNDS="${BENCH_ROUNDS:-3}"
SEGMENTS="${BENCH_SEGMENTS:-20}"
PROFILE="${BENCH_PROFILE:-0}"
NICE="${BENCH_NICE:--10}"
SKIP_PGVAULT="${BENCH_SKIP_PGVAULT:-0}"
[ "$(id -u)" = 0 ] || pgv_die "run as root (it installs packages and runs PostgreSQL as $PGV_TEST_USER)"
case "$ROUNDS$SEGMENTS" in *[!0-9]*) pgv_die "BENCH_ROUNDS and BENCH_SEGMENTS must be numbers" ;; esac
case "$NICE" in -[0-9] | -1[0-9] | -20 | [0-9] | 1[0-9]) ;; *) pgv_die "BENCH_NICE must be -20 .. 19" ;; esac

# --- install ---------------------------------------------------------------
pgv_ensure_tools
pgv_ensure_postgres
pgv_ensure_user
pgv_apt_install pgbackrest time
if [ "$PROFILE" = 1 ]; then
    command -v perf >/dev/null || pgv_apt_install linux-perf
    command -v strace >/dev/null || pgv_apt_install strace
fi
PGBACKREST="$(command -v pgbackrest)" || pgv_die "pgbackrest is not installed"
PY=/usr/bin/python3
[ -x "$PY" ] || PY="$(command -v python3)"

PGVAULT="$ROOT/target/release/pgvault"
if [ "$SKIP_PGVAULT" != 1 ]; then
    command -v cargo >/dev/null || pgv_die "cargo is needed to build pgvault (rustup.rs)"
    pgv_log "cargo build --release"
    cargo build --release --quiet || pgv_die "pgvault does not build"
    [ -x "$PGVAULT" ] || pgv_die "no binary at $PGVAULT after cargo build --release"
    "$PGVAULT" archive-push --help >/dev/null 2>&1 ||
        pgv_die "$PGVAULT has no working 'archive-push --help'"
fi

# --- work directory and cluster --------------------------------------------
U="$PGV_TEST_USER"
BIN="$PGV_PGBIN"
BASE="${BENCH_DIR:-/var/tmp}"
mkdir -p "$BASE"
WORK="$(mktemp -d "$BASE/pgvault-bench.XXXXXX")"
chmod 755 "$WORK"
pgv_bench_cipher
PGDATA="$WORK/pgdata"
SOCK="$WORK/run"
WALOUT="$WORK/walcopy"
SEGDIR="$WORK/segments"
mkdir -p "$PGDATA" "$SOCK" "$WALOUT" "$SEGDIR"
chown "$U" "$PGDATA" "$SOCK" "$WALOUT"
chmod 700 "$PGDATA"
PORT="$(pgv_free_port)"
# pgvault's local state (spool, catalog) in the temporary directory, not in
# root's home; archive-get's detached prefetcher off (the round-trip check)
export XDG_STATE_HOME="$WORK/state" PGVAULT_SPOOL_PATH="$WORK/state/spool" PGVAULT_ARCHIVE_GET_AHEAD=0
PSQL=(as_user "$BIN/psql" -XAtq -h "$SOCK" -p "$PORT" -d postgres)

cleanup() {
    local rc=$?
    if [ -f "$PGDATA/postmaster.pid" ]; then
        as_user "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 ||
            as_user "$BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then
        pgv_log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fstype="$(stat -f -c %T "$WORK")"
case "$fstype" in
    tmpfs | ramfs) pgv_log "warning: $WORK is on $fstype: fsync costs nothing there, the numbers are not a disk's" ;;
esac

pgv_log "initdb (PostgreSQL 15, default 16 MiB WAL segments) in $PGDATA"
as_user "$BIN/initdb" -D "$PGDATA" -A trust >/dev/null
# Every finished segment is copied out by the archiver (cp: no pgvault or
# pgBackRest involved in making the input). autovacuum is off so that the
# idle cluster does not write while the timings run.
cat >>"$PGDATA/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$SOCK'
archive_mode = on
archive_command = 'cp %p $WALOUT/%f.tmp && mv $WALOUT/%f.tmp $WALOUT/%f'
wal_keep_size = '4GB'
max_wal_size = '4GB'
autovacuum = off
CONF
as_user "$BIN/pg_ctl" -D "$PGDATA" -l "$SOCK/postgres.log" -w start >/dev/null ||
    { tail -n 30 "$SOCK/postgres.log" >&2; pgv_die "PostgreSQL did not start"; }

pgv_log "pgbench -i -s 20"
as_user "$BIN/pgbench" -h "$SOCK" -p "$PORT" -i -s 20 -q postgres >"$WORK/pgbench-init.log" 2>&1 ||
    { tail -n 20 "$WORK/pgbench-init.log" >&2; pgv_die "pgbench -i failed"; }
"${PSQL[@]}" -c "checkpoint" >/dev/null

# The segments pushed are written by a pgbench run (TPC-B-like updates, full
# page images after the checkpoint above): the WAL an archiver sees day to day.
first_seg="$("${PSQL[@]}" -c "select pg_walfile_name(pg_current_wal_lsn())")"
# segments written since $first_seg (same timeline; 16 MiB: 256 per "log")
seg_index() { local s="$1"; echo $(((16#${s:8:8}) * 256 + 16#${s:16:8})); }
start_idx="$(seg_index "$first_seg")"
want_idx=$((start_idx + SEGMENTS + 1))
pgv_log "pgbench run until $SEGMENTS segments after $first_seg are finished"
for i in $(seq 1 60); do
    as_user "$BIN/pgbench" -h "$SOCK" -p "$PORT" -c 4 -j 2 -T 10 -n postgres >>"$WORK/pgbench-run.log" 2>&1 ||
        { tail -n 20 "$WORK/pgbench-run.log" >&2; pgv_die "pgbench failed"; }
    cur="$("${PSQL[@]}" -c "select pg_walfile_name(pg_current_wal_lsn())")"
    [ "$(seg_index "$cur")" -ge "$want_idx" ] && break
    [ "$i" = 60 ] && pgv_die "pgbench did not write $SEGMENTS segments in 10 minutes"
done
last_needed_idx=$((start_idx + SEGMENTS))
pgv_log "waiting for the archiver to copy them"
for _ in $(seq 1 1200); do
    done_wal="$("${PSQL[@]}" -c "select coalesce(last_archived_wal, '') from pg_stat_archiver")"
    if [ -n "$done_wal" ] && [ "$(seg_index "$done_wal")" -ge "$last_needed_idx" ]; then break; fi
    sleep 0.1
done
if [ -z "$done_wal" ] || [ "$(seg_index "$done_wal")" -lt "$last_needed_idx" ]; then
    pgv_die "the archiver did not copy the segments (last archived: ${done_wal:-none})"
fi
"${PSQL[@]}" -c "checkpoint" >/dev/null

for f in "$WALOUT"/[0-9A-F]*; do
    n="$(basename "$f")"
    [ "${#n}" = 24 ] || continue
    idx="$(seg_index "$n")"
    if [ "$idx" -gt "$start_idx" ] && [ "$idx" -le "$last_needed_idx" ]; then
        cp "$f" "$SEGDIR/$n"
    fi
done
got="$(find "$SEGDIR" -type f | wc -l)"
[ "$got" = "$SEGMENTS" ] || pgv_die "expected $SEGMENTS segments in $SEGDIR, found $got"
rm -rf "$WALOUT"
pgv_log "$SEGMENTS segments: $(basename "$(find "$SEGDIR" -type f | sort | head -1)") .. $(basename "$(find "$SEGDIR" -type f | sort | tail -1)")"

# --- pgBackRest configuration ------------------------------------------------
# Synchronous push, zstd level 3, repository beside pgvault's. The repository
# path is given per round on the command line (fresh repositories).
PGBR_CONF="$WORK/pgbackrest.conf"
mkdir -p "$WORK/pgbr-lock" "$WORK/pgbr-log"
cat >"$PGBR_CONF" <<CONF
[global]
compress-type=zst
compress-level=3
archive-async=n
process-max=1
log-level-console=warn
log-level-stderr=off
log-level-file=off
log-path=$WORK/pgbr-log
lock-path=$WORK/pgbr-lock
repo1-retention-full=1

[bench]
pg1-path=$PGDATA
pg1-socket-path=$SOCK
pg1-port=$PORT
pg1-user=$U
CONF

# --- versions and machine ----------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "memory: $(free -g | awk '/^Mem:/ {print $2 " GiB"}')"
    echo "kernel: $(uname -sr)"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine shares the cores)"
    src="$(df -P "$WORK" | awk 'NR==2 {print $1}')"
    dev="$(basename "$src")"
    rota="$(cat "/sys/block/$dev/queue/rotational" 2>/dev/null || echo '?')"
    model="$(sed 's/ *$//' "/sys/block/$dev/device/model" 2>/dev/null || true)"
    echo "repo disk: $src ($(findmnt -n -o FSTYPE --target "$WORK"), $(findmnt -n -o OPTIONS --target "$WORK"), rotational=$rota${model:+, model $model}) at $WORK"
    echo "postgresql: $("$BIN/postgres" --version)"
    if [ "$SKIP_PGVAULT" != 1 ]; then
        echo "pgvault: $("$PGVAULT" --version) (git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ', with uncommitted changes in src'))"
    fi
    echo "pgbackrest: $("$PGBACKREST" version)"
    echo "zstd: $(zstd -V | sed 's/^\*\*\* //; s/ \*\*\*$//')"
} >"$WORK/machine.txt"

# --- the measurement ----------------------------------------------------------
PRIO=()
if [ "$NICE" != 0 ]; then
    PRIO=(nice -n "$NICE" ionice -c 2 -n 0)
fi
echo "priority of the timed part: ${PRIO[*]:-default (BENCH_NICE=0)}" >>"$WORK/machine.txt"
args=(
    --work "$WORK" --segments "$SEGDIR" --rounds "$ROUNDS"
    --pgdata "$PGDATA" --pgbackrest "$PGBACKREST" --pgbackrest-conf "$PGBR_CONF"
    --machine "$WORK/machine.txt"
)
[ "$SKIP_PGVAULT" = 1 ] || args+=(--pgvault "$PGVAULT")
[ -n "${BENCH_OUT:-}" ] && args+=(--out "$(realpath -m "$BENCH_OUT")")
"${PRIO[@]}" "$PY" "$ROOT/scripts/bench/harness.py" "${args[@]}"

if [ "$PROFILE" = 1 ] && [ "$SKIP_PGVAULT" != 1 ]; then
    pargs=(--work "$WORK" --segments "$SEGDIR" --pgdata "$PGDATA" --pgvault "$PGVAULT"
        --pgbackrest "$PGBACKREST" --pgbackrest-conf "$PGBR_CONF")
    [ -n "${BENCH_OUT:-}" ] && pargs+=(--out "$(realpath -m "$BENCH_OUT")")
    "${PRIO[@]}" "$PY" "$ROOT/scripts/bench/profile.py" "${pargs[@]}"
fi
