# shellcheck shell=bash
# Helpers shared by scripts/test.sh (and anything else that needs the test
# services): install what the integration tests need on a fresh Debian 12
# machine, idempotently, and start/stop the S3-API servers on loopback.
#
# Source it; it does not change shell options. Every function is safe to call
# twice. Variables it sets for the caller:
#   PGV_PGBIN        PostgreSQL 15 binaries
#   PGV_TEST_USER    unprivileged OS user that runs postgres (PostgreSQL
#                    refuses to run as root)
#   PGV_MOTO_PY      a python3 that can import moto (and boto3)
#   PGV_PROM_PY      a python3 that can import prometheus_client
#   PGV_S3SFS_BIN    the s3s-fs binary
#   PGV_PATRONI_BIN  the directory holding patroni and patronictl (a venv)
#   PGV_ETCD_BIN     etcd (Debian's etcd-server)
#   PGV_MOTO_URL / PGV_S3SFS_URL   endpoints once started
#   PGV_ETCD_HOSTS   host:port of the etcd started on loopback
#   PGV_S3_ACCESS_KEY / PGV_S3_SECRET_KEY / PGV_S3_REGION / PGV_S3_BUCKET
#   PGV_AZURITE_BIN  Azurite's blob service (Azure Blob Storage emulator)
#   PGV_AZURITE_URL  its blob endpoint with the account, once started

PGV_CACHE="${PGVAULT_CACHE:-/var/cache/pgvault}"
PGV_PGBIN="/usr/lib/postgresql/15/bin"
PGV_TEST_USER="${PGVAULT_TEST_USER:-pgvtest}"
PGV_S3SFS_VERSION="0.14.1"
PGV_S3SFS_ROOT_DIR="$PGV_CACHE/s3s-fs"
PGV_S3SFS_BIN="$PGV_S3SFS_ROOT_DIR/bin/s3s-fs"
# Test-only credentials: moto accepts anything, s3s-fs checks SigV4
# signatures against exactly this pair.
PGV_S3_ACCESS_KEY="pgvault-test-key"
PGV_S3_SECRET_KEY="pgvault-test-secret"
PGV_S3_REGION="us-east-1"
PGV_S3_BUCKET="pgvault-test"
PGV_MOTO_PY="${PGV_MOTO_PY:-}"
PGV_PROM_PY=""
PGV_MOTO_URL=""
PGV_S3SFS_URL=""
PGV_PATRONI_BIN="$PGV_CACHE/patroni-venv/bin"
PGV_ETCD_BIN="/usr/bin/etcd"
PGV_ETCD_HOSTS=""
PGV_AZURITE_VERSION="3.37.0"
PGV_AZURITE_BIN="/usr/local/bin/azurite-blob"
PGV_AZURITE_URL=""
# Azurite's one built-in account and its published, well-known key.
PGV_AZURITE_ACCOUNT="devstoreaccount1"
PGV_AZURITE_KEY="Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# pids of what we started, stopped by pgv_stop_services
PGV_PIDS=()
PGV_APT_UPDATED=0

pgv_log() {
    printf '==> %s\n' "$*" >&2
}

pgv_die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# apt-get install only what is missing; `apt-get update` at most once.
pgv_apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
            missing+=("$pkg")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$PGV_APT_UPDATED" -eq 0 ]; then
        pgv_log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        PGV_APT_UPDATED=1
    fi
    pgv_log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pgv_ensure_postgres() {
    if [ ! -x "$PGV_PGBIN/postgres" ] || [ ! -x "$PGV_PGBIN/pgbench" ]; then
        # postgresql-contrib-15 is a virtual package provided by
        # postgresql-15 in bookworm; install the real package.
        pgv_apt_install postgresql-15 postgresql-client-15
    fi
    [ -x "$PGV_PGBIN/initdb" ] || pgv_die "no PostgreSQL 15 at $PGV_PGBIN after install"
}

pgv_ensure_tools() {
    local need=()
    command -v zstd >/dev/null || need+=(zstd)
    command -v runuser >/dev/null || need+=(util-linux)
    command -v python3 >/dev/null || need+=(python3)
    # The package test (tests/it/package.rs): systemd-analyze verify, which
    # runs man for each unit's Documentation=man:…; cargo deb's $auto
    # dependencies come from dpkg-shlibdeps.
    command -v systemd-analyze >/dev/null || need+=(systemd)
    command -v man >/dev/null || need+=(man-db)
    command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
    if [ "${#need[@]}" -gt 0 ]; then
        pgv_apt_install "${need[@]}"
    fi
}

