#!/usr/bin/env bash
# The full fault campaign of issue 9 (tests/it/campaign, docs/reliability.md):
# the same tests scripts/test.sh runs as a short sample, with the counts
# raised — kill -9 at PGVAULT_CAMPAIGN_POINTS seeded points per command
# (archive-push, archive-get, backup, restore, expire), PGVAULT_CAMPAIGN_FLIPS
# bit flips, PGVAULT_CAMPAIGN_FAULT_ROUNDS rounds of every command under
# injected faults — on a new seed unless one is given. Prints the figures
# docs/reliability.md states, by kind, summed over the tests.
#
#   scripts/reliability.sh                          # everything, a new seed
#   PGVAULT_TEST_SEED=1234 scripts/reliability.sh   # replay a run
#   scripts/reliability.sh kill_backup              # one part (a test name filter)
#
# Run as root on Debian 12, like scripts/test.sh (which it calls, without
# fmt and clippy). The log and the figures go to target/reliability/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PGVAULT_CAMPAIGN_POINTS="${PGVAULT_CAMPAIGN_POINTS:-22}"
export PGVAULT_CAMPAIGN_FLIPS="${PGVAULT_CAMPAIGN_FLIPS:-60}"
export PGVAULT_CAMPAIGN_FAULT_ROUNDS="${PGVAULT_CAMPAIGN_FAULT_ROUNDS:-3}"
export PGVAULT_TEST_SEED="${PGVAULT_TEST_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
export PGVAULT_TEST_SKIP_LINT=1

OUT="$PWD/target/reliability"
mkdir -p "$OUT"
RUN="$OUT/seed-$PGVAULT_TEST_SEED"
FIGURES="$RUN.jsonl"
: >"$FIGURES"

printf '==> fault campaign: seed %s (replay: PGVAULT_TEST_SEED=%s scripts/reliability.sh), %s kill points per command, %s bit flips, %s fault rounds\n' \
    "$PGVAULT_TEST_SEED" "$PGVAULT_TEST_SEED" "$PGVAULT_CAMPAIGN_POINTS" \
    "$PGVAULT_CAMPAIGN_FLIPS" "$PGVAULT_CAMPAIGN_FAULT_ROUNDS" >&2

# scripts/test.sh points PGVAULT_CAMPAIGN_REPORT at its own log directory;
# the figures are copied from there once the tests are done.
SECONDS=0
rc=0
scripts/test.sh "campaign::${1:-}" 2>&1 | tee "$RUN.log" || rc=$?
cp target/test-logs/campaign-figures.jsonl "$FIGURES" 2>/dev/null || true

printf '\n==> fault campaign figures (seed %s, %ss; log %s.log)\n' "$PGVAULT_TEST_SEED" "$SECONDS" "$RUN" >&2
jq -rs '
  (map(.counts | to_entries[]) | group_by(.key)
   | map("| \(.[0].key) | \(map(.value) | add) |") | .[]),
  "",
  (map("\(.test): seed \(.seed), \(.problems) problem(s), \(.seconds // "?")s") | .[])
' "$FIGURES"
exit "$rc"
