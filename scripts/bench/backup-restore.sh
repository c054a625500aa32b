#!/usr/bin/env bash
# Full backup and restore throughput: pgvault against pgBackRest 2.45 and the
# floors, on the same machine, data and settings, interleaved in one run.
#
#   scripts/bench/backup-restore.sh        (as root on Debian 12; installs what it needs)
#
# For each data set in BENCH_SETS (default "pgbench random": pgbench at
# BENCH_SCALE, default 50, e.g. 200 for ~3 GiB; and a table of random data
# that zstd compresses poorly, BENCH_RANDOM_MB, default 400), each round of
# BENCH_ROUNDS (default 1) and each process-max in BENCH_PROCESS_MAX
# (default "1 2"):
#   pgvault backup, pgBackRest backup --type=full, floor tar | zstd -3 + sync
#   pgvault restore, pgBackRest restore, floor zstd -d | tar x + sync
# with the page cache dropped before every timed command (root can), zstd
# level 3 everywhere. Throughput is the data directory's size over the wall
# time; peak RSS from /usr/bin/time; the 1-min load average before each
# command. Results: markdown tables on stdout (and in BENCH_OUT if set): every
# timed command, then the medians over the rounds and the ratios.
#
# BENCH_SETS may also name "many": a cluster of BENCH_TABLES (default 20000)
# small tables, each with a primary key and a TOAST table (four files a
# table, about 81,000 files at 20,000), for what costs per file: wall time
# and peak RSS against the file count. Keep BENCH_TABLES modest on a shared
# machine (creating 20,000 tables takes a minute or more).
#
# pgBackRest is measured twice (BENCH_PGBR_BUNDLE=1, the default): its repository
# 1 as it comes and its repository 2 with repo-bundle=y (small files packed
# into bundles, what pgBackRest advises for many small files); archive-push
# writes every segment to both. BENCH_PGBR_BUNDLE=0: repository 1 only.
#
# Restores also get the write floor issue 14 names: `cp -a` of a warm copy
# of the same data directory (pg_wal's contents left out, as restore leaves
# them out) + `sync -f` of the target; the copy is read once into the page
# cache right before (caches are not dropped for this one).
#
# BENCH_RANDOM_KIND=bytes (default): rows of gen_random_bytes(1000) (pgcrypto),
# stored uncompressed: zstd cannot shrink them at all. md5: rows of
# md5(random()) text (hex, no extension needed), stored uncompressed: zstd
# gets about 2:1 from the 16-symbol alphabet and nothing more. bytes falls
# back to md5 when pgcrypto is not installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

SCALE="${BENCH_SCALE:-50}"
RANDOM_MB="${BENCH_RANDOM_MB:-400}"
PMS="${BENCH_PROCESS_MAX:-1 2}"
SETS="${BENCH_SETS:-pgbench random}"
ROUNDS="${BENCH_ROUNDS:-1}"
RANDOM_KIND="${BENCH_RANDOM_KIND:-bytes}"
TABLES="${BENCH_TABLES:-20000}"
BUNDLE="${BENCH_PGBR_BUNDLE:-1}"
NICE="${BENCH_NICE:--10}"
case "$BUNDLE" in 0 | 1) ;; *) pgv_die "BENCH_PGBR_BUNDLE must be 0 or 1" ;; esac
case "$TABLES" in '' | *[!0-9]*) pgv_die "BENCH_TABLES must be a number" ;; esac
case "$RANDOM_KIND" in bytes | md5) ;; *) pgv_die "BENCH_RANDOM_KIND must be bytes or md5" ;; esac
BASE="${BENCH_DIR:-/var/tmp}"

pgv_bench_setup bench-br
mkdir -p "$WORK/run" "$WORK/pgbr-lock" "$WORK/pgbr-log" "$WORK/pgbr-spool"
chown "$U" "$WORK/run" "$WORK/pgbr-lock" "$WORK/pgbr-log" "$WORK/pgbr-spool"