# cargo-deb from crates.io, once (scripts/package.sh builds the .deb with
# it; a few minutes of compiling the first time).
pgv_ensure_cargo_deb() {
    if ! cargo deb --version >/dev/null 2>&1; then
        pgv_log "cargo install cargo-deb (once)"
        env -u CARGO_TARGET_DIR cargo install cargo-deb --locked --quiet
    fi
    cargo deb --version >/dev/null 2>&1 || pgv_die "cargo deb does not run after install"
}

pgv_ensure_user() {
    if ! id -u "$PGV_TEST_USER" >/dev/null 2>&1; then
        pgv_log "useradd $PGV_TEST_USER"
        useradd --system --create-home "$PGV_TEST_USER"
    fi
}

# pgv_externally_managed PYTHON: true when pip may not install into it.
pgv_externally_managed() {
    "$1" -c 'import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)' 2>/dev/null
}

# Find (or install) a python3 that has moto's server. Prefer the machine's
# python3 (pyenv here); fall back to a venv under the cache when pip refuses
# to touch a Debian-managed interpreter (PEP 668).
pgv_ensure_moto() {
    local py venv="$PGV_CACHE/moto-venv"
    for py in "$PGV_MOTO_PY" python3 "$venv/bin/python3"; do
        [ -n "$py" ] || continue
        if "$py" -c 'import moto.server, boto3' >/dev/null 2>&1; then
            PGV_MOTO_PY="$(command -v "$py")"
            return 0
        fi
    done
    if pgv_externally_managed python3; then
        # Debian's own python3 refuses pip installs (PEP 668).
        pgv_log "python3 is externally managed: installing moto in a venv"
    else
        pgv_log "pip install 'moto[server]'"
        if python3 -m pip install --quiet --disable-pip-version-check 'moto[server]' &&
            python3 -c 'import moto.server, boto3' >/dev/null 2>&1; then
            PGV_MOTO_PY="$(command -v python3)"
            if command -v pyenv >/dev/null; then pyenv rehash || true; fi
            return 0
        fi
    fi
    pgv_log "pip install 'moto[server]' into $venv"
    python3 -m venv --help >/dev/null 2>&1 || pgv_apt_install python3-venv python3-pip
    python3 -m venv "$venv" || { pgv_apt_install python3-venv python3-pip && python3 -m venv "$venv"; }
    "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check 'moto[server]'
    PGV_MOTO_PY="$venv/bin/python3"
    "$PGV_MOTO_PY" -c 'import moto.server, boto3' || pgv_die "moto is not importable after install"
}

# A python3 that has prometheus_client, whose parsers check pgvault's
# OpenMetrics output (tests/it/metrics.rs): the machine's python3, or
# moto's venv when pip may not touch the machine's (PEP 668).
pgv_ensure_prometheus_client() {
    local py
    for py in python3 "$PGV_MOTO_PY"; do
        [ -n "$py" ] || continue
        if "$py" -c 'import prometheus_client.openmetrics.parser' >/dev/null 2>&1; then
            PGV_PROM_PY="$(command -v "$py")"
            return 0
        fi
    done
    if pgv_externally_managed python3; then
        py="$PGV_MOTO_PY"
    else
        py="$(command -v python3)"
    fi
    pgv_log "pip install prometheus_client into $py"
    "$py" -m pip install --quiet --disable-pip-version-check prometheus_client
    "$py" -c 'import prometheus_client.openmetrics.parser' || pgv_die "prometheus_client is not importable after install"
    PGV_PROM_PY="$py"
}

# Build s3s-fs once and keep it in the cache (about 2 minutes on 2 cores).
pgv_ensure_s3sfs() {
    if [ -x "$PGV_S3SFS_BIN" ]; then
        return 0
    fi
    pgv_log "cargo install s3s-fs@$PGV_S3SFS_VERSION (cached in $PGV_S3SFS_ROOT_DIR)"
    mkdir -p "$PGV_S3SFS_ROOT_DIR"
    # Build in cargo's own temporary target dir, not the caller's.
    env -u CARGO_TARGET_DIR cargo install "s3s-fs@$PGV_S3SFS_VERSION" \
        --features binary --locked --root "$PGV_S3SFS_ROOT_DIR" --quiet
    [ -x "$PGV_S3SFS_BIN" ] || pgv_die "s3s-fs did not build"
}

