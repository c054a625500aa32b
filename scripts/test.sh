#!/usr/bin/env bash
# Install and start what the tests need, run every check, stop what it
# started. Works on a fresh Debian 12 machine as root (it installs
# PostgreSQL 15, moto, s3s-fs, Azurite, etcd and Patroni on first use; s3s-fs's build is cached in
# ${PGVAULT_CACHE:-/var/cache/pgvault}).
#
#   scripts/test.sh                    # everything, as CI runs it
#   scripts/test.sh archive::          # extra arguments go to `cargo test`
#   PGVAULT_TEST_SKIP_LINT=1 scripts/test.sh ...   # skip fmt and clippy (local
#                                                  # iteration only; CI lints)
#
# Server logs go to target/test-logs/ and are shown when something fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

[ "$(id -u)" -eq 0 ] || pgv_die "run as root: the tests create an OS user and run PostgreSQL as it"

LOGDIR="$PWD/target/test-logs"
mkdir -p "$LOGDIR"
SECONDS=0

on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        local f
        for f in "$LOGDIR"/moto.log "$LOGDIR"/s3s-fs.log "$LOGDIR"/azurite.log "$LOGDIR"/etcd.log; do
            if [ -s "$f" ]; then
                printf '\n--- last lines of %s\n' "$f" >&2
                tail -n 40 "$f" >&2 || true
            fi
        done
        printf '\nscripts/test.sh: FAILED (exit %s) after %ss\n' "$rc" "$SECONDS" >&2
    fi
    pgv_stop_services
    exit "$rc"
}
trap on_exit EXIT

LINT=1
if [ "${PGVAULT_TEST_SKIP_LINT:-}" = 1 ] && [ "${CI:-}" != true ]; then
    LINT=0
    pgv_log "PGVAULT_TEST_SKIP_LINT=1: skipping cargo fmt and clippy"
fi

# Format first: it is cheap and fails fast, before any install or build.
if [ "$LINT" = 1 ]; then
    pgv_log "cargo fmt --check"
    cargo fmt --all -- --check --color never
fi

pgv_install_all

if [ "$LINT" = 1 ]; then
    pgv_log "cargo clippy --all-targets -- -D warnings"
    cargo clippy --all-targets --quiet -- -D warnings
fi

pgv_log "cargo build --all-targets"
cargo build --all-targets --quiet

pgv_start_moto "$LOGDIR"
pgv_start_s3sfs "$LOGDIR"
pgv_start_azurite "$LOGDIR"
pgv_start_etcd "$LOGDIR"

export PGVAULT_TEST_PGBIN="$PGV_PGBIN"
export PGVAULT_TEST_USER="$PGV_TEST_USER"
export PGVAULT_TEST_MOTO="$PGV_MOTO_URL"
# Tests that kill and restart a moto of their own (tests/it/common/moto.rs).
export PGVAULT_TEST_MOTO_PY="$PGV_MOTO_PY"
export PGVAULT_TEST_S3SFS="$PGV_S3SFS_URL"
export PGVAULT_TEST_AZURITE="$PGV_AZURITE_URL"
export PGVAULT_TEST_AWS_ACCESS_KEY_ID="$PGV_S3_ACCESS_KEY"
export PGVAULT_TEST_AWS_SECRET_ACCESS_KEY="$PGV_S3_SECRET_KEY"
export PGVAULT_TEST_AWS_REGION="$PGV_S3_REGION"
export PGVAULT_TEST_BUCKET="$PGV_S3_BUCKET"
export PGVAULT_TEST_PYTHON="$PGV_PROM_PY"
export PGVAULT_TEST_ETCD="$PGV_ETCD_HOSTS"
export PGVAULT_TEST_PATRONI="$PGV_PATRONI_BIN"

# Other PostgreSQL majors for tests/it/pitr.rs (PITR by time on each), fetched
# once and cached by scripts/fetch-pg.sh. A failed fetch leaves the variable
# unset: those tests then fail under CI and are skipped elsewhere.
for major in 14 16 17 18; do
    if bin="$(scripts/fetch-pg.sh "$major")"; then
        export "PGVAULT_TEST_PGBIN_$major=$bin"
    else
        pgv_log "warning: no PostgreSQL $major (scripts/fetch-pg.sh $major failed); its tests fail under CI, skip otherwise"
    fi
done

# The fault campaign (tests/it/campaign, docs/reliability.md) runs its short
# seeded sample here; each of its tests appends its figures to this file
# (scripts/reliability.sh runs the full campaign).
export PGVAULT_CAMPAIGN_REPORT="$LOGDIR/campaign-figures.jsonl"
: >"$PGVAULT_CAMPAIGN_REPORT"

# Two test threads: each integration test runs a PostgreSQL cluster plus
# pgvault processes, and the machine has 2 cores. --no-fail-fast: a failing
# unit test must not hide the integration tests' results.
pgv_log "cargo test --no-fail-fast $* -- --test-threads=2"
cargo test --no-fail-fast "$@" -- --test-threads=2 2>&1 | tee "$LOGDIR/cargo-test.log"

# One closing line over every test binary (cargo's own last line is only
# the last binary's).
pgv_log "all checks passed in ${SECONDS}s"
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "%d passed, %d failed, %d skipped\n", p, f, i }' \
    "$LOGDIR/cargo-test.log"