CLUSTERS=()
# wait_archived PORT: switch WAL and wait until the archiver has pushed
# everything (the load just written is ~1 GiB of WAL per GiB of data: the
# first backup would otherwise also wait for that backlog, and compete with
# its archiving for the CPU)
wait_archived() {
    local port="$1" seg done_wal
    seg="$(as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$port" -d postgres -c "select pg_walfile_name(pg_switch_wal())")"
    for _ in $(seq 1 6000); do
        done_wal="$(as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$port" -d postgres -c "select coalesce(last_archived_wal, '') from pg_stat_archiver")"
        [[ "$done_wal" > "$seg" || "$done_wal" = "$seg" ]] && return 0
        sleep 0.1
    done
    pgv_die "the archiver did not catch up to $seg in 10 minutes"
}
cleanup() {
    local d
    for d in "${CLUSTERS[@]}"; do
        as_user "$BIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true
    done
    if [ "${KEEP:-0}" = 1 ]; then pgv_log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT


PRIO=()
[ "$NICE" = 0 ] || PRIO=(nice -n "$NICE" ionice -c 2 -n 0)
# timed LABEL CMD... -> appends "LABEL seconds maxrss_kb" to $WORK/times
# (TIMED_WARM=1: without dropping the page cache first)
timed() {
    local label="$1"
    shift
    [ "${TIMED_WARM:-0}" = 1 ] || pgv_drop_caches
    local load
    load="$(cut -d' ' -f1 /proc/loadavg)"
    "${PRIO[@]}" /usr/bin/time -o "$WORK/t.out" -f "%e %M %U %S" "$@" >"$WORK/cmd.log" 2>&1 ||
        { cat "$WORK/cmd.log" >&2; pgv_die "$label failed"; }
    echo "$label $(cat "$WORK/t.out") $load" >>"$WORK/times"
    pgv_log "  $label: $(cat "$WORK/t.out") (s, KiB, user s, sys s; load $load)"
}

# make_cluster NAME PORT: initdb + start, archiving to both tools' repositories.
make_cluster() {
    local name="$1" port="$2" d="$WORK/$1"
    mkdir -p "$d" "$WORK/repo-pgv-$name" "$WORK/repo-pgbr-$name" "$WORK/repo-pgbrb-$name"
    chown "$U" "$d" "$WORK/repo-pgv-$name" "$WORK/repo-pgbr-$name" "$WORK/repo-pgbrb-$name"
    chmod 700 "$d"
    as_user "$BIN/initdb" -D "$d/data" -A trust >/dev/null
    cat >"$WORK/pgbackrest-$name.conf" <<CONF
[global]
repo1-path=$WORK/repo-pgbr-$name
repo1-retention-full=99
$([ "$BUNDLE" = 1 ] && printf 'repo2-path=%s\nrepo2-retention-full=99\nrepo2-bundle=y\n' "$WORK/repo-pgbrb-$name")
compress-type=zst
compress-level=3
start-fast=y
lock-path=$WORK/pgbr-lock
log-path=$WORK/pgbr-log
spool-path=$WORK/pgbr-spool
log-level-console=warn
log-level-file=off

[$name]
pg1-path=$d/data
pg1-socket-path=$WORK/run
pg1-port=$port
pg1-user=$U
CONF
    chmod 644 "$WORK/pgbackrest-$name.conf"
    cat >>"$d/data/postgresql.conf" <<CONF
port = $port
listen_addresses = ''
unix_socket_directories = '$WORK/run'
archive_mode = on
archive_command = '$PGV --repo $WORK/repo-pgv-$name --stanza $name --catalog off archive-push %p && pgbackrest --config $WORK/pgbackrest-$name.conf --stanza=$name archive-push %p'
max_wal_size = '4GB'
autovacuum = off
CONF
    as_user "$PGV" --repo "$WORK/repo-pgv-$name" --stanza "$name" stanza-create --pgdata "$d/data" >/dev/null 2>&1
    as_user "$BIN/pg_ctl" -D "$d/data" -l "$WORK/run/$name.log" -w start >/dev/null
    CLUSTERS+=("$d/data")
    as_user pgbackrest --config "$WORK/pgbackrest-$name.conf" --stanza="$name" stanza-create >/dev/null
}

PORT1="$(pgv_free_port)"
PORT2="$(pgv_free_port)"
PORT3="$(pgv_free_port)"
if [[ " $SETS " == *" pgbench "* ]]; then
    make_cluster pgbench "$PORT1"
    pgv_log "pgbench -i -s $SCALE"
    as_user "$BIN/pgbench" -h "$WORK/run" -p "$PORT1" -i -s "$SCALE" -q postgres >/dev/null 2>&1
    as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$PORT1" -d postgres -c checkpoint
    pgv_log "waiting for the archiver to catch up"
    wait_archived "$PORT1"
fi

if [[ " $SETS " == *" random "* ]]; then
    make_cluster random "$PORT2"
    if [ "$RANDOM_KIND" = bytes ] && [ ! -f "$(as_user "$BIN/pg_config" --sharedir 2>/dev/null || echo /usr/share/postgresql/15)/extension/pgcrypto.control" ]; then
        pgv_log "pgcrypto is not installed: md5(random()) text instead of gen_random_bytes"
        RANDOM_KIND=md5
    fi
    pgv_log "random data ($RANDOM_KIND): $RANDOM_MB MiB"
    if [ "$RANDOM_KIND" = bytes ]; then
        sql="create extension pgcrypto;
            create table rnd(b bytea);
            alter table rnd alter column b set storage external;
            insert into rnd select gen_random_bytes(1000) from generate_series(1, $RANDOM_MB * 1024 * 1024 / 1000);"
    else
        # 31 md5 strings (992 hex characters) per row, stored as they are
        sql="create table rnd(t text);
            alter table rnd alter column t set storage external;
            insert into rnd select string_agg(md5(random()::text), '') from generate_series(1, $RANDOM_MB * 1024 * 1024 / 1000) g,
                generate_series(1, 31) k group by g;"
    fi
    as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$PORT2" -d postgres -c "$sql checkpoint;" >/dev/null
    pgv_log "waiting for the archiver to catch up"
    wait_archived "$PORT2"
fi

if [[ " $SETS " == *" many "* ]]; then
    make_cluster many "$PORT3"
    pgv_log "$TABLES small tables"
    pgv_small_tables "$WORK/run" "$PORT3" "$TABLES"
    as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$PORT3" -d postgres -c checkpoint
    pgv_log "$(find "$WORK/many/data" -type f | wc -l) files; waiting for the archiver to catch up"
    wait_archived "$PORT3"
fi

: >"$WORK/times"
for name in $SETS; do
    data="$WORK/$name/data"
    case "$name" in
        random) port=$PORT2 ;;
        many) port=$PORT3 ;;
        *) port=$PORT1 ;;
    esac
    size=$(du -sb --exclude=pg_wal "$data" | cut -f1)
    echo "size $name $size" >>"$WORK/times"
    echo "files $name $(find "$data" -type f -not -path "$data/pg_wal/*" | wc -l)" >>"$WORK/times"
    for round in $(seq 1 "$ROUNDS"); do
    for pm in $PMS; do
        tag="$pm/$round"
        pgv_log "$name, process-max $pm, round $round: backups"
        timed "pgvault-backup $name $tag" runuser -u "$U" -- "$PGV" --repo "$WORK/repo-pgv-$name" --stanza "$name" \
            --catalog off --process-max "$pm" backup --type full --pgdata "$data" --pg-host "$WORK/run" --pg-port "$port" --start-fast
        timed "pgbackrest-backup $name $tag" runuser -u "$U" -- pgbackrest --config "$WORK/pgbackrest-$name.conf" \
            --stanza="$name" --process-max="$pm" --type=full backup
        if [ "$BUNDLE" = 1 ]; then
            timed "pgbackrestbundle-backup $name $tag" runuser -u "$U" -- pgbackrest --config "$WORK/pgbackrest-$name.conf" \
                --stanza="$name" --repo=2 --process-max="$pm" --type=full backup
        fi
        timed "floor-backup $name $tag" sh -c "tar cf - -C '$data' --exclude=./pg_wal . | zstd -3 -q -c > '$WORK/floor.tar.zst' && sync '$WORK/floor.tar.zst'"

        pgv_log "$name, process-max $pm, round $round: restores"
        for t in pgvault pgbackrest pgbackrestbundle floor floorcp; do
            rm -rf "$WORK/restore-$t"
            mkdir -p "$WORK/restore-$t"
            chown "$U" "$WORK/restore-$t"
            chmod 700 "$WORK/restore-$t"
        done
        timed "pgvault-restore $name $tag" runuser -u "$U" -- "$PGV" --repo "$WORK/repo-pgv-$name" --stanza "$name" \
            --catalog off --process-max "$pm" restore --pgdata "$WORK/restore-pgvault" --archive-mode off
        timed "pgbackrest-restore $name $tag" runuser -u "$U" -- pgbackrest --config "$WORK/pgbackrest-$name.conf" \
            --stanza="$name" --process-max="$pm" --pg1-path="$WORK/restore-pgbackrest" restore
        if [ "$BUNDLE" = 1 ]; then
            timed "pgbackrestbundle-restore $name $tag" runuser -u "$U" -- pgbackrest --config "$WORK/pgbackrest-$name.conf" \
                --stanza="$name" --repo=2 --process-max="$pm" --pg1-path="$WORK/restore-pgbackrestbundle" restore
        fi
        timed "floor-restore $name $tag" sh -c "zstd -d -q -c '$WORK/floor.tar.zst' | tar xf - -C '$WORK/restore-floor' && sync -f '$WORK/restore-floor'"
        # the write floor: a warm copy of the data directory copied + synced
        rm -rf "$WORK/warm"
        mkdir -p "$WORK/warm"
        tar cf - -C "$data" --exclude=./pg_wal . | tar xf - -C "$WORK/warm"
        sync
        tar cf - -C "$WORK/warm" . >/dev/null
        rmdir "$WORK/restore-floorcp"
        TIMED_WARM=1 timed "floorcp-restore $name $tag" sh -c "cp -a '$WORK/warm' '$WORK/restore-floorcp' && sync -f '$WORK/restore-floorcp'"
        rm -rf "$WORK/restore-pgvault" "$WORK/restore-pgbackrest" "$WORK/restore-pgbackrestbundle" "$WORK/restore-floor" \
            "$WORK/restore-floorcp" "$WORK/warm" "$WORK/floor.tar.zst"
    done
    done
done

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); settings: BENCH_SETS='$SETS' BENCH_TABLES=$TABLES BENCH_PGBR_BUNDLE=$BUNDLE BENCH_NICE=$NICE BENCH_SCALE=$SCALE BENCH_RANDOM_MB=$RANDOM_MB BENCH_RANDOM_KIND=$RANDOM_KIND BENCH_PROCESS_MAX='$PMS' BENCH_ROUNDS=$ROUNDS"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
    echo "versions: $("$PGV" --version) (git $(git -C "$ROOT" rev-parse --short HEAD)), $(pgbackrest version), $(zstd -V | sed 's/^\*\*\* //; s/ \*\*\*$//'), $("$BIN/postgres" --version)"
    echo
    python3 - "$WORK/times" <<'PY'
import sys, collections, statistics
size = {}
files = {}
rows = collections.defaultdict(lambda: collections.defaultdict(list))
every = []
for line in open(sys.argv[1]):
    p = line.split()
    if p[0] == "size":
        size[p[1]] = int(p[2])
        continue
    if p[0] == "files":
        files[p[1]] = int(p[2])
        continue
    label, name, pmr, secs, rss, usr, sys_, load = p[0], p[1], p[2], float(p[3]), int(p[4]), float(p[5]), float(p[6]), p[7]
    pm, rnd = pmr.split("/")
    tool, op = label.rsplit("-", 1)
    rows[(op, name, pm)][tool].append((secs, rss))
    every.append((op, name, pm, rnd, tool, secs, rss, usr + sys_, load))
print("Every timed command:")
print()
print("| operation | data | process-max | round | tool | s | MiB/s | peak RSS MiB | CPU s (user+sys) | 1-min load before |")
print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|")
for op, name, pm, rnd, tool, secs, rss, cpu, load in sorted(every, key=lambda e: (e[0], e[1], e[2], e[3])):
    print(f"| {op} | {name} | {pm} | {rnd} | {tool} | {secs:.2f} | {size[name] / 1048576 / secs:.0f} | {rss / 1024:.0f} | {cpu:.1f} | {load} |")
print()
print("Medians over the rounds (peak RSS: the largest):")
print()
print("| operation | data | process-max | pgvault s, MiB/s (peak RSS) | pgBackRest s, MiB/s (peak RSS) | pgBackRest repo-bundle=y s, MiB/s (peak RSS) | floor s, MiB/s | cp -a + sync s | pgvault / pgBackRest (speed) | pgvault / floor (speed) | pgvault time / cp -a + sync time |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for (op, name, pm), t in sorted(rows.items()):
    mib = size[name] / 1048576
    secs = {k: statistics.median(s for s, _ in v) for k, v in t.items()}
    rate = {k: mib / v for k, v in secs.items()}
    rss = {k: max(r for _, r in v) // 1024 for k, v in t.items()}
    def cell(k):
        return f"{secs[k]:.2f}, {rate[k]:.0f} ({rss[k]} MiB)" if k in secs else "–"
    bundle = f" ({rate['pgvault'] / rate['pgbackrestbundle']:.2f}× bundle)" if "pgbackrestbundle" in rate else ""
    floorcp = f"{secs['floorcp']:.2f}" if "floorcp" in secs else "–"
    cp = f"{secs['pgvault'] / secs['floorcp']:.2f}×" if "floorcp" in secs else "–"
    print(f"| {op} | {name} ({mib:.0f} MiB, {files.get(name, 0)} files) | {pm} | {cell('pgvault')} | {cell('pgbackrest')} | "
          f"{cell('pgbackrestbundle')} | {secs['floor']:.2f}, {rate['floor']:.0f} | {floorcp} | "
          f"{rate['pgvault'] / rate['pgbackrest']:.2f}×{bundle} | {rate['pgvault'] / rate['floor']:.2f}× | {cp} |")
PY
} | tee -a "${BENCH_OUT:-/dev/null}"