# Patroni (PyPI patroni[etcd] with psycopg 3) in a venv of its own under the
# cache, and Debian's etcd for its DCS (tests/it/patroni.rs; Patroni speaks
# etcd's v3 API, its etcd3 section). Patroni runs as the test user, so the
# venv is built on Debian's /usr/bin/python3: an interpreter under root's
# home (pyenv) is out of that user's reach.
pgv_ensure_patroni() {
    local venv="$PGV_CACHE/patroni-venv" py=/usr/bin/python3
    [ -x "$PGV_ETCD_BIN" ] || pgv_apt_install etcd-server
    if ! runuser -u "$PGV_TEST_USER" -- "$PGV_PATRONI_BIN/python3" -c 'import patroni, psycopg, etcd' >/dev/null 2>&1; then
        pgv_log "pip install 'patroni[etcd,psycopg3]' into $venv"
        [ -x "$py" ] || pgv_apt_install python3
        "$py" -m venv --help >/dev/null 2>&1 || pgv_apt_install python3-venv python3-pip
        rm -rf "$venv"
        "$py" -m venv "$venv" || { pgv_apt_install python3-venv python3-pip && "$py" -m venv "$venv"; }
        "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check 'patroni[etcd,psycopg3]'
        chmod -R a+rX "$venv"
    fi
    runuser -u "$PGV_TEST_USER" -- "$PGV_PATRONI_BIN/patroni" --version >/dev/null ||
        pgv_die "patroni does not run as $PGV_TEST_USER after install"
}

# Azurite (Microsoft's Azure Storage emulator) from npm; Node and npm from
# Debian when missing.
pgv_ensure_azurite() {
    if [ -x "$PGV_AZURITE_BIN" ]; then
        return 0
    fi
    command -v npm >/dev/null || pgv_apt_install nodejs npm
    pgv_log "npm install -g azurite@$PGV_AZURITE_VERSION"
    npm install -g --prefix /usr/local --silent "azurite@$PGV_AZURITE_VERSION" >/dev/null
    [ -x "$PGV_AZURITE_BIN" ] || pgv_die "azurite-blob is not at $PGV_AZURITE_BIN after install"
}

pgv_install_all() {
    pgv_ensure_tools
    pgv_ensure_postgres
    pgv_ensure_user
    pgv_ensure_moto
    pgv_ensure_prometheus_client
    pgv_ensure_s3sfs
    pgv_ensure_patroni
    pgv_ensure_azurite
    pgv_ensure_cargo_deb
}

# A free TCP port on 127.0.0.1 (the kernel picks; a tiny race with other
# processes is possible, and the wait below notices it).
pgv_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# pgv_wait_port PORT PID LOG: wait until something accepts connections on
# 127.0.0.1:PORT, or fail with the server's log if it dies or takes more than
# 60 s. (A TCP probe, not an HTTP request: an unsigned request would only
# leave an authentication error in s3s-fs's log.)
pgv_wait_port() {
    local port="$1" pid="$2" log="$3" i
    for i in $(seq 1 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            printf 'server on port %s exited; its log (%s):\n' "$port" "$log" >&2
            tail -n 50 "$log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
    printf 'server on port %s did not listen within 60 s; its log (%s):\n' "$port" "$log" >&2
    tail -n 50 "$log" >&2 || true
    return 1
}

# pgv_create_bucket URL: create $PGV_S3_BUCKET through the S3 API.
pgv_create_bucket() {
    AWS_ACCESS_KEY_ID="$PGV_S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$PGV_S3_SECRET_KEY" \
        "$PGV_MOTO_PY" - "$1" "$PGV_S3_BUCKET" "$PGV_S3_REGION" <<'EOF'
import sys, boto3
url, bucket, region = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=url, region_name=region)
try:
    s3.create_bucket(Bucket=bucket)
except s3.exceptions.BucketAlreadyOwnedByYou:
    pass
s3.head_bucket(Bucket=bucket)
EOF
}

