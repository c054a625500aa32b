#!/usr/bin/env bash
# Peak RSS of backup and restore against the file count (issue 14): two
# pgvault binaries, BEFORE and AFTER, on one cluster of FLATMEM_TABLES small
# tables (default 20000; four files a table), interleaved, FLATMEM_ROUNDS
# rounds (default 1).
#
#   BEFORE=/path/to/old/pgvault AFTER=target/debug/pgvault \
#       FLATMEM_TABLES=20000 scripts/bench/flatmem-rss.sh        (as root)
#
# The cluster archives into one repository per binary (each binary pushes
# its own); each binary takes a full backup into its repository and
# restores it into an empty directory, as the PostgreSQL user,
# `--process-max 2`, with `/usr/bin/time -f "%e %M"` (wall seconds, peak
# RSS KiB). Peak RSS is what this measures: debug builds are fine for it,
# their times are not figures of record.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

TABLES="${FLATMEM_TABLES:-20000}"
ROUNDS="${FLATMEM_ROUNDS:-1}"
case "$TABLES$ROUNDS" in *[!0-9]*) pgv_die "FLATMEM_TABLES and FLATMEM_ROUNDS must be numbers" ;; esac
: "${BEFORE:?BEFORE must name the pgvault binary to compare with}"
AFTER="${AFTER:-$ROOT/target/debug/pgvault}"
U="$PGV_TEST_USER"
BIN="$PGV_PGBIN"

WORK="$(mktemp -d /var/tmp/pgvault-flatmem.XXXXXX)"
chmod 755 "$WORK"
DATA="$WORK/data"
cleanup() {
    as_user "$BIN/pg_ctl" -D "$DATA" -m immediate stop >/dev/null 2>&1 || true
    if [ "${KEEP:-0}" = 1 ]; then pgv_log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# The binaries where the PostgreSQL user can run them.
install -m 755 "$BEFORE" "$WORK/before"
install -m 755 "$AFTER" "$WORK/after"
mkdir -p "$WORK/run" "$WORK/repo-before" "$WORK/repo-after"
chown "$U" "$WORK/run" "$WORK/repo-before" "$WORK/repo-after"
install -d -o "$U" -m 700 "$DATA"
as_user "$BIN/initdb" -D "$DATA" -A trust >/dev/null
PORT="$(pgv_free_port)"
cat >>"$DATA/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$WORK/run'
archive_mode = on
archive_command = '$WORK/before --repo $WORK/repo-before --stanza s --catalog off archive-push %p && $WORK/after --repo $WORK/repo-after --stanza s --catalog off archive-push %p'
max_wal_size = '4GB'
autovacuum = off
CONF
for b in before after; do
    as_user "$WORK/$b" --repo "$WORK/repo-$b" --stanza s --catalog off stanza-create --pgdata "$DATA" >/dev/null
done
as_user "$BIN/pg_ctl" -D "$DATA" -l "$WORK/run/pg.log" -w start >/dev/null

pgv_log "$TABLES small tables"
pgv_small_tables "$WORK/run" "$PORT" "$TABLES"
as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$PORT" -d postgres -c checkpoint >/dev/null
FILES="$(find "$DATA" -type f -not -path "$DATA/pg_wal/*" | wc -l)"
pgv_log "$FILES files"

: >"$WORK/times"
timed() {
    local label="$1"
    shift
    /usr/bin/time -o "$WORK/t.out" -f "%e %M" "$@" >"$WORK/cmd.log" 2>&1 ||
        { cat "$WORK/cmd.log" >&2; pgv_die "$label failed"; }
    read -r wall rss <"$WORK/t.out"
    echo "| $label | $wall | $rss | $(cut -d' ' -f1 /proc/loadavg) |" | tee -a "$WORK/times" >&2
}
for round in $(seq 1 "$ROUNDS"); do
    for b in before after; do
        timed "$b backup" runuser -u "$U" -- "$WORK/$b" --repo "$WORK/repo-$b" --stanza s --catalog off \
            --process-max 2 backup --type full --pgdata "$DATA" --pg-host "$WORK/run" --pg-port "$PORT" --start-fast
    done
    for b in before after; do
        rm -rf "$WORK/restore"
        install -d -o "$U" -m 700 "$WORK/restore"
        timed "$b restore" runuser -u "$U" -- "$WORK/$b" --repo "$WORK/repo-$b" --stanza s --catalog off \
            --process-max 2 restore --pgdata "$WORK/restore" --archive-mode off
        timed "$b restore --delta" runuser -u "$U" -- "$WORK/$b" --repo "$WORK/repo-$b" --stanza s --catalog off \
            --process-max 2 restore --delta --pgdata "$WORK/restore" --archive-mode off
    done
    for b in before after; do
        timed "$b verify" runuser -u "$U" -- "$WORK/$b" --repo "$WORK/repo-$b" --stanza s --catalog off --process-max 2 verify
    done
    rm -rf "$WORK/restore"
done

echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); $TABLES tables, $FILES files; $(nproc) cores"
echo
echo "| command | wall s | peak RSS KiB | load |"
echo "|---|---|---|---|"
cat "$WORK/times"
