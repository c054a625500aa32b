#!/usr/bin/env bash
# Incremental backups (issue 10): pgvault --type incr against pgBackRest 2.45
# block incremental and PostgreSQL 17's pg_basebackup --incremental, on the
# same pgbench data with the same ~1 % of blocks changed between backups,
# interleaved in one run, page cache dropped before every timed command.
#
#   scripts/bench/incr.sh           (as root on Debian 12; BENCH_PART=incr scripts/bench.sh)
#
# Options (environment):
#   BENCH_SCALE=200        pgbench scale of both clusters
#   BENCH_INCRS=7          incremental backups in the chain
#   BENCH_PROCESS_MAX=2    pgvault's and pgBackRest's process-max
#   BENCH_RESTORE_ROUNDS=1 rounds of the restores (the order of the four
#                          restores reversed every other round); medians
#   BENCH_NICE=-10         nice of the timed commands (with ionice -c2 -n0); 0 = none
#   BENCH_DIR=/var/tmp     where everything lives (one disk)
#   BENCH_OUT=FILE         also append the result tables (markdown) to FILE
#   KEEP=1                 keep the temporary directory
#
# Two clusters, loaded alike with `pgbench -i -s SCALE`:
#   c15  PostgreSQL 15 (Debian), archive_command = pgvault archive-push &&
#        pgbackrest archive-push (pgvault finds changed blocks in the WAL it
#        archives; pgBackRest 2.45 does not know PostgreSQL 17)
#   c17  PostgreSQL 17 (scripts/fetch-pg.sh 17), summarize_wal = on, no
#        archiving (pg_basebackup -X none: the WAL is not part of any of the
#        three backups)
# Then: a full backup by each tool; BENCH_INCRS times: the same UPDATE of
# ~1 % of pgbench_accounts' blocks on both clusters (`WHERE aid % 5000 = i`),
# a CHECKPOINT, c15's WAL archived, then an incremental by each tool; then a
# second full backup of the same data as the last incremental. Restores:
# the first full, full + 1 incremental, full + BENCH_INCRS incrementals, and
# the second full (same data as full + BENCH_INCRS); pg_basebackup's by
# pg_combinebackup (which fsyncs, like the other two), the full ones too.
#
# Per timed command: wall time, peak RSS and blocks read (/usr/bin/time: %M,
# %I, children included; pgBackRest's local processes are its children);
# for pg_basebackup also the walsender's read_bytes and peak RSS (it is the
# server that reads the data directory: scripts/bench/walsender-poll.py);
# bytes the backup added to its repository (du of the backup directory
# before and after; archived WAL not counted).
#   pgvault:    --process-max P, zstd 3 (its default for backups)
#   pgBackRest: beta=y repo1-bundle=y repo1-block=y compress-type=zst
#               compress-level=3 process-max=P start-fast=y, --type=incr
#   pg_basebackup: -c fast -X none, plain format (stored uncompressed),
#               --incremental=PREVIOUS/backup_manifest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

SCALE="${BENCH_SCALE:-200}"
INCRS="${BENCH_INCRS:-7}"
PM="${BENCH_PROCESS_MAX:-2}"
RROUNDS="${BENCH_RESTORE_ROUNDS:-1}"
NICE="${BENCH_NICE:--10}"
BASE="${BENCH_DIR:-/var/tmp}"
case "$SCALE$INCRS$PM$RROUNDS" in *[!0-9]*) pgv_die "BENCH_SCALE, BENCH_INCRS and BENCH_PROCESS_MAX must be numbers" ;; esac
[ "$INCRS" -ge 1 ] || pgv_die "BENCH_INCRS must be at least 1"
[ "$(id -u)" = 0 ] || pgv_die "run as root"

pgv_bench_setup bench-incr
BIN17="$("$ROOT/scripts/fetch-pg.sh" 17)"
RUN="$WORK/run"
mkdir -p "$RUN" "$WORK/pgbr-lock" "$WORK/pgbr-log" "$WORK/pgbr-spool" "$WORK/repo-pgv" "$WORK/repo-pgbr" "$WORK/pgbb"
chown "$U" "$RUN" "$WORK/pgbr-lock" "$WORK/pgbr-log" "$WORK/pgbr-spool" "$WORK/repo-pgv" "$WORK/repo-pgbr" "$WORK/pgbb"
export XDG_STATE_HOME="$WORK/state"
PRIO=()
[ "$NICE" = 0 ] || PRIO=(nice -n "$NICE" ionice -c 2 -n 0)

