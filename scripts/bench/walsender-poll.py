#!/usr/bin/env python3
"""Poll the walsender processes a postmaster starts while a pg_basebackup runs.

    walsender-poll.py POSTMASTER_PID OUT

pg_basebackup reads nothing itself: the server's walsender reads the data
directory and sends it. /usr/bin/time on the client therefore sees neither
those reads nor that memory. This polls every 10 ms every child of the
postmaster whose command line names a walsender and keeps, per process, the
largest read_bytes (/proc/PID/io: bytes this process made the block layer
fetch) and VmHWM (peak RSS). On SIGTERM it writes "READ_BYTES PEAK_KIB"
(the sum of read_bytes, the largest VmHWM) to OUT. A walsender that exits
between two polls loses at most its last 10 ms of reads.
"""
import os
import signal
import sys
import time

ppid, out = sys.argv[1], sys.argv[2]
seen = {}
stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)


def children():
    try:
        with open(f"/proc/{ppid}/task/{ppid}/children") as f:
            return f.read().split()
    except OSError:
        return []


while not stop:
    for pid in children():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"walsender" not in f.read():
                    continue
            rb = 0
            with open(f"/proc/{pid}/io") as f:
                for line in f:
                    if line.startswith("read_bytes:"):
                        rb = int(line.split()[1])
            hwm = 0
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm = int(line.split()[1])
        except (OSError, ValueError):
            continue
        r, h = seen.get(pid, (0, 0))
        seen[pid] = (max(r, rb), max(h, hwm))
    time.sleep(0.01)

with open(out, "w") as f:
    f.write(f"{sum(r for r, _ in seen.values())} {max((h for _, h in seen.values()), default=0)}\n")
