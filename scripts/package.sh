#!/usr/bin/env bash
# Build the Debian package with `cargo deb` (installed from crates.io when
# missing): the binary, man pages and shell completions generated from the
# clap definitions (`pgvault man`, `pgvault completions`), the systemd
# units and timers of contrib/systemd, docs and the contrib/ examples.
# Prints the path of the .deb on stdout.
#
#   scripts/package.sh                 release build: what ships
#   PGV_PACKAGE_PROFILE=dev scripts/package.sh
#                                      the debug binary (tests/it/package.rs)
#   PGV_PACKAGE_NO_BUILD=1 ...     package the binary already built
#
# Why two profiles: a release build takes many minutes on a small machine,
# and cargo keeps it (target/release) so only the first one is slow; the
# test packages the debug binary scripts/test.sh has just built, which
# exercises every packaging step in seconds.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

profile="${PGV_PACKAGE_PROFILE:-release}"
# The debug binary is large (its debug info): stripped and compressed fast,
# it packages in seconds; the release binary keeps its line tables
# (backtraces in bug reports) and gets the best compression.
case "$profile" in
    release) bindir=target/release deb_flags=(--no-strip) ;;
    dev) bindir=target/debug deb_flags=(--fast) ;;
    *) pgv_die "PGV_PACKAGE_PROFILE must be release or dev, not $profile" ;;
esac

pgv_ensure_cargo_deb

if [ "${PGV_PACKAGE_NO_BUILD:-}" != 1 ]; then
    pgv_log "cargo build --profile $profile --bin pgvault"
    cargo build --profile "$profile" --bin pgvault --quiet
fi
[ -x "$bindir/pgvault" ] || pgv_die "no binary at $bindir/pgvault"

# Generated from the binary being packaged, so they match its --help.
gen=target/pkg
rm -rf "$gen"
mkdir -p "$gen/man" "$gen/completions"
"$bindir/pgvault" man "$gen/man" >/dev/null
gzip -9n "$gen"/man/*.1
"$bindir/pgvault" completions bash >"$gen/completions/pgvault.bash"
"$bindir/pgvault" completions zsh >"$gen/completions/_pgvault"
"$bindir/pgvault" completions fish >"$gen/completions/pgvault.fish"

pgv_log "cargo deb --profile $profile ${deb_flags[*]}"
deb="$(cargo deb --no-build "${deb_flags[@]}" --profile "$profile" --output target/debian/ --quiet | tail -n 1)"
[ -f "$deb" ] || pgv_die "cargo deb made no package (it said: $deb)"
printf '%s\n' "$deb"
