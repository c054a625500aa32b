#!/usr/bin/env bash
# expire and info on a large repository in S3 (issue 14): a cluster of
# BENCH_TABLES small tables (default 20,000: ~81,000 files), BENCH_BACKUPS
# (default 10) full backups of it into moto's S3 server, then timed (wall,
# peak RSS; /usr/bin/time):
#   info (text), info --output json, verify, expire --retention-full 1
#   (deleting all but the newest backup and the WAL only they needed),
#   info again
# with the number of objects in the bucket before and after expire (listed
# with boto3, untimed). moto runs on a free loopback port of its own and is
# stopped at the end, with the cluster.
#
#   scripts/bench/s3-expire.sh      (as root; BENCH_PART=s3expire scripts/bench.sh)
#
# Options: BENCH_TABLES=20000 BENCH_BACKUPS=10 BENCH_PROCESS_MAX=2
# BENCH_NICE=-10 BENCH_DIR=/var/tmp BENCH_OUT=FILE KEEP=1
# BENCH_MOTO_LOG=FILE (keep moto's request log there)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

TABLES="${BENCH_TABLES:-20000}"
BACKUPS="${BENCH_BACKUPS:-10}"
PM="${BENCH_PROCESS_MAX:-2}"
NICE="${BENCH_NICE:--10}"
BASE="${BENCH_DIR:-/var/tmp}"
case "$TABLES$BACKUPS$PM" in *[!0-9]*) pgv_die "BENCH_TABLES, BENCH_BACKUPS and BENCH_PROCESS_MAX must be numbers" ;; esac
[ "$(id -u)" = 0 ] || pgv_die "run as root"

pgv_bench_setup bench-s3
pgv_ensure_moto
PGDATA="$WORK/data"
RUN="$WORK/run"
mkdir -p "$PGDATA" "$RUN" "$WORK/state"
chown "$U" "$PGDATA" "$RUN" "$WORK/state"
chmod 700 "$PGDATA"
PRIO=()
[ "$NICE" = 0 ] || PRIO=(nice -n "$NICE" ionice -c 2 -n 0)

CUR=""
cleanup() {
    local rc=$? pid
    if [ -n "$CUR" ] && [ -f "$CUR/postmaster.pid" ]; then
        as_user "$BIN/pg_ctl" -D "$CUR" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    for pid in "${PGV_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    # moto's request log (one line per request, with its time): where a
    # command's time went
    [ -z "${BENCH_MOTO_LOG:-}" ] || cp "$WORK/moto/moto.log" "$BENCH_MOTO_LOG" 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then pgv_log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PGV_PIDS=()
pgv_start_moto "$WORK/moto"
PREFIX="bench-$(basename "$WORK")"
# pgvault against moto, for root and for the archiver alike
cat >"$WORK/pgv" <<SH
#!/bin/sh
export AWS_ACCESS_KEY_ID='$PGV_S3_ACCESS_KEY' AWS_SECRET_ACCESS_KEY='$PGV_S3_SECRET_KEY' XDG_STATE_HOME='$WORK/state'
exec '$PGV' --repo 's3://$PGV_S3_BUCKET/$PREFIX' --s3-endpoint '$PGV_MOTO_URL' --s3-region '$PGV_S3_REGION' \\
    --s3-allow-http true --s3-atomic-create false --stanza many --catalog off "\$@"
SH
chmod 755 "$WORK/pgv"
count_objects() {
    AWS_ACCESS_KEY_ID="$PGV_S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$PGV_S3_SECRET_KEY" \
        "$PGV_MOTO_PY" - "$PGV_MOTO_URL" "$PGV_S3_BUCKET" "$PREFIX/" "$PGV_S3_REGION" <<'EOF'
import sys, boto3
url, bucket, prefix, region = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=url, region_name=region)
n = size = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
    for o in page.get("Contents", []):
        n += 1
        size += o["Size"]
print(n, size)
EOF
}

