#!/usr/bin/env bash
# The main job on the embedded default, end to end, on a fresh Debian machine:
# a throwaway PostgreSQL 15 cluster in a temporary directory, run as an
# unprivileged user, archiving every WAL file through pgvault into a
# local-directory repository; every archived segment fetched back with
# archive-get and compared byte for byte; then the disaster-recovery loop:
# a full backup, about 1 % of pgbench_accounts updated, an incremental
# backup (only the changed blocks, found from the block references
# archive-push kept of the WAL), rows written before and after a noted time,
# a restore to exactly that time from the incremental into a new directory,
# started, showing that exactly the earlier rows are there; and last a
# restore drill, which does the same on its own, checks what came back and
# reports the RTO and RPO it achieved.
#
#   scripts/demo.sh            (as root: installs what is missing)
#   KEEP=1 scripts/demo.sh     keeps the temporary directory
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

pgv_ensure_tools
pgv_ensure_postgres
pgv_ensure_user
command -v cargo >/dev/null || pgv_die "cargo is needed to build pgvault (rustup.rs)"

pgv_log "building pgvault (release)"
cargo build --release --quiet

U="$PGV_TEST_USER"
BIN="$PGV_PGBIN"
WORK="$(mktemp -d /tmp/pgvault-demo.XXXXXX)"
chmod 755 "$WORK"
install -m 755 target/release/pgvault "$WORK/pgvault"
PGDATA="$WORK/pgdata"
REPO="$WORK/repo"
mkdir -p "$REPO" "$WORK/run" "$WORK/check" "$PGDATA" "$WORK/restored"
chown "$U" "$REPO" "$WORK/run" "$WORK/check" "$PGDATA" "$WORK/restored"
chmod 700 "$PGDATA" "$WORK/restored"
PORT="$(pgv_free_port)"
PSQL=(as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$PORT" -d postgres)
PGV=(as_user "$WORK/pgvault" --repo "$REPO" --stanza demo --catalog off)

cleanup() {
    as_user "$BIN/pg_ctl" -D "$WORK/restored" -m immediate stop >/dev/null 2>&1 || true
    as_user "$BIN/pg_ctl" -D "$PGDATA" -m immediate stop >/dev/null 2>&1 || true
    if [ "${KEEP:-0}" = 1 ]; then pgv_log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

pgv_log "initdb (1 MiB WAL segments, data checksums) in $PGDATA"
as_user "$BIN/initdb" -D "$PGDATA" --wal-segsize=1 --data-checksums -A trust >/dev/null
cat >>"$PGDATA/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$WORK/run'
archive_mode = on
archive_command = '$WORK/pgvault --repo $REPO --stanza demo archive-push %p'
wal_keep_size = '1GB'
max_wal_size = '1GB'
CONF

pgv_log "stanza-create"
"${PGV[@]}" stanza-create --pgdata "$PGDATA"

pgv_log "start PostgreSQL 15 with archive_command = pgvault archive-push %p"
as_user "$BIN/pg_ctl" -D "$PGDATA" -l "$WORK/run/postgres.log" -w start >/dev/null

pgv_log "write some WAL with pgbench"
as_user "$BIN/pgbench" -h "$WORK/run" -p "$PORT" -i -s 5 -q postgres >/dev/null 2>&1
as_user "$BIN/pgbench" -h "$WORK/run" -p "$PORT" -t 2000 -c 2 postgres >/dev/null 2>&1
last="$("${PSQL[@]}" -c "select pg_walfile_name(pg_switch_wal())")"

pgv_log "waiting until PostgreSQL reports $last archived"
for _ in $(seq 1 600); do
    done_wal="$("${PSQL[@]}" -c "select coalesce(last_archived_wal, '') from pg_stat_archiver")"
    [ "$done_wal" \> "$last" ] || [ "$done_wal" = "$last" ] && break
    sleep 0.1
done
"${PSQL[@]}" -c "select archived_count, failed_count, last_archived_wal from pg_stat_archiver" |
    awk -F'|' '{printf "    pg_stat_archiver: %s archived, %s failed, last %s\n", $1, $2, $3}' >&2

pgv_log "pgvault info"
"${PGV[@]}" info

pgv_log "archive-get every archived segment and compare with pg_wal"
n=0
for f in "$PGDATA"/pg_wal/0000000100000000000000??; do
    name="$(basename "$f")"
    [ "$name" \> "$last" ] && continue
    "${PGV[@]}" archive-get "$name" "$WORK/check/$name"
    cmp -s "$f" "$WORK/check/$name" || pgv_die "$name differs from the archived copy"
    rm -f "$WORK/check/$name"
    n=$((n + 1))
done
pgv_log "all $n segments came back byte-identical"

BACKUP=(backup --pgdata "$PGDATA" --pg-host "$WORK/run" --pg-port "$PORT" --start-fast)
pgv_log "full backup (pgvault backup --type full)"
FULL="$("${PGV[@]}" "${BACKUP[@]}" --type full)"

pgv_log "update about 1 % of pgbench_accounts"
"${PSQL[@]}" -c "update pgbench_accounts set abalance = abalance + 1 where aid % 100 = 0"

pgv_log "incremental backup on $FULL (pgvault backup --type incr): the blocks the WAL says changed"
INCR="$("${PGV[@]}" "${BACKUP[@]}" --type incr)"

pgv_log "rows A, then a noted time T, then rows B"
"${PSQL[@]}" -c "create table demo(id int, note text)"
"${PSQL[@]}" -c "insert into demo select g, 'A: before T' from generate_series(1, 3) g"
sleep 1
T="$("${PSQL[@]}" -c "select now()")"
sleep 1
"${PSQL[@]}" -c "insert into demo select g, 'B: after T' from generate_series(4, 6) g"
"${PSQL[@]}" -c "select pg_switch_wal()" >/dev/null
pgv_log "T = $T; the primary now has:"
"${PSQL[@]}" -c "select id, note from demo order by id" | sed 's/^/    /' >&2
sleep 2

pgv_log "pgvault info"
"${PGV[@]}" info

pgv_log "restore to T into $WORK/restored (pgvault restore --target-time): from the incremental $INCR, the newest backup before T"
out="$("${PGV[@]}" restore --pgdata "$WORK/restored" --target-time "$T" --target-action promote --archive-mode off 2>&1)" ||
    { printf '%s\n' "$out" >&2; pgv_die "restore failed"; }
printf '%s\n' "$out" >&2
grep -q "restored backup $INCR " <<<"$out" || pgv_die "the restore did not start from the incremental backup $INCR"
PORT2="$(pgv_free_port)"
sed -i "s/^port = .*/port = $PORT2/" "$WORK/restored/postgresql.conf"
as_user "$BIN/pg_ctl" -D "$WORK/restored" -l "$WORK/run/restored.log" -w start >/dev/null
for _ in $(seq 1 300); do
    [ "$(as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$PORT2" -d postgres -c 'select pg_is_in_recovery()')" = f ] && break
    sleep 0.1
done
pgv_log "the restored cluster has:"
rows="$(as_user "$BIN/psql" -XAtq -h "$WORK/run" -p "$PORT2" -d postgres -c "select id, note from demo order by id")"
printf '%s\n' "$rows" | sed 's/^/    /' >&2
[ "$rows" = "$(printf '1|A: before T\n2|A: before T\n3|A: before T')" ] ||
    pgv_die "the restored cluster does not hold exactly the rows committed before T"
pgv_log "point-in-time recovery from the incremental $INCR to $T: exactly the rows committed before T are there"

pgv_log "restore drill (pgvault drill): the newest backup to the newest archived commit, started, checked"
mkdir -p "$WORK/drill"
chown "$U" "$WORK/drill"
"${PGV[@]}" drill --scratch-dir "$WORK/drill"
pgv_log "and info remembers it"
"${PGV[@]}" info | grep -E 'last (drill|verify)' >&2