C15="$WORK/c15"
C17="$WORK/c17"
CLUSTERS=()
POLLER=""
cleanup() {
    local rc=$? d
    [ -z "$POLLER" ] || kill "$POLLER" 2>/dev/null || true
    for d in "${CLUSTERS[@]}"; do
        if [ -f "$d/postmaster.pid" ]; then
            case "$d" in
                "$C17") as_user "$BIN17/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true ;;
                *) as_user "$BIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true ;;
            esac
        fi
    done
    if [ "${KEEP:-0}" = 1 ]; then pgv_log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

P15="$(pgv_free_port)"
P17="$(pgv_free_port)"
cat >"$WORK/pgbackrest.conf" <<CONF
[global]
repo1-path=$WORK/repo-pgbr
repo1-retention-full=99
repo1-bundle=y
repo1-block=y
beta=y
compress-type=zst
compress-level=3
process-max=$PM
start-fast=y
lock-path=$WORK/pgbr-lock
log-path=$WORK/pgbr-log
spool-path=$WORK/pgbr-spool
log-level-console=warn
log-level-file=off

[c15]
pg1-path=$C15
pg1-socket-path=$RUN
pg1-port=$P15
pg1-user=$U
CONF
chmod 644 "$WORK/pgbackrest.conf"
PGBR=(pgbackrest --config "$WORK/pgbackrest.conf" --stanza=c15)
PGVR=("$PGV" --repo "$WORK/repo-pgv" --stanza c15 --catalog off)

pgv_log "initdb: PostgreSQL 15 ($C15) and 17 ($C17)"
for d in "$C15" "$C17"; do
    mkdir -p "$d"
    chown "$U" "$d"
    chmod 700 "$d"
done
as_user "$BIN/initdb" -D "$C15" -A trust >/dev/null
as_user "$BIN17/initdb" -D "$C17" -A trust >/dev/null
cat >>"$C15/postgresql.conf" <<CONF
port = $P15
listen_addresses = ''
unix_socket_directories = '$RUN'
archive_mode = on
archive_command = '${PGVR[*]} archive-push %p && ${PGBR[*]} archive-push %p'
max_wal_size = '4GB'
autovacuum = off
CONF
cat >>"$C17/postgresql.conf" <<CONF
port = $P17
listen_addresses = ''
unix_socket_directories = '$RUN'
summarize_wal = on
max_wal_size = '4GB'
autovacuum = off
CONF
as_user "${PGVR[@]}" stanza-create --pgdata "$C15" >/dev/null
as_user "$BIN/pg_ctl" -D "$C15" -l "$RUN/c15.log" -w start >/dev/null
CLUSTERS+=("$C15")
as_user "${PGBR[@]}" stanza-create >/dev/null
as_user "$BIN17/pg_ctl" -D "$C17" -l "$RUN/c17.log" -w start >/dev/null
CLUSTERS+=("$C17")
psql15() { as_user "$BIN/psql" -XAtq -h "$RUN" -p "$P15" -d postgres "$@"; }
psql17() { as_user "$BIN17/psql" -XAtq -h "$RUN" -p "$P17" -d postgres "$@"; }

# wait_archived: switch c15's WAL and wait until its archiver has pushed it
# (to both repositories)
wait_archived() {
    local seg done_wal
    seg="$(psql15 -c "select pg_walfile_name(pg_switch_wal())")"
    for _ in $(seq 1 6000); do
        done_wal="$(psql15 -c "select coalesce(last_archived_wal, '') from pg_stat_archiver")"
        [[ "$done_wal" > "$seg" || "$done_wal" = "$seg" ]] && return 0
        sleep 0.1
    done
    pgv_die "the archiver did not catch up to $seg in 10 minutes"
}

