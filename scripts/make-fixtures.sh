#!/usr/bin/env bash
# make-fixtures.sh — regenerate fixtures/ from real PostgreSQL servers.
#
# Usage (as root):  scripts/make-fixtures.sh [OUTPUT_DIR] [STORY...]
#   OUTPUT_DIR defaults to fixtures/. STORY is one of
#     clusters  pg15/ pg15-16mib/ pg14/ pg16/ pg17/ pg18/
#     records   pg15-records/ only (the WAL record scanner's story, below)
#     blockrefs pg14-blockrefs/ to pg18-blockrefs/ (block references, below)
#     pages     pg15-pages/ only (data pages with checksums, below)
#     all       all of them (the default)
#   A story replaces only its own directories, so `make-fixtures.sh records`
#   leaves the others as they are. PGVAULT_BLOCKREFS_MAJORS="17" makes the
#   blockrefs story for some majors only.
#
# What it makes (see fixtures/README.md for the file list):
#   pg15/        Debian's PostgreSQL 15 (/usr/lib/postgresql/15/bin, apt package
#                postgresql-15): a 1 MiB-segment cluster with data checksums,
#                pgbench -i, a non-exclusive backup (pg_backup_start/stop: a
#                .backup history file and its backup_label), a streaming standby
#                that is stopped once (pg_control "shut down in recovery") and
#                then promoted after the primary stops, which gives a .partial
#                segment of timeline 1, 00000002.history and the first segment of
#                timeline 2 — whose first pages still carry xlp_tli 1, because
#                PostgreSQL copies the old timeline's segment up to the switch
#                point (xlog.c, XLogInitNewTimeline).
#   pg15-16mib/  pg_control of a default (16 MiB segment) PostgreSQL 15 cluster.
#   pg14/ pg16/ pg17/ pg18/
#                PostgreSQL from scripts/fetch-pg.sh: a 1 MiB-segment cluster,
#                one small write, one WAL segment, pg_control — so the parser
#                meets pg_control versions 1300, 1700 and 1800 and every WAL
#                page magic.
#   pg15-records/
#                Debian's PostgreSQL 15, 1 MiB segments, track_commit_timestamp:
#                WAL whose records pgvault's scanner (src/pg/walscan.rs) must
#                find — committed and aborted transactions, restore points, a
#                2.5 MB logical message spanning segment boundaries, an
#                XLOG_SWITCH, and an overwrite contrecord (a record cut short
#                by a crash whose continuation segment was lost, as
#                PostgreSQL's own test 026_overwrite_contrecord.pl makes one).
#   pgNN-blockrefs/
#                PostgreSQL 14 to 18 (15 from Debian, the others from
#                scripts/fetch-pg.sh), 1 MiB segments, wal_compression varied
#                by major: a workload touching relation files every way the
#                block reference scan must see (inserts, updates, DELETE +
#                VACUUM truncation, TRUNCATE, CREATE/DROP TABLE, CREATE
#                DATABASE with both strategies (WAL_LOG on 17 only: a
#                megabyte of images), DROP DATABASE, a tablespace
#                created, used by ALTER TABLE ... SET TABLESPACE and dropped,
#                VACUUM FULL, hash and GIN indexes, an unlogged table, aborted
#                and prepared transactions that create tables).
#                blockrefs.json.zst holds every block reference and storage
#                event pg_waldump -b prints, by the segment each record starts
#                in; on 17 and 18 (summarize_wal = on) summaries.csv.zst holds
#                pg_wal_summary_contents() of the summaries inside the story.
#   pg15-pages/  Debian's PostgreSQL 15 with data checksums: the first blocks of
#                a table's main fork after a checkpoint and a clean stop, with
#                each page's stored pd_checksum and pd_lsn read by Python.
# Each directory has facts.json: the values tests assert, taken from
# pg_controldata and pg_waldump output and from raw header bytes read here
# with Python's struct module — never from pgvault's own parser.
#
# PostgreSQL refuses to run as root, so the servers run as the unprivileged
# system user `pgvtest` (created when missing). They listen only on Unix
# sockets inside a temporary work directory (listen_addresses = ''), so the
# script touches no network port and can run beside other PostgreSQL servers.
#
# Re-runnable: the output directory's pgNN*/ subdirectories are replaced.
# Cluster identities, LSNs and times differ on every run, and facts.json
# follows them. KEEP_WORK=1 keeps the work directory for inspection.
#
# Needs: root, runuser, python3, zstd, Debian's postgresql-15 and the pip
# download that scripts/fetch-pg.sh does.
set -euo pipefail

die() { echo "make-fixtures.sh: $*" >&2; exit 1; }
log() { echo "make-fixtures.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || die "run as root (PostgreSQL itself runs as the user pgvtest)"
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out=$repo/fixtures
stories=()
for arg in "$@"; do
    case "$arg" in
        all | clusters | records | blockrefs | pages) stories+=("$arg") ;;
        *) out=$arg ;;
    esac