# pgv_start_moto LOGDIR: moto's S3 server on a free loopback port.
pgv_start_moto() {
    local logdir="$1" port pid
    mkdir -p "$logdir"
    port="$(pgv_free_port)"
    pgv_log "starting moto on 127.0.0.1:$port (log: $logdir/moto.log)"
    "$PGV_MOTO_PY" -m moto.server -H 127.0.0.1 -p "$port" >"$logdir/moto.log" 2>&1 &
    pid=$!
    PGV_PIDS+=("$pid")
    pgv_wait_port "$port" "$pid" "$logdir/moto.log"
    PGV_MOTO_URL="http://127.0.0.1:$port"
    pgv_create_bucket "$PGV_MOTO_URL"
}

# pgv_start_s3sfs LOGDIR: s3s-fs on a free loopback port, its data in
# LOGDIR/s3s-fs-data (a bucket is a directory there).
pgv_start_s3sfs() {
    local logdir="$1" port pid data="$1/s3s-fs-data"
    mkdir -p "$logdir"
    rm -rf "$data"
    mkdir -p "$data"
    port="$(pgv_free_port)"
    pgv_log "starting s3s-fs on 127.0.0.1:$port (log: $logdir/s3s-fs.log)"
    "$PGV_S3SFS_BIN" --host 127.0.0.1 --port "$port" \
        --access-key "$PGV_S3_ACCESS_KEY" --secret-key "$PGV_S3_SECRET_KEY" \
        "$data" >"$logdir/s3s-fs.log" 2>&1 &
    pid=$!
    PGV_PIDS+=("$pid")
    pgv_wait_port "$port" "$pid" "$logdir/s3s-fs.log"
    PGV_S3SFS_URL="http://127.0.0.1:$port"
    pgv_create_bucket "$PGV_S3SFS_URL"
}

# pgv_start_azurite LOGDIR: Azurite's blob service on a free loopback port,
# in memory, and the test container $PGV_S3_BUCKET in its built-in account.
pgv_start_azurite() {
    local logdir="$1" port pid
    mkdir -p "$logdir"
    port="$(pgv_free_port)"
    pgv_log "starting azurite-blob on 127.0.0.1:$port (log: $logdir/azurite.log)"
    # In memory (it cannot also take --location); started from LOGDIR so
    # that anything it writes lands there.
    (cd "$logdir" && exec "$PGV_AZURITE_BIN" --blobHost 127.0.0.1 --blobPort "$port" \
        --inMemoryPersistence --skipApiVersionCheck --disableTelemetry) \
        >"$logdir/azurite.log" 2>&1 &
    pid=$!
    PGV_PIDS+=("$pid")
    pgv_wait_port "$port" "$pid" "$logdir/azurite.log"
    PGV_AZURITE_URL="http://127.0.0.1:$port/$PGV_AZURITE_ACCOUNT"
    # Create the container: one Shared Key-signed PUT (Azure's "Authorize
    # with Shared Key" scheme), no SDK needed.
    python3 - "$PGV_AZURITE_URL" "$PGV_AZURITE_ACCOUNT" "$PGV_AZURITE_KEY" "$PGV_S3_BUCKET" <<'EOF'
import base64, hashlib, hmac, sys, urllib.error, urllib.request
from email.utils import formatdate
url, account, key, container = sys.argv[1:5]
date, version = formatdate(usegmt=True), "2021-08-06"
path = "/%s/%s" % (account, container)
# VERB, then Content-Encoding, -Language, -Length (empty for 0), -MD5,
# -Type, Date, If-Modified-Since, If-Match, If-None-Match,
# If-Unmodified-Since, Range; then the x-ms- headers and the resource.
ctype = "application/octet-stream"
to_sign = "PUT\n\n\n\n\n%s\n\n\n\n\n\n\nx-ms-date:%s\nx-ms-version:%s\n/%s%s\nrestype:container" % (
    ctype, date, version, account, path)
sig = base64.b64encode(hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()).decode()
req = urllib.request.Request(url + "/" + container + "?restype=container", method="PUT", data=b"", headers={
    "x-ms-date": date, "x-ms-version": version, "Content-Type": ctype,
    "Authorization": "SharedKey %s:%s" % (account, sig)})
try:
    urllib.request.urlopen(req)
except urllib.error.HTTPError as e:
    if e.code != 409:  # already there
        sys.exit("create container %s: %s %s" % (container, e.code, e.read()[:300]))
EOF
}