pgv_log "pgbench -i -s $SCALE on both"
as_user "$BIN/pgbench" -h "$RUN" -p "$P15" -i -s "$SCALE" -q postgres >"$WORK/init15.log" 2>&1 ||
    { tail "$WORK/init15.log" >&2; pgv_die "pgbench -i (15) failed"; }
as_user "$BIN17/pgbench" -h "$RUN" -p "$P17" -i -s "$SCALE" -q postgres >"$WORK/init17.log" 2>&1 ||
    { tail "$WORK/init17.log" >&2; pgv_die "pgbench -i (17) failed"; }
psql15 -c checkpoint
psql17 -c checkpoint
pgv_log "waiting for c15's archiver"
wait_archived

# timed LABEL CMD...: appends "LABEL secs rss_kib read_bytes cpu_s load" to $WORK/times
timed() {
    local label="$1" load
    shift
    pgv_drop_caches
    # the programs themselves back into the cache: what is read is data and
    # repository, not a 100 MiB binary with its debug information
    cat "$PGV" "$(command -v pgbackrest)" "$BIN17/pg_basebackup" "$BIN17/pg_combinebackup" >/dev/null
    load="$(cut -d' ' -f1 /proc/loadavg)"
    "${PRIO[@]}" /usr/bin/time -o "$WORK/t.out" -f "%e %M %I %U %S" "$@" >"$WORK/cmd.log" 2>&1 ||
        { cat "$WORK/cmd.log" >&2; pgv_die "$label failed"; }
    read -r secs rss inb usr sys <"$WORK/t.out"
    echo "$label $secs $rss $((inb * 512)) $(awk "BEGIN {print $usr + $sys}") $load" >>"$WORK/times"
    pgv_log "  $label: ${secs}s, peak RSS ${rss} KiB, read $((inb * 512 / 1048576)) MiB (load $load)"
}
# timed_pgbb LABEL CMD...: timed, plus the walsender's reads and peak RSS
timed_pgbb() {
    local label="$1" pmpid
    pmpid="$(head -1 "$C17/postmaster.pid")"
    python3 "$ROOT/scripts/bench/walsender-poll.py" "$pmpid" "$WORK/ws.out" &
    POLLER=$!
    sleep 0.2
    timed "$@"
    kill "$POLLER"
    wait "$POLLER" || true
    POLLER=""
    echo "walsender $label $(cat "$WORK/ws.out")" >>"$WORK/times"
}
# added LABEL DIR BEFORE: bytes DIR grew by since BEFORE
added() { echo "added $1 $(($(du -sb "$2" | cut -f1) - $3))" >>"$WORK/times"; }
size_of() { du -sb "$1" | cut -f1; }

: >"$WORK/times"
echo "size $(du -sb --exclude=pg_wal "$C15" | cut -f1) $(du -sb --exclude=pg_wal "$C17" | cut -f1)" >>"$WORK/times"
newest_pgv() { ls -t "$WORK/repo-pgv/c15/backup" | head -1; }
newest_pgbr() { as_user "${PGBR[@]}" info --output=json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["backup"][-1]["label"])'; }

# backups KIND N: one backup by each tool; KIND full|incr, N its index
PGV_LABELS=()
PGBR_LABELS=()
PGBB_DIRS=()
backups() {
    local kind="$1" n="$2" before prev
    pgv_log "backups: $kind $n"
    before="$(size_of "$WORK/repo-pgv/c15/backup" 2>/dev/null || echo 0)"
    timed "pgvault $kind $n" runuser -u "$U" -- "${PGVR[@]}" --process-max "$PM" backup --type "$kind" \
        --pgdata "$C15" --pg-host "$RUN" --pg-port "$P15" --start-fast
    grep -i "falling back\|taking a full" "$WORK/cmd.log" >&2 || true
    added "pgvault $kind $n" "$WORK/repo-pgv/c15/backup" "$before"
    PGV_LABELS+=("$(newest_pgv)")
    before="$(size_of "$WORK/repo-pgbr/backup/c15")"
    timed "pgbackrest $kind $n" runuser -u "$U" -- "${PGBR[@]}" --type="$kind" backup
    added "pgbackrest $kind $n" "$WORK/repo-pgbr/backup/c15" "$before"
    PGBR_LABELS+=("$(newest_pgbr)")
    before="$(size_of "$WORK/pgbb")"
    local dir="$WORK/pgbb/$n-$kind" inc=()
    if [ "$kind" = incr ]; then
        prev="${PGBB_DIRS[${#PGBB_DIRS[@]} - 1]}"
        inc=(--incremental="$prev/backup_manifest")
    fi
    timed_pgbb "pg_basebackup $kind $n" runuser -u "$U" -- "$BIN17/pg_basebackup" -h "$RUN" -p "$P17" \
        -D "$dir" -c fast -X none "${inc[@]}"
    added "pg_basebackup $kind $n" "$WORK/pgbb" "$before"
    PGBB_DIRS+=("$dir")
}

