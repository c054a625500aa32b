#!/bin/bash
# Profile (not a benchmark of record): pgvault restore against the write
# floor (cp -a of a warm copy + sync -f; and tar | tar + sync -f), 3 rounds
# interleaved, then strace -c, strace of the sync calls, perf record and
# perf stat of one restore each, on the repository a kept incr.sh run left:
#
#   KEEP=1 BENCH_PART=incr BENCH_SCALE=50 scripts/bench.sh     # prints "kept WORK"
#   scripts/bench/profile-restore.sh WORK [OUTDIR]             # as root; OUTDIR default WORK/prof
#
# Restores the first full backup of WORK/repo-pgv (stanza c15) as pgvtest.
set -eu
W="$1"; OUT="${2:-$W/prof}"
mkdir -p $OUT
PGV=$W/pgvault
LABEL=$(ls -tr $W/repo-pgv/c15/backup | head -1)   # the first full backup
echo "label $LABEL"
R="runuser -u pgvtest --"
PR="nice -n -10 ionice -c 2 -n 0"
prep() { rm -rf $W/p-out; mkdir -p $W/p-out; chown pgvtest $W/p-out; chmod 700 $W/p-out; sync; }
rst() { $R $PGV --repo $W/repo-pgv --stanza c15 --catalog off --process-max 2 restore --set $LABEL --pgdata $W/p-out --archive-mode off; }
# a warm copy of the restored data directory
prep; rst >/dev/null 2>&1; rm -rf $W/p-warm; cp -a $W/p-out $W/p-warm; rm -rf $W/p-out/pg_wal/*; sync
du -sb $W/p-warm | tee $OUT/size.txt
for i in 1 2 3; do
  prep; sync; echo 3 > /proc/sys/vm/drop_caches
  /usr/bin/time -f "pgvault-cold %e s %U u %S s %M KiB" $PR $R $PGV --repo $W/repo-pgv --stanza c15 --catalog off --process-max 2 restore --set $LABEL --pgdata $W/p-out --archive-mode off 2>&1 >/dev/null | tail -1 | tee -a $OUT/times.txt
  prep; tar cf - -C $W/repo-pgv . >/dev/null
  /usr/bin/time -f "pgvault-warmrepo %e s %U u %S s %M KiB" $PR $R $PGV --repo $W/repo-pgv --stanza c15 --catalog off --process-max 2 restore --set $LABEL --pgdata $W/p-out --archive-mode off 2>&1 >/dev/null | tail -1 | tee -a $OUT/times.txt
  rm -rf $W/p-cp; sync; tar cf - -C $W/p-warm . >/dev/null
  /usr/bin/time -f "cp-a-warm+sync %e s %U u %S s %M KiB" $PR sh -c "cp -a $W/p-warm $W/p-cp && sync -f $W/p-cp" 2>&1 | tail -1 | tee -a $OUT/times.txt
  rm -rf $W/p-cp; sync; tar cf - -C $W/p-warm . >/dev/null
  /usr/bin/time -f "tar-warm+sync %e s %U u %S s %M KiB" $PR sh -c "mkdir $W/p-cp && tar cf - -C $W/p-warm . | tar xf - -C $W/p-cp && sync -f $W/p-cp" 2>&1 | tail -1 | tee -a $OUT/times.txt
done
# where pgvault's time goes: syscalls (wall time per call, all threads)
prep; sync; echo 3 > /proc/sys/vm/drop_caches
$PR strace -f -w -c -o $OUT/strace-c.txt $R $PGV --repo $W/repo-pgv --stanza c15 --catalog off --process-max 2 restore --set $LABEL --pgdata $W/p-out --archive-mode off >/dev/null 2>&1
prep; sync; echo 3 > /proc/sys/vm/drop_caches
$PR strace -f -tt -T -e trace=syncfs,fsync,sync_file_range,fdatasync -o $OUT/strace-sync.txt $R $PGV --repo $W/repo-pgv --stanza c15 --catalog off --process-max 2 restore --set $LABEL --pgdata $W/p-out --archive-mode off >/dev/null 2>&1
# CPU: perf
prep; sync; echo 3 > /proc/sys/vm/drop_caches
$PR perf record -F 499 -g -o $OUT/perf.data -- $R $PGV --repo $W/repo-pgv --stanza c15 --catalog off --process-max 2 restore --set $LABEL --pgdata $W/p-out --archive-mode off >/dev/null 2>&1
perf report -i $OUT/perf.data --no-children --sort sym --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -30 > $OUT/perf-top.txt
prep; sync; echo 3 > /proc/sys/vm/drop_caches
$PR perf stat -e task-clock,page-faults,context-switches -o $OUT/perf-stat.txt -- $R $PGV --repo $W/repo-pgv --stanza c15 --catalog off --process-max 2 restore --set $LABEL --pgdata $W/p-out --archive-mode off >/dev/null 2>&1
rm -rf $W/p-out $W/p-warm $W/p-cp
