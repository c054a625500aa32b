#!/usr/bin/env bash
# Where does a full backup / restore spend its time? (Not a benchmark: a
# profile to go with scripts/bench/backup-restore.sh.)
#
#   BENCH_SCALE=200 scripts/bench/profile-backup.sh     (as root on Debian 12)
#   BENCH_DATA=random BENCH_RANDOM_MB=1000 scripts/bench/profile-backup.sh
#                     (a table of gen_random_bytes instead of pgbench)
#
# One pgbench cluster at BENCH_SCALE archiving to both tools, then, each with
# the page cache dropped first, process-max BENCH_PROCESS_MAX (default 2):
#   pgvault backup and pgBackRest backup under `vmstat 1` (CPU: user, system,
#     idle, iowait, steal of the whole machine; disk MiB/s in and out) and
#     /usr/bin/time (the tool's own CPU);
#   pgvault backup under `perf record` (flat profile, all its threads) and
#     under `strace -f -c -w` (wall time spent in each system call, summed
#     over threads);
#   the same for the restores.
# Output: text on stdout (and appended to BENCH_OUT).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
SCALE="${BENCH_SCALE:-200}"
DATA="${BENCH_DATA:-pgbench}"
RANDOM_MB="${BENCH_RANDOM_MB:-1000}"
PM="${BENCH_PROCESS_MAX:-2}"
BASE="${BENCH_DIR:-/var/tmp}"
[ "$(id -u)" = 0 ] || pgv_die "run as root"
command -v perf >/dev/null || pgv_apt_install linux-perf
command -v strace >/dev/null || pgv_apt_install strace
pgv_bench_setup profile-br procps
D="$WORK/data"
mkdir -p "$D" "$WORK/run" "$WORK/repo-pgv" "$WORK/repo-pgbr" "$WORK/pgbr-lock" "$WORK/pgbr-log" "$WORK/out"
chown "$U" "$D" "$WORK/run" "$WORK/repo-pgv" "$WORK/repo-pgbr" "$WORK/pgbr-lock" "$WORK/pgbr-log"
chmod 700 "$D"
PORT="$(pgv_free_port)"
cleanup() {
    local rc=$?
    as_user "$BIN/pg_ctl" -D "$D" -m immediate stop >/dev/null 2>&1 || true
    if [ "${KEEP:-0}" = 1 ]; then pgv_log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
cat >"$WORK/pgbr.conf" <<CONF
[global]
repo1-path=$WORK/repo-pgbr
repo1-retention-full=99
compress-type=zst
compress-level=3
start-fast=y
lock-path=$WORK/pgbr-lock
log-path=$WORK/pgbr-log
spool-path=$WORK/pgbr-log
log-level-console=warn
log-level-file=off

[bench]
pg1-path=$D
pg1-socket-path=$WORK/run
pg1-port=$PORT
pg1-user=$U
CONF
chmod 644 "$WORK/pgbr.conf"
as_user "$BIN/initdb" -D "$D" -A trust >/dev/null
cat >>"$D/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$WORK/run'
archive_mode = on
archive_command = '$PGV --repo $WORK/repo-pgv --stanza bench --catalog off archive-push %p && pgbackrest --config $WORK/pgbr.conf --stanza=bench archive-push %p'
max_wal_size = '4GB'
autovacuum = off
CONF
as_user "$PGV" --repo "$WORK/repo-pgv" --stanza bench stanza-create --pgdata "$D" >/dev/null 2>&1
as_user "$BIN/pg_ctl" -D "$D" -l "$WORK/run/pg.log" -w start >/dev/null
as_user pgbackrest --config "$WORK/pgbr.conf" --stanza=bench stanza-create >/dev/null
if [ "$DATA" = random ]; then
    pgv_log "random bytes: $RANDOM_MB MiB"
    as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$PORT" -d postgres -c "
        create extension pgcrypto;
        create table rnd(b bytea);
        alter table rnd alter column b set storage external;
        insert into rnd select gen_random_bytes(1000) from generate_series(1, $RANDOM_MB * 1024 * 1024 / 1000);
        checkpoint;" >/dev/null
    DESC="random bytes ($RANDOM_MB MiB asked)"
else
    pgv_log "pgbench -i -s $SCALE"
    as_user "$BIN/pgbench" -h "$WORK/run" -p "$PORT" -i -s "$SCALE" -q postgres >/dev/null 2>&1
    as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$PORT" -d postgres -c checkpoint
    DESC="pgbench -s $SCALE"
fi
# let the archiver catch up with the load's WAL before anything is measured
seg="$(as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$PORT" -d postgres -c "select pg_walfile_name(pg_switch_wal())")"
for _ in $(seq 1 6000); do
    done_wal="$(as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$PORT" -d postgres -c "select coalesce(last_archived_wal, '') from pg_stat_archiver")"
    [[ "$done_wal" > "$seg" || "$done_wal" = "$seg" ]] && break
    sleep 0.1
done
SIZE_MB=$(($(du -sb --exclude=pg_wal "$D" | cut -f1) / 1048576))

