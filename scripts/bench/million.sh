#!/usr/bin/env bash
# A cluster of about a million files (issue 14's memory target: peak RSS
# <= 64 MiB at 1,000,000 files): BENCH_TABLES (default 250000: 1,000,968
# files) small tables of four files each, full backup, verify and restore by pgvault, and backup
# and restore by pgBackRest 2.45 with repo-bundle=y (and without it with
# BENCH_PGBR_PLAIN=1), wall time and peak RSS (/usr/bin/time -f "%e %M").
#
# The file system under /var/tmp on the machine this was written for is
# mounted with `discard` and unlinks ~300 files a second, so the cluster,
# its repositories and every restore live on loop-mounted ext4 images
# without discard; a restored tree is dropped with umount + rm of its image.
#
# With BENCH_KIND=pgbench the cluster is instead pgbench at BENCH_SCALE
# (default 1000, about 15 GB: issue 14's large-database part; give it
# BENCH_IMG_GB=45 BENCH_RESTORE_IMG_GB=25), the same timed commands.
#
#   BENCH_STEP=setup scripts/bench/million.sh     make WORK, the cluster, the
#                                                 stanzas; prints WORK (cluster
#                                                 left running)
#   BENCH_WORK=WORK BENCH_STEP=run scripts/bench/million.sh
#                                                 the timed commands; BENCH_TOOLS
#                                                 picks them (default "pgvault
#                                                 pgbackrest"); BENCH_PGV=BINARY
#                                                 measures another pgvault build;
#                                                 "floor" times the write floor
#                                                 (cp -a of a warm copy + sync)
#   BENCH_WORK=WORK BENCH_STEP=clean scripts/bench/million.sh
#                                                 stop the cluster, unmount, remove
#
# Options: BENCH_TABLES=250000 BENCH_PROCESS_MAX=2 BENCH_NICE=-10
# BENCH_DIR=/var/tmp BENCH_IMG_GB=30 (cluster image) BENCH_RESTORE_IMG_GB=20
# BENCH_PGBR_PLAIN=0. Results: "label seconds KiB user sys load" lines
# appended to WORK/times.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

STEP="${BENCH_STEP:-}"
TABLES="${BENCH_TABLES:-250000}"
KIND="${BENCH_KIND:-tables}"
SCALE="${BENCH_SCALE:-1000}"
case "$KIND" in tables | pgbench) ;; *) pgv_die "BENCH_KIND must be tables or pgbench" ;; esac
PM="${BENCH_PROCESS_MAX:-2}"
NICE="${BENCH_NICE:--10}"
BASE="${BENCH_DIR:-/var/tmp}"
IMG_GB="${BENCH_IMG_GB:-30}"
RIMG_GB="${BENCH_RESTORE_IMG_GB:-20}"
PLAIN="${BENCH_PGBR_PLAIN:-0}"
TOOLS="${BENCH_TOOLS:-pgvault pgbackrest}"
case "$TABLES$SCALE$PM$IMG_GB$RIMG_GB" in *[!0-9]*) pgv_die "BENCH_TABLES, BENCH_PROCESS_MAX and the image sizes must be numbers" ;; esac
[ "$(id -u)" = 0 ] || pgv_die "run as root (loop mounts, dropping caches)"
U="$PGV_TEST_USER"
BIN="$PGV_PGBIN"
PRIO=()
[ "$NICE" = 0 ] || PRIO=(nice -n "$NICE" ionice -c 2 -n 0)

# mkimg IMG MOUNTPOINT GB: an ext4 image mounted without discard, one inode
# per 8 KiB (a million small files need more inodes than mkfs's default)
mkimg() {
    truncate -s "$3G" "$1"
    mkfs.ext4 -q -F -i 8192 "$1"
    mkdir -p "$2"
    mount -o loop,nodiscard "$1" "$2"
}
dropimg() {
    if mountpoint -q "$2"; then umount "$2"; fi
    rm -f "$1"
}