backups full 0
for i in $(seq 1 "$INCRS"); do
    pgv_log "update $i: ~1 % of pgbench_accounts' blocks"
    psql15 -c "update pgbench_accounts set abalance = abalance + 1 where aid % 5000 = $((i % 5000))" -c checkpoint
    psql17 -c "update pgbench_accounts set abalance = abalance + 1 where aid % 5000 = $((i % 5000))" -c checkpoint
    wait_archived
    backups incr "$i"
done
backups full $((INCRS + 1))
echo "labels pgvault ${PGV_LABELS[*]}" >>"$WORK/times"
echo "labels pgbackrest ${PGBR_LABELS[*]}" >>"$WORK/times"

# restores WHAT INDEX: restore backup INDEX of the list (0 = first full, 1 =
# first incremental, ..., INCRS + 1 = second full) with each tool
restores() {
    local what="$1" k="$2" t
    pgv_log "restores: $what"
    for t in pgvault pgbackrest; do
        rm -rf "$WORK/restore-$t"
        mkdir -p "$WORK/restore-$t"
        chown "$U" "$WORK/restore-$t"
        chmod 700 "$WORK/restore-$t"
    done
    # pg_combinebackup creates its output directory itself
    mkdir -p "$WORK/restore-pgbb"
    chown "$U" "$WORK/restore-pgbb"
    timed "pgvault restore $what" runuser -u "$U" -- "${PGVR[@]}" --process-max "$PM" restore \
        --set "${PGV_LABELS[$k]}" --pgdata "$WORK/restore-pgvault" --archive-mode off
    rm -rf "$WORK/restore-pgvault"
    timed "pgbackrest restore $what" runuser -u "$U" -- "${PGBR[@]}" --set="${PGBR_LABELS[$k]}" \
        --pg1-path="$WORK/restore-pgbackrest" restore
    rm -rf "$WORK/restore-pgbackrest"
    local chain=()
    if [ "$k" = $((INCRS + 1)) ]; then
        chain=("${PGBB_DIRS[$k]}")
    else
        chain=("${PGBB_DIRS[@]:0:$((k + 1))}")
    fi
    timed "pg_combinebackup restore $what" runuser -u "$U" -- "$BIN17/pg_combinebackup" -o "$WORK/restore-pgbb/data" "${chain[@]}"
    rm -rf "$WORK/restore-pgbb"
}
for r in $(seq 1 "$RROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
        restores full 0
        restores full+1 1
        restores "full+$INCRS" "$INCRS"
        restores full-same-data $((INCRS + 1))
    else
        restores full-same-data $((INCRS + 1))
        restores "full+$INCRS" "$INCRS"
        restores full+1 1
        restores full 0
    fi
done

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); BENCH_SCALE=$SCALE BENCH_INCRS=$INCRS BENCH_PROCESS_MAX=$PM BENCH_RESTORE_ROUNDS=$RROUNDS BENCH_NICE=$NICE"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
    echo "versions: $("$PGV" --version) (git $(git -C "$ROOT" rev-parse --short HEAD)), $(pgbackrest version), $("$BIN/postgres" --version), $("$BIN17/postgres" --version)"
    echo
    python3 "$ROOT/scripts/bench/incr-report.py" "$WORK/times" "$INCRS"
} | tee -a "${BENCH_OUT:-/dev/null}"