PORT="$(pgv_free_port)"
as_user "$BIN/initdb" -D "$PGDATA" -A trust >/dev/null
cat >>"$PGDATA/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$RUN'
archive_mode = on
archive_command = '$WORK/pgv archive-push %p'
max_wal_size = '4GB'
autovacuum = off
CONF
as_user "$WORK/pgv" stanza-create --pgdata "$PGDATA" >/dev/null
as_user "$BIN/pg_ctl" -D "$PGDATA" -l "$RUN/pg.log" -w start >/dev/null
CUR="$PGDATA"
psql1() { as_user "$BIN/psql" -XAtq -h "$RUN" -p "$PORT" -d postgres "$@"; }
pgv_log "$TABLES small tables"
for first in $(seq 0 500 $((TABLES - 1))); do
    last=$((first + 499 < TABLES - 1 ? first + 499 : TABLES - 1))
    psql1 -c "do \$\$ begin
        for i in $first..$last loop
            execute format('create table m_%s (id int primary key, v text)', i);
            execute format('insert into m_%s values (1, ''x'')', i);
        end loop; end \$\$" >/dev/null
done
psql1 -c checkpoint
FILES="$(find "$PGDATA" -type f -not -path "$PGDATA/pg_wal/*" | wc -l)"
SIZE="$(du -sb --exclude=pg_wal "$PGDATA" | cut -f1)"
pgv_log "$FILES files"

: >"$WORK/times"
timed() {
    local label="$1" load
    shift
    load="$(cut -d' ' -f1 /proc/loadavg)"
    "${PRIO[@]}" /usr/bin/time -o "$WORK/t.out" -f "%e %M" "$@" >"$WORK/cmd.log" 2>&1 ||
        { tail -20 "$WORK/cmd.log" >&2; pgv_die "$label failed"; }
    echo "$label|$(cat "$WORK/t.out")|$load" >>"$WORK/times"
    pgv_log "  $label: $(cat "$WORK/t.out") (s, KiB; load $load; ended $(date -u +%T))"
}
for i in $(seq 1 "$BACKUPS"); do
    timed "backup $i" runuser -u "$U" -- "$WORK/pgv" --process-max "$PM" backup --type full \
        --pgdata "$PGDATA" --pg-host "$RUN" --pg-port "$PORT" --start-fast
done
before="$(count_objects)"
timed "info" "$WORK/pgv" info
cp "$WORK/cmd.log" "$WORK/info-before.txt"
timed "info --output json" "$WORK/pgv" info --output json
timed "verify" "$WORK/pgv" --process-max "$PM" verify
timed "expire --retention-full 1" "$WORK/pgv" expire --retention-full 1
after="$(count_objects)"
timed "info (after expire)" "$WORK/pgv" info
moto_rss="$(ps -o rss= -p "${PGV_PIDS[0]}" | tr -d ' ')"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); BENCH_TABLES=$TABLES BENCH_BACKUPS=$BACKUPS BENCH_PROCESS_MAX=$PM BENCH_NICE=$NICE"
    echo "versions: $("$PGV" --version) (git $(git -C "$ROOT" rev-parse --short HEAD)), moto $("$PGV_MOTO_PY" -c 'import moto; print(moto.__version__)'), $("$BIN/postgres" --version)"
    echo "cluster: $TABLES tables, $FILES files, $((SIZE / 1048576)) MiB without pg_wal"
    echo "objects under the repository prefix: before expire $before (count, bytes); after $after; moto's RSS at the end ${moto_rss} KiB"
    echo
    echo "| command | s | peak RSS MiB | 1-min load before |"
    echo "|---|---:|---:|---:|"
    while IFS='|' read -r label t load; do
        read -r secs rss <<<"$t"
        echo "| $label | $secs | $((rss / 1024)) | $load |"
    done <"$WORK/times"
} | tee -a "${BENCH_OUT:-/dev/null}"