done
[ ${#stories[@]} -gt 0 ] || stories=(all)
pg15_bin=${PGVAULT_PG15_BIN:-/usr/lib/postgresql/15/bin}
[ -x "$pg15_bin/postgres" ] || die "$pg15_bin/postgres not found (apt-get install postgresql-15)"
command -v zstd >/dev/null || die "zstd not found (apt-get install zstd)"
command -v python3 >/dev/null || die "python3 not found"

id pgvtest >/dev/null 2>&1 || useradd --system --create-home pgvtest

export LC_ALL=C TZ=UTC
work=$(mktemp -d /tmp/pgvault-fixtures.XXXXXX)
chmod 755 "$work"
chown pgvtest: "$work"
started=()
cleanup() {
    local d
    for d in "${started[@]}"; do
        [ -f "$d/postmaster.pid" ] && as_pg "$(cat "$d/.bin")/pg_ctl" -D "$d" stop -m immediate >/dev/null 2>&1 || true
    done
    if [ "${KEEP_WORK:-0}" = 1 ]; then log "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

as_pg() { runuser -u pgvtest -- env LC_ALL=C TZ=UTC PGHOST="$work/sock" PGUSER=postgres PGDATABASE=postgres "$@"; }
mkdir -p "$work/sock"
chown pgvtest: "$work/sock"

# new_cluster BIN DATADIR PORT INITDB_OPTIONS...
# Each cluster archives into its own DATADIR.archive (a standby made by
# pg_basebackup inherits its primary's configuration, so it shares it).
new_cluster() {
    local bin=$1 data=$2 port=$3; shift 3
    mkdir -p "$data.archive" && chown pgvtest: "$data.archive"
    as_pg "$bin/initdb" -D "$data" -U postgres --auth=trust "$@" >"$work/initdb-$(basename "$data").log" 2>&1 ||
        { cat "$work/initdb-$(basename "$data").log" >&2; die "initdb of $data failed"; }
    echo "$bin" >"$data/.bin"
    cat >>"$data/postgresql.conf" <<EOF

# --- make-fixtures.sh ---
listen_addresses = ''
unix_socket_directories = '$work/sock'
port = $port
wal_level = replica
archive_mode = on
archive_command = 'test ! -f $data.archive/%f && cp %p $data.archive/%f'
max_wal_senders = 4
wal_keep_size = '64MB'
fsync = off
EOF
}

# start DATADIR [SERVER_OPTIONS]
start() {
    local data=$1 opts=${2:-}
    as_pg "$(cat "$data/.bin")/pg_ctl" -D "$data" -l "$data.log" -w -t 60 ${opts:+-o "$opts"} start >/dev/null ||
        { tail -n 30 "$data.log" >&2; die "could not start $data"; }
    started+=("$data")
}
# stop DATADIR [MODE]
stop() { as_pg "$(cat "$1/.bin")/pg_ctl" -D "$1" -w -t 60 stop -m "${2:-fast}" >/dev/null; }

# pgbench BIN PORT ARGS...
pgbench() {
    local bin=$1 port=$2; shift 2
    as_pg "$bin/pgbench" -p "$port" "$@" postgres >"$work/pgbench.log" 2>&1 ||
        { cat "$work/pgbench.log" >&2; die "pgbench $* failed"; }
}

# sql BIN PORT SQL — one value, unaligned
sql() { as_pg "$1/psql" -X -q -v ON_ERROR_STOP=1 -p "$2" -At -c "$3"; }

# wait_archived ARCHIVE NAME — until the archiver has copied NAME (bounded)
wait_archived() {
    local i
    for i in $(seq 1 120); do
        [ -f "$1/$2" ] && return 0
        sleep 0.5
    done
    die "$2 was never archived"
}

# wait_replayed BIN PORT LSN — until the standby has replayed up to LSN (bounded)
wait_replayed() {
    local i
    for i in $(seq 1 120); do
        [ "$(sql "$1" "$2" "select pg_last_wal_replay_lsn() >= '$3'::pg_lsn")" = t ] && return 0
        sleep 0.5
    done
    die "standby on port $2 never replayed up to $3"
}

zst() { zstd -q -19 --no-progress -f "$1" -o "$2"; }

# save_control BIN DATADIR DEST_PREFIX — copy pg_control and its pg_controldata text
save_control() {
    local bin=$1 data=$2 dest=$3
    cp "$data/global/pg_control" "$dest"
    as_pg "$bin/pg_controldata" -D "$data" >"$dest.controldata.txt"
}

# waldump BIN FILE TLI — pg_waldump text of one segment (it complains at the
# segment's end when the last record goes on into the next file: that is kept)
waldump() {
    local bin=$1 file=$2 name
    name=$(basename "$file" .partial)
    rm -rf "$work/dump" && mkdir -p "$work/dump" && cp "$file" "$work/dump/$name" && chown -R pgvtest: "$work/dump"
    as_pg "$bin/pg_waldump" -p "$work/dump" "$name" 2>&1 || true
}

# facts DIR — write DIR/facts.json from what is in DIR and DIR/.raw
facts() {
    python3 - "$1" <<'PY'
import calendar, json, os, re, struct, sys, time

d = sys.argv[1]
raw = os.path.join(d, ".raw")

def controldata(path):
    fields = {}
    with open(path) as f:
        for line in f:
            k, sep, v = line.partition(":")
            if sep:
                fields[k.strip()] = v.strip()
    def ts(s):
        # pg_controldata prints times with strftime("%c") in local time; TZ=UTC here
        return calendar.timegm(time.strptime(s, "%a %b %d %H:%M:%S %Y"))
    return {
        "pg_controldata": fields,
        "system_identifier": fields["Database system identifier"],
        "pg_control_version": int(fields["pg_control version number"]),
        "catalog_version_no": int(fields["Catalog version number"]),
        "state": fields["Database cluster state"],
        "checkpoint": fields["Latest checkpoint location"],
        "redo": fields["Latest checkpoint's REDO location"],
        "timeline": int(fields["Latest checkpoint's TimeLineID"]),
        "prev_timeline": int(fields["Latest checkpoint's PrevTimeLineID"]),
        "checkpoint_time": ts(fields["Time of latest checkpoint"]),
        "min_recovery_point": fields["Minimum recovery ending location"],
        "backup_start_point": fields["Backup start location"],
        "backup_end_point": fields["Backup end location"],
        "backup_end_required": fields["End-of-backup record required"] == "yes",
        "wal_level": fields["wal_level setting"],
        "block_size": int(fields["Database block size"]),
        "wal_block_size": int(fields["WAL block size"]),
        "wal_segment_size": int(fields["Bytes per WAL segment"]),
        "data_checksum_version": int(fields["Data page checksum version"]),
    }

def lsn(v):
    return "%X/%X" % (v >> 32, v & 0xFFFFFFFF)

def wal(name, path, dump):
    data = open(path, "rb").read()
    # XLogLongPageHeaderData, xlog_internal.h: magic u16, info u16, tli u32,
    # pageaddr u64, rem_len u32, (pad) sysid u64, seg_size u32, xlog_blcksz u32
    magic, info, tli, pageaddr, rem_len = struct.unpack_from("<HHIQI", data, 0)
    sysid, seg_size, blcksz = struct.unpack_from("<QII", data, 24)
    page_tlis = []
    for off in range(0, len(data), blcksz):
        m, _, t = struct.unpack_from("<HHI", data, off)
        if m == magic:
            page_tlis.append(t)
    lsns = re.findall(r"lsn: ([0-9A-F]+/[0-9A-F]+)", dump)
    return {
        "size": len(data),
        "magic": magic,
        "magic_hex": "0x%04X" % magic,
        "xlp_info": info,
        "xlp_tli": tli,
        "xlp_pageaddr": lsn(pageaddr),
        "xlp_rem_len": rem_len,
        "xlp_sysid": str(sysid),
        "xlp_seg_size": seg_size,
        "xlp_xlog_blcksz": blcksz,
        "page_tlis": sorted(set(page_tlis)),
        "pages_written": len(page_tlis),
        "waldump_records": len(lsns),
        "waldump_first_lsn": lsns[0] if lsns else None,
        "waldump_last_lsn": lsns[-1] if lsns else None,
    }

facts = json.load(open(os.path.join(raw, "meta.json")))
facts["generated_by"] = "scripts/make-fixtures.sh"
facts["control_files"] = {}
for rel in sorted(os.listdir(d)):
    if rel.startswith("pg_control") and rel.endswith(".controldata.txt"):
        ctl = rel[: -len(".controldata.txt")]
        facts["control_files"][ctl] = controldata(os.path.join(d, rel))
facts["wal"] = {}
waldir = os.path.join(raw, "wal")
if os.path.isdir(waldir):
    for name in sorted(os.listdir(waldir)):
        if name.endswith(".waldump.txt"):
            continue
        if name.endswith(".history") or name.endswith(".backup"):
            text = open(os.path.join(waldir, name)).read()
            facts["wal"][name] = {"file": "wal/" + name, "text": text}
            continue
        dump = open(os.path.join(waldir, name + ".waldump.txt")).read()
        entry = wal(name, os.path.join(waldir, name), dump)
        entry["file"] = "wal/" + name + ".zst"
        facts["wal"][name] = entry
with open(os.path.join(d, "facts.json"), "w") as f:
    json.dump(facts, f, indent=2, sort_keys=True)
    f.write("\n")
PY
}

# finish DIR — compress the WAL kept in DIR/.raw/wal into DIR/wal, keep the
# pg_waldump text beside it, write facts.json, drop .raw
finish() {
    local dir=$1 f
    if [ -d "$dir/.raw/wal" ]; then
        mkdir -p "$dir/wal"
        for f in "$dir"/.raw/wal/*; do
            case "$f" in
                *.waldump.txt) head -n 40 "$f" >"$dir/wal/$(basename "$f")" ;;
                *.history | *.backup) cp "$f" "$dir/wal/" ;;
                *) zst "$f" "$dir/wal/$(basename "$f").zst" ;;
            esac
        done
    fi
    facts "$dir"
    rm -rf "$dir/.raw"
}

# keep_wal BIN ARCHIVE DIR NAME — copy an archived WAL file into DIR/.raw/wal
keep_wal() {
    local bin=$1 arch=$2 dir=$3 name=$4
    mkdir -p "$dir/.raw/wal"
    cp "$arch/$name" "$dir/.raw/wal/$name"
    case "$name" in
        *.history | *.backup) ;;
        *) waldump "$bin" "$dir/.raw/wal/$name" >"$dir/.raw/wal/$name.waldump.txt" ;;
    esac
}

json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }

###############################################################################
# PostgreSQL 15: the full story
###############################################################################
make_pg15() {
    local bin=$pg15_bin dst=$out/pg15 p=$work/pg15-primary s=$work/pg15-standby
    local arch=$work/pg15-primary.archive pport=54351 sport=54352 i
    log "PostgreSQL 15: primary with 1 MiB segments and data checksums"
    rm -rf "$dst" && mkdir -p "$dst/.raw/wal"
    new_cluster "$bin" "$p" $pport --wal-segsize=1 --data-checksums
    start "$p"
    pgbench "$bin" $pport -i -s 1 -q
    local pgbench_seg
    pgbench_seg=$(sql "$bin" $pport "select pg_walfile_name(pg_current_wal_lsn())")
    sql "$bin" $pport "checkpoint" >/dev/null

    log "PostgreSQL 15: non-exclusive backup (pg_backup_start/pg_backup_stop)"
    # One session: pg_backup_stop must run where pg_backup_start ran.
    as_pg "$bin/psql" -X -q -v ON_ERROR_STOP=1 -p $pport -At >"$work/backup.out" <<SQL
select pg_backup_start('pgvault fixture', true);
\o $work/backup_label
select labelfile from pg_backup_stop(true);
\o
SQL
    local backup_start backup_stop backup_file
    backup_start=$(head -n1 "$work/backup.out")
    # psql ends the value with one more newline than the label has
    printf '%s\n' "$(cat "$work/backup_label")" >"$dst/backup_label"
    # pg_backup_stop(true) returns once the .backup history file is archived.
    backup_file=$(cd "$arch" && ls -- *.backup | head -n1)
    [ -n "$backup_file" ] || die "no .backup file was archived"
    backup_stop=$(sed -n 's/^STOP WAL LOCATION: \([0-9A-F/]*\) .*/\1/p' "$arch/$backup_file")

    log "PostgreSQL 15: streaming standby"
    as_pg "$bin/pg_basebackup" -p $pport -D "$s" -R -X stream -c fast >/dev/null
    echo "$bin" >"$s/.bin"
    echo "port = $sport" >>"$s/postgresql.conf"
    start "$s"
    pgbench "$bin" $pport -n -t 200 -c 1
    wait_replayed "$bin" $sport "$(sql "$bin" $pport "select pg_current_wal_lsn()")"
    # A standby stopped cleanly: state "shut down in recovery", minRecoveryPoint set.
    stop "$s"
    save_control "$bin" "$s" "$dst/pg_control.standby-stopped"
    start "$s"
    pgbench "$bin" $pport -n -t 300 -c 1
    wait_replayed "$bin" $sport "$(sql "$bin" $pport "select pg_current_wal_lsn()")"

    log "PostgreSQL 15: a backup of the standby, stopped early in its recovery"
    # Starting from a backup writes backupStartPoint, backupEndRequired and,
    # for a backup taken from a standby, backupEndPoint into pg_control
    # (xlog.c, StartupXLOG); they are cleared when the backup's end is replayed.
    # Giving recovery only the WAL segment of the backup's start keeps it short
    # of that end, so pg_control shows them.
    # The backup's start must be a checkpoint that no earlier backup started
    # at, or recovery would take that backup's end-of-backup record for its
    # own: so a fresh checkpoint on the primary, replayed, becomes the
    # standby's restartpoint. Its end (the standby's replay position when
    # pg_control is copied) must lie in a later segment than its start.
    local b=$work/pg15-standby-backup bport=54354 start_seg
    sql "$bin" $pport "checkpoint" >/dev/null
    sql "$bin" $pport "select pg_switch_wal()" >/dev/null
    pgbench "$bin" $pport -n -t 50 -c 1
    wait_replayed "$bin" $sport "$(sql "$bin" $pport "select pg_current_wal_lsn()")"
    as_pg "$bin/pg_basebackup" -p $sport -D "$b" -X none -c fast >/dev/null 2>"$work/pg_basebackup.log" ||
        { cat "$work/pg_basebackup.log" >&2; die "pg_basebackup of the standby failed"; }
    pgbench "$bin" $pport -n -t 100 -c 1
    wait_replayed "$bin" $sport "$(sql "$bin" $pport "select pg_current_wal_lsn()")"
    echo "$bin" >"$b/.bin"
    start_seg=$(sed -n 's/^START WAL LOCATION: .* (file \([0-9A-F]*\))$/\1/p' "$b/backup_label")
    [ -n "$start_seg" ] || die "no START WAL LOCATION in the standby backup's backup_label"
    wait_archived "$arch" "$start_seg"
    mkdir -p "$work/only-start" && cp "$arch/$start_seg" "$work/only-start/" && chown -R pgvtest: "$work/only-start"
    cat >"$b/postgresql.auto.conf" <<EOF
port = $bport
primary_conninfo = ''
restore_command = 'cp $work/only-start/%f %p'
EOF
    as_pg touch "$b/standby.signal"
    # -W: a server that cannot reach consistency never accepts connections.
    as_pg "$bin/pg_ctl" -D "$b" -l "$b.log" -W start >/dev/null
    started+=("$b")
    for i in $(seq 1 120); do
        as_pg "$bin/pg_controldata" -D "$b" >"$work/cd.txt"
        grep -q '^Backup start location: *0/0$' "$work/cd.txt" || break
        sleep 0.5
    done
    grep -q '^Database cluster state: *in archive recovery$' "$work/cd.txt" ||
        die "the standby's backup did not enter archive recovery (see $b.log)"
    grep -q '^Backup start location: *0/0$' "$work/cd.txt" &&
        die "recovery of the standby's backup never set its backup start location (see $b.log)"
    cp "$b/global/pg_control" "$dst/pg_control.backup-recovering"
    cp "$work/cd.txt" "$dst/pg_control.backup-recovering.controldata.txt"
    stop "$b" immediate

    log "PostgreSQL 15: the primary fails, promote the standby (timeline 2)"
    # An immediate stop, after the standby has replayed everything: a clean
    # stop would switch to a new segment first (ShutdownXLOG does when
    # archiving) and timeline 2 would then start at a segment's first page.
    stop "$p" immediate
    as_pg "$bin/pg_ctl" -D "$s" -w -t 60 promote >/dev/null
    for i in $(seq 1 120); do
        [ "$(sql "$bin" $sport "select pg_is_in_recovery()")" = f ] && break
        sleep 0.5
    done
    wait_archived "$arch" 00000002.history

    # The switch point (timeline.c writes "parentTLI<TAB>X/X<TAB>reason") names
    # the segment where timeline 2 starts: the old timeline's copy of it is
    # archived as .partial, and the new timeline's file starts with a copy of
    # its pages before the switch point (xlp_tli 1).
    local switch hi lo segno segname
    switch=$(awk -F'\t' '$1 == 1 { print $2 }' "$arch/00000002.history")
    [ -n "$switch" ] || die "00000002.history has no entry for timeline 1"
    hi=$((16#${switch%/*})) lo=$((16#${switch#*/}))
    segno=$(( ((hi << 32) | lo) >> 20 ))  # 1 MiB segments
    segname=$(printf '%08X%08X' $((segno / 4096)) $((segno % 4096)))
    (( (lo & 0xFFFFF) > 8192 )) || die "timeline 2 starts in the first page of its segment ($switch): rerun"
    local partial=00000001$segname.partial first_tli2=00000002$segname
    local before_switch
    before_switch=00000001$(printf '%08X%08X' $(((segno - 1) / 4096)) $(((segno - 1) % 4096)))
    wait_archived "$arch" "$partial"

    pgbench "$bin" $sport -n -t 20 -c 1
    sql "$bin" $sport "select pg_switch_wal()" >/dev/null
    wait_archived "$arch" "$first_tli2"
    sql "$bin" $sport "checkpoint" >/dev/null
    # pg_control as a base backup copies it: from a running server
    cp "$s/global/pg_control" "$dst/pg_control.promoted-running"
    as_pg "$bin/pg_controldata" -D "$s" >"$dst/pg_control.promoted-running.controldata.txt"
    stop "$s"
    save_control "$bin" "$s" "$dst/pg_control.promoted-stopped"

    # The old primary, cleanly shut down (crash recovery, then a shutdown
    # checkpoint), without archiving: it must not add to the archive of the
    # cluster that now lives on as timeline 2.
    start "$p" "-c archive_mode=off"
    stop "$p"
    save_control "$bin" "$p" "$dst/pg_control"
    cp "$p/PG_VERSION" "$dst/PG_VERSION"

    log "PostgreSQL 15: collect WAL"
    keep_wal "$bin" "$arch" "$dst" "$pgbench_seg"
    keep_wal "$bin" "$arch" "$dst" "${backup_file:0:24}"
    keep_wal "$bin" "$arch" "$dst" "$before_switch"
    keep_wal "$bin" "$arch" "$dst" "$backup_file"
    keep_wal "$bin" "$arch" "$dst" "$partial"
    keep_wal "$bin" "$arch" "$dst" 00000002.history
    keep_wal "$bin" "$arch" "$dst" "$first_tli2"
    ls "$arch" >"$work/pg15-archive-listing.txt"
    cat >"$dst/.raw/meta.json" <<EOF
{
  "major": 15,
  "server_version": $(json_str "$(as_pg "$bin/postgres" --version)"),
  "initdb_options": "--wal-segsize=1 --data-checksums",
  "pg_version_file": "PG_VERSION",
  "backup": {
    "history_file": "$backup_file",
    "label_file": "backup_label",
    "start_lsn": "$backup_start",
    "stop_lsn": "$backup_stop"
  },
  "pgbench_init_segment": "$pgbench_seg",
  "promotion": {
    "last_full_segment_before_switch": "$before_switch",
    "switch_point": "$switch",
    "partial": "$partial",
    "history": "00000002.history",
    "first_new_timeline_segment": "$first_tli2"
  }
}
EOF
    finish "$dst"
}

###############################################################################
# PostgreSQL 15 with the default 16 MiB segments: pg_control only
###############################################################################
make_pg15_16mib() {
    local bin=$pg15_bin dst=$out/pg15-16mib c=$work/pg15-16mib
    log "PostgreSQL 15: default 16 MiB cluster"
    rm -rf "$dst" && mkdir -p "$dst/.raw"
    new_cluster "$bin" "$c" 54353
    save_control "$bin" "$c" "$dst/pg_control"
    cp "$c/PG_VERSION" "$dst/PG_VERSION"
    cat >"$dst/.raw/meta.json" <<EOF
{
  "major": 15,
  "server_version": $(json_str "$(as_pg "$bin/postgres" --version)"),
  "initdb_options": "",
  "pg_version_file": "PG_VERSION"
}
EOF
    finish "$dst"
}

###############################################################################
# PostgreSQL 14, 16, 17, 18: one small cluster each
###############################################################################
make_small() {
    local major=$1 port=$2 bin dst=$out/pg$1 c=$work/pg$1
    bin=$("$here/fetch-pg.sh" "$major")
    local opts=(--wal-segsize=1)
    # PostgreSQL 18's initdb enables data checksums by default; older ones need asking.
    [ "$major" -lt 18 ] && opts+=(--data-checksums)
    log "PostgreSQL $major: 1 MiB-segment cluster"
    rm -rf "$dst" && mkdir -p "$dst/.raw"
    new_cluster "$bin" "$c" "$port" "${opts[@]}"
    start "$c"
    sql "$bin" "$port" "create table t as select g as id, md5(g::text) as v from generate_series(1, 2000) g" >/dev/null
    local seg
    seg=$(sql "$bin" "$port" "select pg_walfile_name(pg_current_wal_lsn())")
    sql "$bin" "$port" "select pg_switch_wal()" >/dev/null
    wait_archived "$c.archive" "$seg"
    stop "$c"
    save_control "$bin" "$c" "$dst/pg_control"
    cp "$c/PG_VERSION" "$dst/PG_VERSION"
    keep_wal "$bin" "$c.archive" "$dst" "$seg"
    cat >"$dst/.raw/meta.json" <<EOF
{
  "major": $major,
  "server_version": $(json_str "$(as_pg "$bin/postgres" --version)"),
  "initdb_options": "${opts[*]}",
  "pg_version_file": "PG_VERSION"
}
EOF
    finish "$dst"
}

###############################################################################
# PostgreSQL 15: WAL records for the scanner (pg15-records/)
###############################################################################
# seg_of LSN — the 1 MiB segment number an LSN is in
seg_of() { local hi=$((16#${1%/*})) lo=$((16#${1#*/})); echo $(( ((hi << 32) | lo) >> 20 )); }
# seg_name SEGNO — timeline-1 file name of a 1 MiB segment
seg_name() { printf '00000001%08X%08X' $(($1 / 4096)) $(($1 % 4096)); }
# lsn_num LSN — an LSN as a number; lsn_text NUMBER — and back
lsn_num() { local hi=$((16#${1%/*})) lo=$((16#${1#*/})); echo $(( (hi << 32) | lo )); }
lsn_text() { printf '%X/%X' $(($1 >> 32)) $(($1 & 0xFFFFFFFF)); }

# fill_segment BIN PORT ROOM — write 4 kB logical messages until less than
# ROOM bytes are left in the current 1 MiB segment; prints the insert LSN
fill_segment() {
    local lsn i
    for i in $(seq 1 400); do
        lsn=$(sql "$1" "$2" "select pg_current_wal_insert_lsn()")
        [ $(( $(lsn_num "$lsn") & 0xFFFFF )) -lt $((0x100000 - $3)) ] || break
        sql "$1" "$2" "select pg_logical_emit_message(false, 'fill', repeat('f', 4000))" >/dev/null
    done
    echo "$lsn"
}

# place_record BIN PORT TARGET — write one logical message sized so that the
# next record starts at LSN number TARGET (the server must be otherwise idle;
# another backend's record in between makes this fail, and the caller die).
# A message with prefix 'fill' and N > 226 payload bytes is a 58 + N byte
# record (24 header, 5 main data header, 24 xl_logical_message, 5 prefix).
place_record() {
    local p t=$3 between
    p=$(lsn_num "$(sql "$1" "$2" "select pg_current_wal_insert_lsn()")")
    # Payload bytes from p to t: less a 24-byte page header per page start.
    between=$(( t - p - 24 * ( t / 8192 - p / 8192 ) ))
    [ $between -ge 400 ] && [ $((between % 8)) = 0 ] || return 1
    sql "$1" "$2" "select pg_logical_emit_message(false, 'fill', repeat('f', $((between - 58))))" >/dev/null
    [ "$(lsn_num "$(sql "$1" "$2" "select pg_current_wal_insert_lsn()")")" = "$t" ]
}

make_pg15_records() {
    local bin=$pg15_bin dst=$out/pg15-records c=$work/pg15-records port=54355
    local arch=$work/pg15-records.archive i x
    log "PostgreSQL 15: WAL records story (pg15-records)"
    rm -rf "$dst" && mkdir -p "$dst/.raw/wal"
    new_cluster "$bin" "$c" $port --wal-segsize=1
    printf '%s\n' "track_commit_timestamp = on" "max_prepared_transactions = 2" >>"$c/postgresql.conf"
    start "$c"
    local q="sql $bin $port"
    $q "create table t (id int, v text)" >/dev/null
    # A base backup, for the point-in-time recovery at the story's end.
    local r=$work/pg15-records-pitr rport=54356
    as_pg "$bin/pg_basebackup" -p $port -D "$r" -X none -c fast >/dev/null 2>"$work/pg_basebackup.log" ||
        { cat "$work/pg_basebackup.log" >&2; die "pg_basebackup failed"; }
    $q "select pg_switch_wal()" >/dev/null
    $q "insert into t values (0, 'start')" >/dev/null
    local first_seg
    first_seg=$(seg_of "$($q "select pg_current_wal_lsn()")")

    # Committed transactions: xid and pg_xact_commit_timestamp (Unix µs).
    local commits=()
    for i in 1 2 3 4 5; do
        x=$($q "insert into t values ($i, 'commit') returning pg_current_xact_id()")
        commits+=("{\"xid\": $x, \"time_us\": $($q "select (extract(epoch from pg_xact_commit_timestamp('$x'::text::xid)) * 1000000)::bigint"), \"time\": \"$($q "select pg_xact_commit_timestamp('$x'::text::xid)")\"}")
    done
    # Two-phase: COMMIT PREPARED and ROLLBACK PREPARED records carry the
    # prepared transaction's xid in their main data, not in xl_xid.
    local prep_commit prep_abort
    prep_commit=$(as_pg "$bin/psql" -X -q -v ON_ERROR_STOP=1 -p $port -At <<'SQL'
begin;
insert into t values (10, 'prepared');
select pg_current_xact_id();
prepare transaction 'p_commit';
commit prepared 'p_commit';
SQL
)
    commits+=("{\"xid\": $prep_commit, \"gid\": \"p_commit\", \"time_us\": $($q "select (extract(epoch from pg_xact_commit_timestamp('$prep_commit'::text::xid)) * 1000000)::bigint"), \"time\": \"$($q "select pg_xact_commit_timestamp('$prep_commit'::text::xid)")\"}")
    prep_abort=$(as_pg "$bin/psql" -X -q -v ON_ERROR_STOP=1 -p $port -At <<'SQL'
begin;
insert into t values (11, 'prepared, rolled back');
select pg_current_xact_id();
prepare transaction 'p_abort';
rollback prepared 'p_abort';
SQL
)
    local abort_xid
    abort_xid=$(as_pg "$bin/psql" -X -q -v ON_ERROR_STOP=1 -p $port -At <<'SQL'
begin;
insert into t values (100, 'abort');
select pg_current_xact_id();
rollback;
SQL
)
    # pg_create_restore_point returns the end of its record.
    local rp1 rp2
    rp1=$($q "select pg_create_restore_point('before_drop')")
    $q "drop table t" >/dev/null
    rp2=$($q "select pg_create_restore_point('after drop, with spaces')")

    # One record crossing at least two segment boundaries.
    local big_end
    big_end=$($q "select pg_logical_emit_message(false, 'big', repeat('x', 2500000))")
    $q "create table u (id int)" >/dev/null

    # A record whose header starts 16 bytes before a segment's end: its
    # xl_tot_len is in one file, the rest of its header in the next.
    local split_seg split_lsn
    split_seg=$(seg_of "$(fill_segment "$bin" $port 20000)")
    split_lsn=$(( (split_seg + 1) * 0x100000 - 16 ))
    place_record "$bin" $port $split_lsn || die "could not place a record at $(lsn_text $split_lsn): rerun"
    $q "select pg_logical_emit_message(false, 'split', repeat('s', 100))" >/dev/null
    split_lsn=$(lsn_text $split_lsn)

    local switch_seg
    switch_seg=$(seg_of "$($q "select pg_current_wal_lsn()")")
    $q "select pg_switch_wal()" >/dev/null
    wait_archived "$arch" "$(seg_name "$switch_seg")"

    # An overwrite contrecord (026_overwrite_contrecord.pl): fill a segment
    # to near its end, write a record that goes on into the next segment,
    # crash, lose the next segment, restart. Recovery ends at the start of the
    # cut record and the new next segment begins with a page flagged
    # XLP_FIRST_IS_OVERWRITE_CONTRECORD and an XLOG_OVERWRITE_CONTRECORD record.
    $q "insert into u values (1)" >/dev/null
    local lsn
    lsn=$(fill_segment "$bin" $port 24000)
    local cut_seg cut_end
    cut_seg=$(seg_of "$lsn")
    # Transactional: its commit flushes the WAL, so the first part is on disk.
    cut_end=$($q "select pg_logical_emit_message(true, 'cut', repeat('c', 60000))")
    [ "$(seg_of "$cut_end")" = $((cut_seg + 1)) ] || die "the cut record ($lsn..$cut_end) does not end in the segment after $cut_seg"
    wait_archived "$arch" "$(seg_name "$cut_seg")"
    stop "$c" immediate
    rm -f "$c/pg_wal/$(seg_name $((cut_seg + 1)))" "$c/pg_wal/$(seg_name $((cut_seg + 2)))"
    start "$c"
    $q "create table v as select 1 as id" >/dev/null
    $q "select pg_switch_wal()" >/dev/null
    local last_seg=$((cut_seg + 1))
    wait_archived "$arch" "$(seg_name $last_seg)"
    stop "$c"

    # Point-in-time recovery of the base backup to 'before_drop'. Archive
    # recovery that reaches its target (not a standby's promotion) ends with
    # an end-of-recovery checkpoint, XLOG_CHECKPOINT_SHUTDOWN with
    # ThisTimeLineID 2 and PrevTimeLineID 1 (xlog.c, PerformRecoveryXLogAction
    # and CreateCheckPoint), in the first segment of timeline 2.
    log "PostgreSQL 15: point-in-time recovery to 'before_drop' (timeline 2)"
    cat >>"$r/postgresql.auto.conf" <<EOF
port = $rport
restore_command = 'cp $arch/%f %p'
recovery_target_name = 'before_drop'
recovery_target_action = 'promote'
EOF
    as_pg touch "$r/recovery.signal"
    echo "$bin" >"$r/.bin"
    start "$r"
    for i in $(seq 1 120); do
        [ "$(sql "$bin" $rport "select pg_is_in_recovery()")" = f ] && break
        sleep 0.5
    done
    [ "$(sql "$bin" $rport "select pg_is_in_recovery()")" = f ] || die "point-in-time recovery never ended (see $r.log)"
    local tli2_seg
    tli2_seg=00000002$(seg_name "$first_seg" | cut -c9-)
    sql "$bin" $rport "select pg_switch_wal()" >/dev/null
    wait_archived "$arch" "$tli2_seg"
    stop "$r"

    log "PostgreSQL 15: collect WAL of the records story"
    local segs=() s
    for s in $(seq "$first_seg" "$last_seg"); do
        segs+=("$(seg_name "$s")")
        cp "$arch/$(seg_name "$s")" "$dst/.raw/wal/"
    done
    # pg_waldump over the whole archive, in two runs: the first ends at the
    # record the crash cut (its end was never archived), the second starts at
    # the segment recovery rewrote.
    rm -rf "$work/dump" && mkdir -p "$work/dump" && cp "$dst"/.raw/wal/0* "$work/dump/" && chown -R pgvtest: "$work/dump"
    # (Logical message payloads, printed in hex, are cut short.)
    as_pg "$bin/pg_waldump" -p "$work/dump" "${segs[0]}" "$(seg_name "$cut_seg")" 2>&1 |
        sed -E 's/(payload \([0-9]+ bytes\):).*/\1 .../' >"$dst/.raw/waldump-before-crash.txt" || true
    as_pg "$bin/pg_waldump" -p "$work/dump" "$(seg_name $((cut_seg + 1)))" "$(seg_name $last_seg)" 2>&1 |
        sed -E 's/(payload \([0-9]+ bytes\):).*/\1 .../' >"$dst/.raw/waldump-after-crash.txt" || true
    mkdir -p "$dst/wal"
    for s in "${segs[@]}"; do zst "$dst/.raw/wal/$s" "$dst/wal/$s.zst"; done
    # Timeline 2's segment alone (it begins with timeline 1's WAL up to the
    # recovery target, copied).
    rm -rf "$work/dump" && mkdir -p "$work/dump" && cp "$arch/$tli2_seg" "$work/dump/" && chown -R pgvtest: "$work/dump"
    as_pg "$bin/pg_waldump" -p "$work/dump" "$tli2_seg" >"$dst/.raw/waldump-timeline2.txt" 2>&1 || true
    zst "$arch/$tli2_seg" "$dst/wal/$tli2_seg.zst"
    zst "$dst/.raw/waldump-before-crash.txt" "$dst/wal/waldump-before-crash.txt.zst"
    zst "$dst/.raw/waldump-after-crash.txt" "$dst/wal/waldump-after-crash.txt.zst"
    zst "$dst/.raw/waldump-timeline2.txt" "$dst/wal/waldump-timeline2.txt.zst"
    local IFS=,
    cat >"$dst/.raw/meta.json" <<EOF
{
  "major": 15,
  "server_version": $(json_str "$(as_pg "$bin/postgres" --version)"),
  "initdb_options": "--wal-segsize=1",
  "seg_size": 1048576,
  "segments": [$(printf '"%s",' "${segs[@]}" | sed 's/,$//')],
  "commits": [${commits[*]}],
  "abort_xid": $abort_xid,
  "abort_prepared": {"xid": $prep_abort, "gid": "p_abort"},
  "restore_points_returned": {"before_drop": "$rp1", "after drop, with spaces": "$rp2"},
  "big_message_end": "$big_end",
  "switch_segment": "$(seg_name "$switch_seg")",
  "split_header_lsn": "$split_lsn",
  "cut_segment": "$(seg_name "$cut_seg")",
  "cut_record_end_lost": "$cut_end",
  "overwrite_segment": "$(seg_name $((cut_seg + 1)))",
  "timeline2_segment": "$tli2_seg"
}
EOF
    unset IFS
    records_facts "$dst"
    rm -rf "$dst/.raw"
}

# records_facts DIR — DIR/facts.json for the records story, from meta.json and
# the pg_waldump text (never from pgvault's own parser)
records_facts() {
    python3 - "$1" <<'PY'
import json, os, re, sys
d = sys.argv[1]
raw = os.path.join(d, ".raw")
facts = json.load(open(os.path.join(raw, "meta.json")))
facts["generated_by"] = "scripts/make-fixtures.sh records"
seg_size = facts["seg_size"]
line_re = re.compile(r"^rmgr: (\S+)\s+len \(rec/tot\):\s*(\d+)/\s*(\d+), tx:\s*(\d+), lsn: ([0-9A-F]+)/([0-9A-F]+), prev [0-9A-F/]+, desc: (.*)$")
def lsn_str(v):
    return "%X/%X" % (v >> 32, v & 0xFFFFFFFF)
def parse_lsn(s):
    hi, lo = s.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)
all_recs = []
for dump, tli in (("waldump-before-crash.txt", 1), ("waldump-after-crash.txt", 1), ("waldump-timeline2.txt", 2)):
    for line in open(os.path.join(raw, dump)):
        m = line_re.match(line.rstrip("\n"))
        if m:
            rmgr, rec, tot, tx, hi, lo, desc = m.groups()
            all_recs.append({"rmgr": rmgr, "tot_len": int(tot), "xid": int(tx), "tli": tli,
                             "lsn": (int(hi, 16) << 32) | int(lo, 16), "desc": desc})
# The story's own records; timeline 2 repeats some of them.
recs = [r for r in all_recs if r["tli"] == 1]
segs = {}
for name in facts["segments"] + [facts["timeline2_segment"]]:
    tli = int(name[0:8], 16)
    segno = int(name[8:16], 16) * (0x100000000 // seg_size) + int(name[16:24], 16)
    start = segno * seg_size
    inside = [r for r in all_recs if r["tli"] == tli and start <= r["lsn"] < start + seg_size]
    segs[name] = {
        "start": lsn_str(start),
        "waldump_records": len(inside),
        "waldump_first_lsn": lsn_str(inside[0]["lsn"]) if inside else None,
        "waldump_last_lsn": lsn_str(inside[-1]["lsn"]) if inside else None,
        "commits": sum(1 for r in inside if r["rmgr"] == "Transaction" and r["desc"].startswith("COMMIT")),
        "aborts": sum(1 for r in inside if r["rmgr"] == "Transaction" and r["desc"].startswith("ABORT")),
    }
facts["wal"] = segs
def one(pred, what):
    found = [r for r in recs if pred(r)]
    if len(found) != 1:
        sys.exit("records_facts: expected one %s record, found %d" % (what, len(found)))
    return found[0]
# Restore points: the record's own LSN, from pg_waldump ("RESTORE_POINT name").
facts["restore_points"] = []
for name, returned in facts["restore_points_returned"].items():
    r = one(lambda r: r["rmgr"] == "XLOG" and r["desc"] == "RESTORE_POINT " + name, "restore point " + name)
    facts["restore_points"].append({"name": name, "lsn": lsn_str(r["lsn"]), "end": returned})
for c in facts["commits"]:
    if "gid" in c:
        # COMMIT PREPARED runs outside the prepared transaction (tx 0);
        # pg_waldump prints the prepared xid from the record's main data.
        r = one(lambda r: r["rmgr"] == "Transaction" and r["desc"].startswith("COMMIT_PREPARED %d:" % c["xid"]), "commit prepared " + c["gid"])
    else:
        r = one(lambda r: r["rmgr"] == "Transaction" and r["xid"] == c["xid"] and r["desc"].startswith("COMMIT"), "commit of %d" % c["xid"])
    c["lsn"] = lsn_str(r["lsn"])
ap = facts["abort_prepared"]
r = one(lambda r: r["rmgr"] == "Transaction" and r["desc"].startswith("ABORT_PREPARED %d:" % ap["xid"]), "abort prepared")
ap["lsn"] = lsn_str(r["lsn"])
r = one(lambda r: r["rmgr"] == "Transaction" and r["xid"] == facts["abort_xid"], "abort")
assert r["desc"].startswith("ABORT"), r
facts["abort_lsn"] = lsn_str(r["lsn"])
big = one(lambda r: r["rmgr"] == "LogicalMessage" and r["tot_len"] > 2000000, "big message")
facts["big_message"] = {"lsn": lsn_str(big["lsn"]), "tot_len": big["tot_len"]}
sp = one(lambda r: r["lsn"] == parse_lsn(facts["split_header_lsn"]), "split header")
assert sp["rmgr"] == "LogicalMessage" and '"split"' in sp["desc"], sp
# XLOG_SWITCH records, by the segment they are in
facts["xlog_switches"] = {}
for name, seg in segs.items():
    start = parse_lsn(seg["start"])
    for r in recs:
        if r["rmgr"] == "XLOG" and r["desc"].startswith("SWITCH") and start <= r["lsn"] < start + seg_size:
            facts["xlog_switches"][name] = lsn_str(r["lsn"])
ow = one(lambda r: r["rmgr"] == "XLOG" and r["desc"].startswith("OVERWRITE_CONTRECORD"), "overwrite contrecord")
facts["overwrite_contrecord"] = {"lsn": lsn_str(ow["lsn"]), "desc": ow["desc"]}
m = re.match(r"OVERWRITE_CONTRECORD lsn ([0-9A-F]+/[0-9A-F]+)", ow["desc"])
facts["overwrite_contrecord"]["aborted_lsn"] = lsn_str(parse_lsn(m.group(1)))
ck = [r for r in all_recs if r["tli"] == 2 and r["rmgr"] == "XLOG" and r["desc"].startswith("CHECKPOINT_SHUTDOWN")
      and "; tli 2; prev tli 1;" in r["desc"]]
if len(ck) != 1:
    sys.exit("records_facts: expected one end-of-recovery checkpoint on timeline 2, found %d" % len(ck))
facts["end_of_recovery_checkpoint"] = {"segment": facts["timeline2_segment"], "lsn": lsn_str(ck[0]["lsn"]),
                                       "from": 1, "to": 2}
with open(os.path.join(d, "facts.json"), "w") as f:
    json.dump(facts, f, indent=2, sort_keys=True)
    f.write("\n")
PY
}

###############################################################################
# PostgreSQL 14 to 18: block references and storage events (pgNN-blockrefs/)
###############################################################################
# The workload, as psql input, in database postgres; psql variables: TS (the
# tablespace's directory) and fc_strategy ("strategy file_copy" on 15+).
blockrefs_sql() {
    cat <<'SQL'
\set ON_ERROR_STOP 1
checkpoint;
create table t (id int primary key, v text);
insert into t select g, 'v' || g from generate_series(1, 1500) g;
update t set v = v || 'x' where id % 10 = 0;
create sequence s;
select nextval('s') from generate_series(1, 40) \g /dev/null
-- DELETE + VACUUM: the table's empty tail is cut (XLOG_SMGR_TRUNCATE).
insert into t select g, 'v' || g from generate_series(1501, 3000) g;
delete from t where id > 1500;
vacuum t;
-- TRUNCATE: a new relation file, the old one dropped at commit.
create table t2 as select g as id from generate_series(1, 1000) g;
truncate t2;
insert into t2 values (1), (2);
-- Created and filled in one transaction, then dropped.
create table t3 as select g as id, repeat('y', 100) as pad from generate_series(1, 1000) g;
drop table t3;
-- Created in an aborted transaction: dropped at abort.
begin;
create table t4 (id int);
insert into t4 select generate_series(1, 500);
rollback;
-- Prepared transactions: one rolled back (its table dropped by ROLLBACK
-- PREPARED), one committed that drops a table.
begin;
create table t5 (id int);
insert into t5 values (1);
prepare transaction 'p_create';
rollback prepared 'p_create';
create table t6 (id int);
begin;
drop table t6;
prepare transaction 'p_drop';
commit prepared 'p_drop';
-- Indexes: hash (its bucket splits extend the file past blocks nothing
-- writes yet) and GIN (a build, then the pending list).
create index t_hash on t using hash (id);
insert into t select g, 'v' || g from generate_series(1501, 4000) g;
create table docs (id int, tags text[]);
insert into docs select g, array['a' || (g % 17), 'b' || (g % 31)] from generate_series(1, 1000) g;
create index docs_gin on docs using gin (tags);
insert into docs select g, array['c' || (g % 7)] from generate_series(1001, 1300) g;
-- An unlogged table: its init fork is WAL-logged, its main fork not.
create unlogged table u (id int);
insert into u select generate_series(1, 1000);
-- A tablespace: created, a table moved there and back, dropped.
create tablespace ts location :'TS';
alter table t2 set tablespace ts;
insert into t2 values (3);
alter table t2 set tablespace pg_default;
drop tablespace ts;
-- VACUUM FULL: new relation files for t and its indexes.
vacuum full t;
-- A database copied whole (FILE_COPY, the only strategy before 15), dropped.
create database db_fc template template0 :fc_strategy;
drop database db_fc;
SQL
}

# blockrefs_facts DIR — DIR/facts.json and DIR/blockrefs.json.zst from the
# pg_waldump -b text and meta.json in DIR/.raw (never from pgvault's parser)
blockrefs_facts() {
    python3 - "$1" <<'PY'
import json, os, re, sys
d = sys.argv[1]
raw = os.path.join(d, ".raw")
facts = json.load(open(os.path.join(raw, "meta.json")))
facts["generated_by"] = "scripts/make-fixtures.sh blockrefs"
seg_size = facts["seg_size"]
rec_re = re.compile(r"^rmgr: (\S+)\s+len \(rec/tot\):\s*(\d+)/\s*(\d+), tx:\s*(\d+), lsn: ([0-9A-F]+)/([0-9A-F]+), prev [0-9A-F/]+, desc: (.*)$")
blk_re = re.compile(r"^\s+blkref #\d+: rel (\d+)/(\d+)/(\d+) fork (\w+) blk (\d+)")
path_re = re.compile(r"^(?:base/(\d+)/(\d+)|global/(\d+)|pg_tblspc/(\d+)/[^/]+/(\d+)/(\d+))(?:_(fsm|vm|init))?$")
def rel_of(path):
    m = path_re.match(path)
    if not m:
        sys.exit("blockrefs_facts: cannot read relation path %r" % path)
    g = m.groups()
    if g[0]:
        spc, db, rel = 1663, int(g[0]), int(g[1])
    elif g[2]:
        spc, db, rel = 1664, 0, int(g[2])
    else:
        spc, db, rel = int(g[3]), int(g[4]), int(g[5])
    return "%d/%d/%d/%s" % (spc, db, rel, g[6] or "main")
segs = {}
cur = None
records = 0
for line in open(os.path.join(raw, "waldump.txt")):
    line = line.rstrip("\n")
    m = rec_re.match(line)
    if m:
        rmgr, _, tot, _, hi, lo, desc = m.groups()
        lsn = (int(hi, 16) << 32) | int(lo, 16)
        records += 1
        cur = segs.setdefault(str(lsn // seg_size), {"blocks": {}, "events": [], "records": 0})
        cur["records"] += 1
        ev = None
        if rmgr == "Storage" and desc.startswith("CREATE "):
            ev = ["create", rel_of(desc.split()[1])]
        elif rmgr == "Storage" and desc.startswith("TRUNCATE "):
            mt = re.match(r"TRUNCATE (\S+) to (\d+) blocks flags (\d+)", desc)
            ev = ["truncate", rel_of(mt.group(1)), int(mt.group(2)), int(mt.group(3))]
        elif rmgr == "Transaction" and re.match(r"(COMMIT|ABORT)(_PREPARED)?\b", desc):
            mr = re.search(r"; rels: ([^;]*)", desc)
            if mr:
                ev = ["drop", [rel_of(p) for p in mr.group(1).split()]]
        elif rmgr == "Database":
            mc = re.search(r"copy dir (\d+)/(\d+) to (\d+)/(\d+)", desc)
            mw = re.search(r"create dir (\d+)/(\d+)", desc)
            if mc:
                ev = ["db_copy", int(mc.group(3)), int(mc.group(4))]
            elif mw:
                ev = ["db_create", int(mw.group(1)), int(mw.group(2))]
            elif "DROP" in desc:
                ev = ["db_drop", [[int(a), int(b)] for a, b in re.findall(r"(\d+)/(\d+)", desc)]]
            else:
                sys.exit("blockrefs_facts: unknown Database record %r" % desc)
        elif rmgr == "Tablespace":
            mt = re.match(r"(CREATE|DROP) (\d+)", desc)
            ev = ["ts_" + mt.group(1).lower(), int(mt.group(2))]
        if ev:
            ev.insert(1, "%X/%X" % (lsn >> 32, lsn & 0xFFFFFFFF))
            cur["events"].append(ev)
        continue
    m = blk_re.match(line)
    if m and cur is not None:
        key = "%s/%s/%s/%s" % m.groups()[:4]
        cur["blocks"].setdefault(key, set()).add(int(m.group(5)))
def ranges(blocks):
    out, start, prev = [], None, None
    for b in sorted(blocks):
        if start is None:
            start = prev = b
        elif b == prev + 1:
            prev = b
        else:
            out.append([start, prev])
            start = prev = b
    if start is not None:
        out.append([start, prev])
    return out
for s in segs.values():
    s["blocks"] = {k: ranges(v) for k, v in sorted(s["blocks"].items())}
facts["waldump_records"] = records
facts["events"] = sorted({e[0] for s in segs.values() for e in s["events"]})
with open(os.path.join(raw, "blockrefs.json"), "w") as f:
    json.dump({"by_segment": segs}, f, sort_keys=True)
with open(os.path.join(d, "facts.json"), "w") as f:
    json.dump(facts, f, indent=2, sort_keys=True)
    f.write("\n")
PY
    zst "$1/.raw/blockrefs.json" "$1/blockrefs.json.zst"
}

# make_blockrefs MAJOR PORT — pgMAJOR-blockrefs/
make_blockrefs() {
    local major=$1 port=$2 bin dst=$out/pg$1-blockrefs c=$work/pg$1-blockrefs compression
    if [ "$major" = 15 ]; then bin=$pg15_bin; else bin=$("$here/fetch-pg.sh" "$major"); fi
    # Full-page images in every form their headers take: plain, and
    # compressed with and without a hole (the flag bits differ in 14).
    case $major in 14) compression=on ;; 15) compression=lz4 ;; 16) compression=off ;; 17) compression=zstd ;; *) compression=pglz ;; esac
    log "PostgreSQL $major: block references story (pg$major-blockrefs, wal_compression=$compression)"
    rm -rf "$dst" && mkdir -p "$dst/.raw"
    local opts=(--wal-segsize=1)
    [ "$major" -lt 18 ] && opts+=(--data-checksums)
    new_cluster "$bin" "$c" "$port" "${opts[@]}"
    printf '%s\n' "max_prepared_transactions = 4" "wal_compression = $compression" >>"$c/postgresql.conf"
    [ "$major" -ge 17 ] && echo "summarize_wal = on" >>"$c/postgresql.conf"
    start "$c"
    local ts=$work/ts-$major
    mkdir -p "$ts" && chown pgvtest: "$ts"
    sql "$bin" "$port" "select pg_switch_wal()" >/dev/null
    local story_start first_seg
    story_start=$(sql "$bin" "$port" "select pg_current_wal_lsn()")
    first_seg=$(seg_of "$story_start")
    local fc=""
    [ "$major" -ge 15 ] && fc="strategy file_copy"
    blockrefs_sql | as_pg "$bin/psql" -X -q -p "$port" -v TS="$ts" -v fc_strategy="$fc" >/dev/null ||
        die "the block references workload failed on PostgreSQL $major"
    if [ "$major" = 17 ]; then
        # A database created block by block, and written to: template0's
        # pages as full-page images, a megabyte of fixture even compressed,
        # so on the major of the WAL summaries' cross-check only (15 to 18
        # share the record's layout).
        sql "$bin" "$port" "create database db_wl template template0 strategy wal_log" >/dev/null
        as_pg "$bin/psql" -X -q -v ON_ERROR_STOP=1 -p "$port" -d db_wl \
            -c "create table w as select generate_series(1, 1000) as id" >/dev/null
    fi
    sql "$bin" "$port" "checkpoint" >/dev/null
    local story_end last_seg
    story_end=$(sql "$bin" "$port" "select pg_current_wal_lsn()")
    last_seg=$(seg_of "$story_end")
    sql "$bin" "$port" "select pg_switch_wal()" >/dev/null
    wait_archived "$c.archive" "$(seg_name "$last_seg")"
    local summaries=0 ranges=null
    if [ "$major" -ge 17 ]; then
        # pg_wal_summary_contents() of the summaries inside the story, once
        # the summarizer has passed the last checkpoint's redo point.
        local redo i
        redo=$(sql "$bin" "$port" "select redo_lsn from pg_control_checkpoint()")
        for i in $(seq 1 120); do
            [ "$(sql "$bin" "$port" "select summarized_lsn >= '$redo'::pg_lsn from pg_get_wal_summarizer_state()")" = t ] && break
            sleep 0.5
        done
        local inside="s.start_lsn >= '$story_start' and s.end_lsn <= '$story_end'"
        sql "$bin" "$port" "copy (select s.start_lsn, s.end_lsn, c.reltablespace, c.reldatabase, c.relfilenode, c.relforknumber, c.relblocknumber, c.is_limit_block from pg_available_wal_summaries() s, pg_wal_summary_contents(s.tli, s.start_lsn, s.end_lsn) c where $inside order by 1, 3, 4, 5, 6, 7) to stdout with (format csv)" >"$dst/.raw/summaries.csv"
        summaries=$(sql "$bin" "$port" "select count(*) from pg_available_wal_summaries() s where $inside")
        [ "$summaries" -gt 0 ] || die "PostgreSQL $major wrote no WAL summary inside the story"
        ranges=$(sql "$bin" "$port" "select json_agg(json_build_object('start', s.start_lsn::text, 'end', s.end_lsn::text) order by s.start_lsn) from pg_available_wal_summaries() s where $inside")
        zst "$dst/.raw/summaries.csv" "$dst/summaries.csv.zst"
    fi
    stop "$c"
    local segs=() s
    rm -rf "$work/dump" && mkdir -p "$work/dump"
    for s in $(seq "$first_seg" "$last_seg"); do
        segs+=("$(seg_name "$s")")
        cp "$c.archive/$(seg_name "$s")" "$work/dump/"
    done
    chown -R pgvtest: "$work/dump"
    as_pg "$bin/pg_waldump" -b -p "$work/dump" "${segs[0]}" "${segs[-1]}" >"$dst/.raw/waldump.txt" 2>"$work/waldump.err" || true
    mkdir -p "$dst/wal"
    for s in "${segs[@]}"; do zst "$work/dump/$s" "$dst/wal/$s.zst"; done
    local IFS=,
    cat >"$dst/.raw/meta.json" <<EOF
{
  "major": $major,
  "server_version": $(json_str "$(as_pg "$bin/postgres" --version)"),
  "initdb_options": "${opts[*]}",
  "wal_compression": "$compression",
  "seg_size": 1048576,
  "story_start": "$story_start",
  "story_end": "$story_end",
  "segments": [$(printf '"%s",' "${segs[@]}" | sed 's/,$//')],
  "summaries": $summaries,
  "summary_ranges": $ranges
}
EOF
    unset IFS
    blockrefs_facts "$dst"
    rm -rf "$dst/.raw"
}

###############################################################################
# PostgreSQL 15: data pages with checksums (pg15-pages/)
###############################################################################
make_pg15_pages() {
    local bin=$pg15_bin port=54351 dst=$out/pg15-pages c=$work/pg15-pages
    log "PostgreSQL 15: data pages with checksums"
    rm -rf "$dst" && mkdir -p "$dst"
    new_cluster "$bin" "$c" "$port" --data-checksums
    start "$c"
    sql "$bin" "$port" "create table t as select g as id, md5(g::text) as v from generate_series(1, 600) g" >/dev/null
    local rel
    rel=$(sql "$bin" "$port" "select pg_relation_filepath('t')")
    sql "$bin" "$port" "checkpoint" >/dev/null
    stop "$c"
    # Four blocks of the main fork: pages of segment 0, blocks 0..3.
    dd if="$c/$rel" of="$dst/t.main" bs=8192 count=4 status=none
    python3 - "$dst" "$rel" <<'PY'
import json, os, struct, sys
d, rel = sys.argv[1:3]
data = open(os.path.join(d, "t.main"), "rb").read()
pages = []
for n in range(len(data) // 8192):
    p = data[n * 8192:(n + 1) * 8192]
    hi, lo, checksum, flags, lower, upper = struct.unpack_from("<IIHHHH", p, 0)
    pages.append({"block": n, "pd_lsn": "%X/%X" % (hi, lo), "pd_checksum": checksum, "pd_upper": upper})
facts = {"file": "t.main", "relation_path": rel, "first_block": 0, "pages": pages}
with open(os.path.join(d, "facts.json"), "w") as f:
    json.dump(facts, f, indent=2, sort_keys=True)
    f.write("\n")
PY
}

mkdir -p "$out"
case " ${stories[*]} " in *" all "* | *" clusters "*)
    make_pg15
    make_pg15_16mib
    make_small 14 54341
    make_small 16 54361
    make_small 17 54371
    make_small 18 54381
    ;;
esac
case " ${stories[*]} " in *" all "* | *" records "*) make_pg15_records ;; esac
case " ${stories[*]} " in *" all "* | *" pages "*) make_pg15_pages ;; esac
case " ${stories[*]} " in *" all "* | *" blockrefs "*)
    for m in ${PGVAULT_BLOCKREFS_MAJORS:-14 15 16 17 18}; do make_blockrefs "$m" "$((54302 + 10 * (m - 10)))"; done
    ;;
esac
chmod -R a+rX "$out"
log "fixtures written to $out ($(du -sh "$out" | cut -f1))"