PGVB=("$PGV" --repo "$WORK/repo-pgv" --stanza bench --catalog off --process-max "$PM")
PGBRB=(pgbackrest --config "$WORK/pgbr.conf" --stanza=bench --process-max="$PM")
BACKUP_PGV=(runuser -u "$U" -- "${PGVB[@]}" backup --type full --pgdata "$D" --pg-host "$WORK/run" --pg-port "$PORT" --start-fast)
BACKUP_PGBR=(runuser -u "$U" -- "${PGBRB[@]}" --type=full backup)
RESTORE_PGV=(runuser -u "$U" -- "${PGVB[@]}" restore --pgdata "$WORK/restore" --archive-mode off)
RESTORE_PGBR=(runuser -u "$U" -- "${PGBRB[@]}" --pg1-path="$WORK/restore" restore)
fresh() { rm -rf "$WORK/restore"; mkdir -p "$WORK/restore"; chown "$U" "$WORK/restore"; chmod 700 "$WORK/restore"; }

# under_vmstat NAME CMD...: run CMD with vmstat 1 beside it; print a summary
under_vmstat() {
    local name="$1" vpid
    shift
    pgv_drop_caches
    vmstat -n 1 >"$WORK/out/$name.vmstat" &
    vpid=$!
    /usr/bin/time -o "$WORK/out/$name.time" -f "%e %U %S %M" "$@" >/dev/null 2>"$WORK/out/$name.err" ||
        { kill "$vpid"; cat "$WORK/out/$name.err" >&2; pgv_die "$name failed"; }
    kill "$vpid"
    wait "$vpid" 2>/dev/null || true
    python3 - "$name" "$WORK/out/$name.vmstat" "$WORK/out/$name.time" "$SIZE_MB" "$(cut -d' ' -f1 /proc/loadavg)" <<'PY'
import sys
name, vm, tm, size, load = sys.argv[1:]
rows = [l.split() for l in open(vm) if l.split() and l.split()[0].isdigit()][1:]  # the first line is since boot
e, u, s, rss = open(tm).read().split()[-4:]
avg = lambda i: sum(float(r[i]) for r in rows) / max(len(rows), 1)
print(f"{name:24s} {float(e):6.2f} s  {int(size) / float(e):5.0f} MiB/s  tool CPU {float(u) + float(s):5.2f} s "
      f"(user {u}, sys {s}, {(float(u) + float(s)) / float(e):.2f} cores)  peak RSS {int(rss) // 1024} MiB  | machine: "
      f"us {avg(12):.0f} sy {avg(13):.0f} id {avg(14):.0f} wa {avg(15):.0f} st {avg(16):.0f} %, "
      f"disk in {avg(8) / 1024:.0f} MiB/s out {avg(9) / 1024:.0f} MiB/s, runnable {avg(0):.1f}, blocked {avg(1):.1f}; load {load}")
PY
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); $DESC ($SIZE_MB MiB without pg_wal), process-max $PM; pgvault git $(git -C "$ROOT" rev-parse --short HEAD)"
    echo
    echo "vmstat 1 beside each command (page cache dropped before each):"
    under_vmstat pgvault-backup "${BACKUP_PGV[@]}"
    under_vmstat pgbackrest-backup "${BACKUP_PGBR[@]}"
    fresh
    under_vmstat pgvault-restore "${RESTORE_PGV[@]}"
    fresh
    under_vmstat pgbackrest-restore "${RESTORE_PGBR[@]}"
    for op in backup restore; do
        if [ "$op" = backup ]; then cmd=("${BACKUP_PGV[@]}"); else cmd=("${RESTORE_PGV[@]}"); fi
        echo
        echo "pgvault $op, perf record -e cpu-clock (all its threads), top symbols:"
        [ "$op" = restore ] && fresh
        pgv_drop_caches
        perf record -q -e cpu-clock -F 999 -o "$WORK/out/perf-$op.data" -- "${cmd[@]}" >/dev/null 2>&1
        perf report -i "$WORK/out/perf-$op.data" --no-children --sort comm,dso,symbol --stdio >"$WORK/out/perf-$op.txt" 2>/dev/null || true
        grep -v '^#' "$WORK/out/perf-$op.txt" | grep -v '^$' | awk 'NR <= 20' || true
        echo "by thread (share of all samples):"
        perf report -i "$WORK/out/perf-$op.data" --no-children --sort pid --stdio 2>/dev/null |
            grep -v '^#' | grep -v '^$' | awk 'NR <= 8' || true
        echo
        echo "pgvault $op, strace -f -c -w (wall time in system calls, summed over threads):"
        [ "$op" = restore ] && fresh
        pgv_drop_caches
        strace -f -c -w -o "$WORK/out/strace-$op.txt" "${cmd[@]}" >/dev/null 2>&1
        awk 'NR <= 16' "$WORK/out/strace-$op.txt"
    done
} 2>&1 | tee -a "${BENCH_OUT:-/dev/null}"
