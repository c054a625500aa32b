#!/bin/bash
# Profile (not a benchmark of record): pgvault restore against the write
# floor (cp -a of a warm copy + sync -f; and tar | tar + sync -f), rounds
# interleaved, then strace -c, strace of the sync calls, perf record and
# perf stat of one restore each, on the repository a kept incr.sh run left:
#
#   KEEP=1 BENCH_PART=incr BENCH_SCALE=50 scripts/bench.sh     # prints "kept WORK"
#   scripts/bench/profile-restore.sh WORK [OUTDIR]             # as root; OUTDIR default WORK/prof
#
# Restores the first full backup of WORK/repo-pgv (stanza c15) as pgvtest.
# Any repository with a stanza c15 will do (docs/benchmarks.md shows how to
# make one without incr.sh).
#
# PGVS="NAME=BINARY ..." (default "pgvault=WORK/pgvault"): the binaries to
# time, each restore of each round interleaved with the others and with the
# floors (e.g. PGVS="before=/var/tmp/pgvault-before after=target/release/pgvault");
# each is copied into WORK (pgvtest must run it). The strace and perf runs
# use the last one. ROUNDS (default 3). PROFILE=0: the timed rounds only.
set -eu
W="$1"; OUT="${2:-$W/prof}"
ROUNDS="${ROUNDS:-3}"
PGVS="${PGVS:-pgvault=$W/pgvault}"
mkdir -p $OUT
names=()
for nb in $PGVS; do
  n="${nb%%=*}"; b="${nb#*=}"
  if [ "$(readlink -f "$b")" != "$(readlink -f "$W/pgv-$n")" ]; then cp "$b" "$W/pgv-$n"; fi
  chmod 755 "$W/pgv-$n"; names+=("$n")
done
PGV=$W/pgv-${names[-1]}
LABEL=$(ls -tr $W/repo-pgv/c15/backup | head -1)   # the first full backup
echo "label $LABEL; binaries ${names[*]}"
R="runuser -u pgvtest --"
PR="nice -n -10 ionice -c 2 -n 0"
prep() { rm -rf $W/p-out; mkdir -p $W/p-out; chown pgvtest $W/p-out; chmod 700 $W/p-out; sync; }
args() { echo "--repo $W/repo-pgv --stanza c15 --catalog off --process-max 2 restore --set $LABEL --pgdata $W/p-out --archive-mode off"; }
# a warm copy of the restored data directory
prep; $R $PGV $(args) >/dev/null 2>&1; rm -rf $W/p-warm; cp -a $W/p-out $W/p-warm; rm -rf $W/p-out/pg_wal/*; sync
du -sb $W/p-warm | tee $OUT/size.txt
for i in $(seq 1 $ROUNDS); do
  for n in "${names[@]}"; do
    prep; sync; echo 3 > /proc/sys/vm/drop_caches
    /usr/bin/time -f "$i $n-cold %e s %U u %S s %M KiB" $PR $R $W/pgv-$n $(args) 2>&1 >/dev/null | tail -1 | tee -a $OUT/times.txt
    prep; tar cf - -C $W/repo-pgv . >/dev/null
    /usr/bin/time -f "$i $n-warmrepo %e s %U u %S s %M KiB" $PR $R $W/pgv-$n $(args) 2>&1 >/dev/null | tail -1 | tee -a $OUT/times.txt
  done
  rm -rf $W/p-out $W/p-cp; sync; tar cf - -C $W/p-warm . >/dev/null
  /usr/bin/time -f "$i cp-a-warm+sync %e s %U u %S s %M KiB" $PR sh -c "cp -a $W/p-warm $W/p-cp && sync -f $W/p-cp" 2>&1 | tail -1 | tee -a $OUT/times.txt
  rm -rf $W/p-cp; sync; tar cf - -C $W/p-warm . >/dev/null
  /usr/bin/time -f "$i tar-warm+sync %e s %U u %S s %M KiB" $PR sh -c "mkdir $W/p-cp && tar cf - -C $W/p-warm . | tar xf - -C $W/p-cp && sync -f $W/p-cp" 2>&1 | tail -1 | tee -a $OUT/times.txt
  rm -rf $W/p-cp
done
if [ "${PROFILE:-1}" != 0 ]; then
  # where pgvault's time goes: syscalls (wall time per call, all threads)
  prep; sync; echo 3 > /proc/sys/vm/drop_caches
  $PR strace -f -w -c -o $OUT/strace-c.txt $R $PGV $(args) >/dev/null 2>&1
  prep; sync; echo 3 > /proc/sys/vm/drop_caches
  $PR strace -f -tt -T -e trace=syncfs,fsync,sync_file_range,fdatasync -o $OUT/strace-sync.txt $R $PGV $(args) >/dev/null 2>&1
  # CPU: perf
  prep; sync; echo 3 > /proc/sys/vm/drop_caches
  $PR perf record -F 499 -g -o $OUT/perf.data -- $R $PGV $(args) >/dev/null 2>&1
  perf report -i $OUT/perf.data --no-children --sort sym --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -30 > $OUT/perf-top.txt
  prep; sync; echo 3 > /proc/sys/vm/drop_caches
  $PR perf stat -e task-clock,page-faults,context-switches -o $OUT/perf-stat.txt -- $R $PGV $(args) >/dev/null 2>&1
fi
rm -rf $W/p-out $W/p-warm $W/p-cp