# pgv_start_etcd LOGDIR: a one-member etcd on free loopback ports, its data
# in LOGDIR/etcd-data (fresh each run).
pgv_start_etcd() {
    local logdir="$1" port peer pid data="$1/etcd-data"
    mkdir -p "$logdir"
    rm -rf "$data"
    port="$(pgv_free_port)"
    peer="$(pgv_free_port)"
    pgv_log "starting etcd on 127.0.0.1:$port (log: $logdir/etcd.log)"
    "$PGV_ETCD_BIN" --name pgvault-test --data-dir "$data" \
        --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "pgvault-test=http://127.0.0.1:$peer" >"$logdir/etcd.log" 2>&1 &
    pid=$!
    PGV_PIDS+=("$pid")
    pgv_wait_port "$port" "$pid" "$logdir/etcd.log"
    PGV_ETCD_HOSTS="127.0.0.1:$port"
}

# Stop what pgv_start_* started (for `trap pgv_stop_services EXIT`).
pgv_stop_services() {
    local pid
    for pid in "${PGV_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PGV_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    PGV_PIDS=()
}

# Benchmarks (scripts/bench/*): install what they need (PostgreSQL, the test
# user, pgBackRest, GNU time, and any extra packages given), build pgvault in
# release mode, and make a work directory $BASE/pgvault-<tag>.XXXXXX with a
# copy of the binary, so that a rebuild during the run does not change what
# is measured. Sets U (the PostgreSQL user), BIN (its bin directory), WORK
# and PGV (the binary's copy); as_user runs a command as U.
pgv_bench_setup() {
    local tag="$1"
    shift
    pgv_ensure_tools
    pgv_ensure_postgres
    pgv_ensure_user
    pgv_apt_install pgbackrest time "$@"
    U="$PGV_TEST_USER"
    BIN="$PGV_PGBIN"
    (cd "$ROOT" && cargo build --release --quiet)
    mkdir -p "$BASE"
    WORK="$(mktemp -d "$BASE/pgvault-$tag.XXXXXX")"
    chmod 755 "$WORK"
    install -m 755 "$ROOT/target/release/pgvault" "$WORK/pgvault"
    PGV="$WORK/pgvault"
    pgv_bench_cipher
}

# BENCH_CIPHER=1: every pgvault the benchmark runs encrypts (issue 11), with
# a key file in $WORK; the environment reaches pgvault through as_user and
# the server's archive_command alike.
pgv_bench_cipher() {
    [ "${BENCH_CIPHER:-0}" = 1 ] || return 0
    head -c 48 /dev/urandom | base64 -w0 >"$WORK/repo.key"
    chown "$PGV_TEST_USER" "$WORK/repo.key"
    chmod 600 "$WORK/repo.key"
    export PGVAULT_REPO_CIPHER_TYPE=xchacha20-poly1305 PGVAULT_REPO_CIPHER_KEY_FILE="$WORK/repo.key"
    pgv_log "BENCH_CIPHER=1: pgvault encrypts (xchacha20-poly1305)"
}

as_user() { runuser -u "$PGV_TEST_USER" -- "$@"; }

# pgv_small_tables SOCKDIR PORT N: N small tables m_0 … m_<N-1> in database
# postgres, each with a primary key, a TOAST table and one row (four files
# a table): a cluster of many files. 500 tables a transaction: all in one
# would exceed the shared lock table (max_locks_per_transaction ×
# max_connections).
pgv_small_tables() {
    local sock="$1" port="$2" n="$3" first last
    for first in $(seq 0 500 $((n - 1))); do
        last=$((first + 499 < n - 1 ? first + 499 : n - 1))
        as_user "$PGV_PGBIN/psql" -XAtq -h "$sock" -p "$port" -d postgres -c "do \$\$ begin
            for i in $first..$last loop
                execute format('create table m_%s (id int primary key, v text)', i);
                execute format('insert into m_%s values (1, ''x'')', i);
            end loop; end \$\$" >/dev/null
    done
}

# A benchmark that runs one cluster at a time keeps its data directory in
# CUR: on exit, whatever the cause, that cluster is stopped and $WORK removed
# (kept with KEEP=1).
pgv_bench_traps() {
    CUR=""
    trap pgv_bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

pgv_bench_cleanup() {
    local rc=$?
    if [ -n "${CUR:-}" ] && [ -f "$CUR/postmaster.pid" ]; then
        as_user "$BIN/pg_ctl" -D "$CUR" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then pgv_log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}

# Benchmarks read cold data where root allows it.
pgv_drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || pgv_log "warning: cannot drop caches"
}