setup() {
    # what pgv_bench_setup does, but the release build after the tables are
    # made (they take the longest and need no pgvault)
    pgv_ensure_tools
    pgv_ensure_postgres
    pgv_ensure_user
    pgv_apt_install pgbackrest time e2fsprogs
    mkdir -p "$BASE"
    WORK="$(mktemp -d "$BASE/pgvault-bench-million.XXXXXX")"
    chmod 755 "$WORK"
    PGV="$WORK/pgvault"
    pgv_log "WORK=$WORK"
    mkimg "$WORK/data.img" "$WORK/d" "$IMG_GB"
    D="$WORK/d"
    mkdir -p "$D/data" "$D/repo-pgv" "$D/repo-pgbr" "$D/repo-pgbrb" "$WORK/run" "$WORK/pgbr-lock" "$WORK/pgbr-log" "$WORK/pgbr-spool" "$WORK/state"
    chown "$U" "$D" "$D/data" "$D/repo-pgv" "$D/repo-pgbr" "$D/repo-pgbrb" "$WORK/run" "$WORK/pgbr-lock" "$WORK/pgbr-log" "$WORK/pgbr-spool" "$WORK/state"
    chmod 700 "$D/data"
    as_user "$BIN/initdb" -D "$D/data" -A trust >/dev/null
    PORT="$(pgv_free_port)"
    echo "$PORT" >"$WORK/port"
    cat >"$WORK/pgbackrest.conf" <<CONF
[global]
repo1-path=$D/repo-pgbrb
repo1-retention-full=99
repo1-bundle=y
$([ "$PLAIN" = 1 ] && printf 'repo2-path=%s\nrepo2-retention-full=99\n' "$D/repo-pgbr")
compress-type=zst
compress-level=3
start-fast=y
lock-path=$WORK/pgbr-lock
log-path=$WORK/pgbr-log
spool-path=$WORK/pgbr-spool
log-level-console=warn
log-level-file=off

[many]
pg1-path=$D/data
pg1-socket-path=$WORK/run
pg1-port=$PORT
pg1-user=$U
CONF
    chmod 644 "$WORK/pgbackrest.conf"
    # Creating the tables: WAL not archived (nothing before the backups is
    # needed), no fsync (setup only; `sync` and a checkpoint with fsync on
    # follow).
    cat >>"$D/data/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$WORK/run'
archive_mode = on
archive_command = '/bin/true'
max_wal_size = '4GB'
autovacuum = off
fsync = off
synchronous_commit = off
CONF
    as_user "$BIN/pg_ctl" -D "$D/data" -l "$WORK/run/pg.log" -w start >/dev/null
    if [ "$KIND" = pgbench ]; then
        pgv_log "pgbench -i -s $SCALE ($(date -u +%H:%M:%S))"
        as_user "$BIN/pgbench" -h "$WORK/run" -p "$PORT" -i -s "$SCALE" -q postgres >/dev/null 2>&1
    else
        pgv_log "$TABLES small tables ($(date -u +%H:%M:%S))"
        pgv_small_tables "$WORK/run" "$PORT" "$TABLES"
    fi
    pgv_log "cluster made ($(date -u +%H:%M:%S))"
    # Stopped while fsync is still off, then synced: a checkpoint after
    # turning fsync on would fsync every file written since the last one,
    # a million of them at ~500 a second on this machine.
    as_user "$BIN/pg_ctl" -D "$D/data" -m fast -w -t 600 stop >/dev/null
    sync
    # the setup's binary copy is what `run` measures unless BENCH_PGV says otherwise
    (cd "$ROOT" && cargo build --release --quiet)
    install -m 755 "$ROOT/target/release/pgvault" "$PGV"
    cat >>"$D/data/postgresql.conf" <<CONF
fsync = on
synchronous_commit = on
archive_command = 'XDG_STATE_HOME=$WORK/state $PGV --repo $D/repo-pgv --stanza many --catalog off archive-push %p && pgbackrest --config $WORK/pgbackrest.conf --stanza=many archive-push %p'
CONF
    as_user "$BIN/pg_ctl" -D "$D/data" -l "$WORK/run/pg.log" -w start >/dev/null
    as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$PORT" -d postgres -c checkpoint
    as_user "$PGV" --repo "$D/repo-pgv" --stanza many stanza-create --pgdata "$D/data" >/dev/null
    as_user pgbackrest --config "$WORK/pgbackrest.conf" --stanza=many stanza-create >/dev/null
    echo "files $(find "$D/data" -type f -not -path "$D/data/pg_wal/*" | wc -l) bytes $(du -sb --exclude=pg_wal "$D/data" | cut -f1)" | tee "$WORK/size"
    pgv_log "WORK=$WORK"
}

# timed LABEL CMD...: page cache dropped, then wall, peak RSS, CPU, load
timed() {
    local label="$1" load
    shift
    # NODROP=1: the page cache kept (the floor's warm copy)
    [ "${NODROP:-0}" = 1 ] || pgv_drop_caches
    load="$(cut -d' ' -f1 /proc/loadavg)"
    "${PRIO[@]}" /usr/bin/time -o "$WORK/t${TSUF:-}.out" -f "%e %M %U %S" "$@" >"$WORK/cmd${TSUF:-}.log" 2>&1 ||
        { tail -20 "$WORK/cmd${TSUF:-}.log" >&2; pgv_log "$label failed"; echo "$label FAILED $load" >>"$WORK/times"; return 1; }
    echo "$label $(cat "$WORK/t${TSUF:-}.out") $load $(date -u +%H:%M:%S)" >>"$WORK/times"
    pgv_log "  $label: $(cat "$WORK/t${TSUF:-}.out") (s, KiB, user s, sys s; load $load)"
}

run() {
    WORK="${BENCH_WORK:?BENCH_WORK=the directory setup printed}"
    D="$WORK/d"
    PGV="${BENCH_PGV:-$WORK/pgvault}"
    PORT="$(cat "$WORK/port")"
    local tag="${BENCH_TAG:-$(basename "$PGV")}" t
    # one restore image per tag: two runs can share the cluster at once
    local rimg="$WORK/r-$tag.img" r="$WORK/r-$tag"
    TSUF="-$tag"
    export XDG_STATE_HOME="$WORK/state"
    for t in $TOOLS; do
        case "$t" in
            pgvault)
                timed "pgvault-backup $tag" runuser -u "$U" -- "$PGV" --repo "$D/repo-pgv" --stanza many --catalog off \
                    --process-max "$PM" backup --type full --pgdata "$D/data" --pg-host "$WORK/run" --pg-port "$PORT" --start-fast || true
                timed "pgvault-verify $tag" runuser -u "$U" -- "$PGV" --repo "$D/repo-pgv" --stanza many --catalog off \
                    --process-max "$PM" verify || true
                mkimg "$rimg" "$r" "$RIMG_GB"
                mkdir "$r/pgdata" && chown "$U" "$r/pgdata" && chmod 700 "$r/pgdata"
                timed "pgvault-restore $tag" runuser -u "$U" -- "$PGV" --repo "$D/repo-pgv" --stanza many --catalog off \
                    --process-max "$PM" restore --pgdata "$r/pgdata" --archive-mode off || true
                echo "restored-files pgvault-$tag $(find "$r/pgdata" -type f | wc -l)" >>"$WORK/times"
                dropimg "$rimg" "$r"
                ;;
            pgbackrest | pgbackrestplain)
                local repo=1
                [ "$t" = pgbackrest ] || repo=2
                timed "$t-backup" runuser -u "$U" -- pgbackrest --config "$WORK/pgbackrest.conf" --stanza=many \
                    --repo="$repo" --process-max="$PM" --type=full backup || true
                mkimg "$rimg" "$r" "$RIMG_GB"
                mkdir "$r/pgdata" && chown "$U" "$r/pgdata" && chmod 700 "$r/pgdata"
                timed "$t-restore" runuser -u "$U" -- pgbackrest --config "$WORK/pgbackrest.conf" --stanza=many \
                    --repo="$repo" --process-max="$PM" --pg1-path="$r/pgdata" restore || true
                echo "restored-files $t $(find "$r/pgdata" -type f | wc -l)" >>"$WORK/times"
                dropimg "$rimg" "$r"
                ;;
            floor)
                # the write floor: `cp -a` of the data directory (pg_wal's
                # contents left out), read into the page cache first, + sync
                # of the target file system
                mkimg "$rimg" "$r" "$RIMG_GB"
                tar -C "$D/data" --exclude=./pg_wal -cf - . | cat >/dev/null
                NODROP=1 timed "floor-cp-a" sh -c "cd '$D/data' && mkdir -p '$r/pgdata/pg_wal' &&
                    cp -a \$(ls -A | grep -vx pg_wal) '$r/pgdata/' && sync -f '$r/pgdata'" || true
                dropimg "$rimg" "$r"
                ;;
            *) pgv_die "unknown tool $t" ;;
        esac
    done
}

clean() {
    WORK="${BENCH_WORK:?BENCH_WORK=the directory setup printed}"
    as_user "$PGV_PGBIN/pg_ctl" -D "$WORK/d/data" -m fast -w stop >/dev/null 2>&1 || true
    local img
    for img in "$WORK"/r*.img; do [ -e "$img" ] && dropimg "$img" "${img%.img}"; done
    dropimg "$WORK/data.img" "$WORK/d"
    rm -rf "$WORK"
}

case "$STEP" in
    setup) setup ;;
    run) run ;;
    clean) clean ;;
    *) pgv_die "BENCH_STEP must be setup, run or clean" ;;
esac
