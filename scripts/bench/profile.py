#!/usr/bin/env python3
"""Where does one pgvault archive-push spend its time? (BENCH_PROFILE=1)

Run by scripts/bench.sh after the timings, on the same segments and disk;
every segment is read just before it is pushed (page cache), and pushes go
into a repository that already holds a segment (its directories exist):

1. start-up: medians of `/bin/true`, `pgvault --version` and an
   archive-push of a missing file (options, runtime, stanza, error);
2. `perf stat` of 5 pushes: task-clock, page faults, context switches;
3. CPU: `perf record -e cpu-clock -g` over 5 pushes, samples grouped by
   symbol: zstd, SHA-256, memcpy, kernel page faults, kernel file I/O, other;
4. wall-clock phases and fsyncs of one push from `strace -f -tt -T`
   (strace slows system calls down; read the shares), and `strace -c -f`
   syscall counts of one pgvault and one pgBackRest push;
5. per thread of one push, from `perf record -a -e sched:sched_switch`:
   time on CPU, runnable but waiting for a CPU, asleep (and where);
6. interleaved over all segments: pgvault with its default zstd worker
   threads and with `--compress-threads 1`, `zstd -3` (the floor) and
   `zstd -3 -T<cores>`, each + fsync.
"""

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

STANZA = "bench"


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


def run(cmd, what, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    if p.returncode != 0:
        die(
            f"{what} failed (exit {p.returncode}): {' '.join(cmd)}\n"
            f"{p.stdout.decode(errors='replace')}{p.stderr.decode(errors='replace')}"
        )
    return p


def join_unfinished(lines):
    """strace -f splits a call that another thread interrupts into
    `pid ... call(args <unfinished ...>` and `pid ... <... call resumed>rest`:
    put them back together, at the start time of the call."""
    out, pending = [], {}
    for l in lines:
        pid = l.split(" ", 1)[0]
        if l.endswith("<unfinished ...>"):
            pending[pid] = len(out)
            out.append(l[: -len("<unfinished ...>")].rstrip())
        elif "resumed>" in l and pid in pending:
            i = pending.pop(pid)
            out[i] = out[i] + l.split("resumed>", 1)[1]
        else:
            out.append(l)
    return out


def offcpu_summary(txt, pid):
    """Per thread of process `pid`: on-CPU, runnable and asleep time from
    sched_switch events (`perf script -F comm,pid,tid,cpu,time,event,trace,ip,sym,dso`),
    with a role guessed from its stacks."""
    ev = []
    ours = set()
    for blk in txt.split("\n\n"):
        ls = [l for l in blk.splitlines() if l.strip()]
        if not ls:
            continue
        m = re.match(
            r"\s*(\S+)\s+(\d+)/(\d+)\s+\[\d+\]\s+([0-9.]+):\s+sched:sched_switch: .*prev_pid=(\d+) "
            r".*prev_state=(\S+) ==> next_comm=\S+ next_pid=(\d+)", ls[0])
        if not m:
            continue
        if m.group(2) == str(pid):
            ours.add(m.group(3))
        frames = []
        for l in ls[1:]:
            if "kernel.kallsyms" in l:
                continue
            parts = l.split(None, 1)
            if len(parts) == 2:
                frames.append(re.sub(r"(\+0x[0-9a-f]+)?( \(inlined\))?( \(\S+\))?$", "", parts[1]).strip())
        ev.append((float(m.group(4)), m.group(5), m.group(6), m.group(7), frames))
    if not ev or not ours:
        return None
    state = {}  # tid -> (since, "run"|"wait"|"sleep", frames)
    acc = collections.defaultdict(lambda: {"run": 0.0, "wait": 0.0, "sleep": 0.0,
                                           "where": collections.Counter(), "frames": []})
    t_first = t_last = None
    for t, prev, st, nxt, fr in ev:
        if prev in ours:
            t_first = t if t_first is None else t_first
            t_last = t
            if prev in state:
                # (a switch-in that was not seen counts as the state before)
                since, what, frs = state[prev]
                acc[prev][what] += t - since
                if what == "sleep":
                    acc[prev]["where"][sleep_site(frs)] += t - since
            acc[prev]["frames"].extend(fr)
            state[prev] = (t, "wait" if st.startswith("R") else "sleep", fr)
        if nxt in ours:
            t_first = t if t_first is None else t_first
            t_last = t
            if nxt in state:
                since, what, frs = state[nxt]
                acc[nxt][what] += t - since
                if what == "sleep":
                    acc[nxt]["where"][sleep_site(frs)] += t - since
            state[nxt] = (t, "run", [])
    if t_first is None:
        return None
    rows = []
    for tid, a in acc.items():
        fs = a["frames"]
        if not fs:
            continue
        joined = " ".join(fs)
        if "POOL_thread" in joined:
            role = "zstd worker"
        elif "copy_file" in joined or "ZSTDMT_" in joined:
            role = "blocking pool: read, SHA-256, feed zstd"
        elif "commit_blocking" in joined or "sync_all" in joined:
            role = "blocking pool: commit (fsync, link, claim)"
        elif "block_on" in joined:
            role = "main (block_on)"
        elif "multi_thread::worker" in joined or "epoll_wait" in joined:
            role = "tokio worker"
        else:
            role = "other"
        if a["run"] + a["wait"] + a["sleep"] < 0.0001:
            continue
        where = ", ".join(f"{k} {1000 * v:.1f}" for k, v in a["where"].most_common(2))
        rows.append((role, 1000 * a["run"], 1000 * a["wait"], 1000 * a["sleep"], where))
    rows.sort(key=lambda r: -r[1])
    return 1000 * (t_last - t_first), rows


def sleep_site(frames):
    skip = ("syscall", "std::sys", "core::", "<alloc", "__", "start_thread", "clone3", "futex_wait",
            "pthread_cond", "___pthread", "sem_", "epoll_wait",
            "<std::sys", "park", "{closure", "call_once", "poll<", "run<", "run_worker")
    for f in frames:
        if not f.startswith(skip) and f not in ("park", "run", "lock", "wait"):
            return f.split("<")[0][:60] or f[:60]
    if any(f.startswith("epoll_wait") for f in frames):
        return "epoll_wait"
    return "a futex (stack not unwound past libc)" if frames else "?"


class Profile:
    def __init__(self, a):
        self.a = a
        self.segs = sorted(os.path.join(a.segments, f) for f in os.listdir(a.segments))
        self.dir = os.path.join(a.work, "profile")
        os.makedirs(self.dir, exist_ok=True)
        self.n = 0
        self.out = []

    def w(self, s=""):
        self.out.append(s)

    def fresh_repo(self):
        self.n += 1
        while os.path.exists(os.path.join(self.dir, f"repo{self.n}")):
            self.n += 1
        repo = os.path.join(self.dir, f"repo{self.n}")
        run(
            [self.a.pgvault, "--repo", repo, "--stanza", STANZA, "stanza-create", "--pgdata", self.a.pgdata],
            "pgvault stanza-create",
        )
        return repo

    def push_cmd(self, repo, seg, *extra):
        return [self.a.pgvault, "--repo", repo, "--stanza", STANZA, "--catalog", "off", *extra, "archive-push", seg]

    def warm(self, only=None):
        for s in [only] if only else self.segs:
            with open(s, "rb") as f:
                while f.read(1 << 20):
                    pass

    # 1 ------------------------------------------------------------------
    def startup(self):
        ts = []
        for _ in range(21):
            t0 = time.perf_counter()
            run([self.a.pgvault, "--version"], "pgvault --version")
            ts.append(time.perf_counter() - t0)
        self.startup_ms = 1000 * statistics.median(ts[1:])
        # the same for a trivial process, to separate fork/exec from pgvault's own start-up
        ts = []
        for _ in range(21):
            t0 = time.perf_counter()
            run(["/bin/true"], "/bin/true")
            ts.append(time.perf_counter() - t0)
        self.true_ms = 1000 * statistics.median(ts[1:])
        # start-up + options + runtime, up to failing on a missing file
        repo = self.fresh_repo()
        missing = os.path.join(self.dir, "000000010000000000000099")
        ts = []
        for _ in range(21):
            t0 = time.perf_counter()
            p = subprocess.run(self.push_cmd(repo, missing), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            ts.append(time.perf_counter() - t0)
        if p.returncode == 0:
            die("pgvault archive-push of a missing file exited 0")
        self.missing_ms = 1000 * statistics.median(ts[1:])

    # 2 ------------------------------------------------------------------
    BUCKETS = [
        ("zstd compression (libzstd, in the worker threads)", r"^(ZSTD|HUF_|FSE_|HIST_|ZSTDMT|POOL_)"),
        ("SHA-256 (sha2 crate)", r"sha2::|sha256"),
        ("memcpy/memmove (user space)", r"^__mem(move|cpy|set)"),
        ("kernel: page faults, page allocation and freeing (fresh anonymous memory)",
         r"page_fault|clear_page|do_anonymous_page|handle_mm_fault|__handle_mm_fault|alloc_pages|alloc_frozen|"
         r"rmqueue|folio_add_new_anon|lruvec|memcg|mem_cgroup|charge|lock_vma|mas_walk|unmap_page_range|"
         r"free_pages|free_unref|release_pages|zap_|tlb_|__list_del_entry|folios_put|pte_"),
        ("kernel: file read/write (page-cache copies, ext4)",
         r"copy_to_iter|copy_from_iter|copy_folio|filemap_|ext4_|generic_perform_write|iomap_|jbd2|"
         r"__block_commit|mark_buffer|block_write|folio_mark"),
    ]

    def perf_record(self):
        repo = self.fresh_repo()
        data = os.path.join(self.dir, "perf.data")
        k = min(5, len(self.segs))
        script = os.path.join(self.dir, "pushes.sh")
        with open(script, "w") as f:
            f.write("#!/bin/sh\nset -e\n")
            for seg in self.segs[:k]:
                f.write(" ".join(f"'{c}'" for c in self.push_cmd(repo, seg)) + "\n")
        os.chmod(script, 0o755)
        for seg in self.segs[:k]:
            self.warm(seg)
        run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-g", "-o", data, "--", script],
            "perf record")
        comms = run(
            ["perf", "report", "-i", data, "--no-children", "--sort", "comm", "--stdio", "-g", "none"],
            "perf report --sort comm",
        ).stdout.decode(errors="replace")
        # pgvault's own threads (main, tokio workers, zstd workers), not the
        # shell that runs the pushes
        mine = []
        for line in comms.splitlines():
            m = re.match(r"^\s+[0-9.]+%\s+(\S+)", line)
            if m and m.group(1) not in ("pushes.sh", "sh", "perf-exec", "perf"):
                mine.append(m.group(1))
        rep = run(
            ["perf", "report", "-i", data, "--no-children", "--comms", ",".join(mine),
             "--percentage", "relative", "--sort", "dso,sym", "--stdio", "-g", "none",
             "--percent-limit", "0"],
            "perf report",
        ).stdout.decode(errors="replace")
        m = re.search(r"# Samples: (\S+)", rep)
        self.perf_samples = m.group(1) if m else "?"
        rows = []
        for line in rep.splitlines():
            m = re.match(r"^\s+([0-9.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)$", line)
            if m:
                rows.append((float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()))
        buckets = collections.OrderedDict((b, 0.0) for b, _ in self.BUCKETS)
        buckets["kernel: other (scheduling, syscalls, fsync, exec, exit)"] = 0.0
        buckets["pgvault: other (tokio, allocator, CLI, start-up)"] = 0.0
        buckets["other libraries (libc, ld.so)"] = 0.0
        for pct, dso, kind, sym in rows:
            for b, rx in self.BUCKETS:
                if re.search(rx, sym):
                    buckets[b] += pct
                    break
            else:
                if kind == "k":
                    buckets["kernel: other (scheduling, syscalls, fsync, exec, exit)"] += pct
                elif dso == "pgvault":
                    buckets["pgvault: other (tokio, allocator, CLI, start-up)"] += pct
                else:
                    buckets["other libraries (libc, ld.so)"] += pct
        top = sorted(rows, reverse=True)[:15]
        self.perf = (k, buckets, top)

    # 3 ------------------------------------------------------------------
    def strace_phases(self):
        repo = self.fresh_repo()
        # steady state: the repository's directories exist already
        run(self.push_cmd(repo, self.segs[0]), "pgvault archive-push")
        seg = self.segs[-1]
        self.warm(seg)
        tr = os.path.join(self.dir, "strace.txt")
        run(["strace", "-f", "-tt", "-T", "-o", tr, *self.push_cmd(repo, seg)], "strace")
        lines = join_unfinished(open(tr).read().splitlines())

        def ts(line):
            m = re.match(r"^\d+\s+(\d+):(\d+):([0-9.]+)\s", line)
            return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))

        t_exec = ts(lines[0])
        t_end = ts(lines[-1])
        segname = os.path.basename(seg)
        t_seg = next(ts(l) for l in lines if "openat(" in l and segname in l)
        # fd -> path, to name what every fsync is for
        fd_path = {}
        fsyncs = []  # (start, duration, basename)
        for l in lines:
            m = re.search(r'openat\(AT_FDCWD, "([^"]+)".*\)\s+=\s+(\d+)', l)
            if m:
                fd_path[m.group(2)] = m.group(1)
            m = re.search(r"\s(fsync|fdatasync)\((\d+)\).*<([0-9.]+)>", l)
            if m:
                fsyncs.append((ts(l), float(m.group(3)), os.path.basename(fd_path.get(m.group(2), "?"))))
        # the spool of the compressed segment is the first temporary file fsynced
        data = next((f for f in fsyncs if f[2].startswith(".pgvault-tmp-")), None)
        if data is None:
            die(f"no fsync of a temporary file in {tr}: the phases cannot be found")
        t_data0, d_data = data[0], data[1]
        before = sum(f[1] for f in fsyncs if f[0] < t_data0)
        self.phases = {
            "start-up until the segment is opened (exec, runtime, options, reading the stanza)": t_seg - t_exec,
            "validate, read, SHA-256, zstd, write the spool file": t_data0 - t_seg - before,
            "fsync of new repository directories": before,
            "fsync of the compressed segment": d_data,
            "after that fsync: link into place, claim object, directory fsyncs, exit "
            "(the fsyncs are listed below)": t_end - t_data0 - d_data,
        }
        self.strace_total = t_end - t_exec
        self.fsync_total = sum(f[1] for f in fsyncs)
        self.nfsync = len(fsyncs)
        self.fsync_list = [(f[2], 1000 * f[1]) for f in fsyncs]

        # strace -c -f: syscall summary (pgvault and pgBackRest)
        self.strace_c = {}
        for tool, cmd in (
            ("pgvault", self.push_cmd(self.fresh_repo(), self.segs[-2])),
            ("pgbackrest", self.pgbr_cmd(self.segs[-2])),
        ):
            if cmd is None:
                continue
            # steady state: a first push creates the repository's directories
            run(cmd[:-1] + [self.segs[0]], f"{tool} archive-push")
            self.warm(self.segs[-2])
            p = run(["strace", "-c", "-f", "-o", os.path.join(self.dir, f"strace-c-{tool}.txt"), *cmd],
                    f"strace -c {tool}")
            txt = open(os.path.join(self.dir, f"strace-c-{tool}.txt")).read()
            calls = {}
            for line in txt.splitlines():
                parts = line.split()
                if len(parts) >= 5 and re.match(r"^[0-9.]+$", parts[0]):
                    name = parts[-1]
                    try:
                        calls[name] = int(parts[3])
                    except ValueError:
                        pass
            self.strace_c[tool] = calls

    def pgbr_cmd(self, seg):
        if not self.a.pgbackrest_conf:
            return None
        self.n += 1
        while os.path.exists(os.path.join(self.dir, f"pgbr{self.n}")):
            self.n += 1
        repo = os.path.join(self.dir, f"pgbr{self.n}")
        os.makedirs(repo)
        base = [self.a.pgbackrest, f"--config={self.a.pgbackrest_conf}", f"--stanza={STANZA}",
                f"--repo1-path={repo}"]
        run(base + ["stanza-create"], "pgbackrest stanza-create")
        return base + ["archive-push", seg]

    # 4 ------------------------------------------------------------------
    def perf_stat(self):
        repo = self.fresh_repo()
        res = []
        for seg in self.segs[:5]:
            self.warm(seg)
            p = run(["perf", "stat", "-x", ",", "-e", "task-clock,page-faults,context-switches,cpu-migrations",
                     "--", *self.push_cmd(repo, seg)], "perf stat")
            vals = {}
            for line in p.stderr.decode().splitlines():
                parts = line.split(",")
                if len(parts) > 3:
                    try:
                        vals[parts[2]] = float(parts[0])
                    except ValueError:
                        pass
            res.append(vals)
        self.stat = {k: statistics.median(r.get(k, 0) for r in res) for k in res[0]}

    # 5 ------------------------------------------------------------------
    def threads_compare(self):
        """Interleaved: pgvault with its default zstd worker threads and with
        one; the floor with one zstd thread (as in the benchmark) and with
        as many as pgvault uses."""
        repo_d, repo_1 = self.fresh_repo(), self.fresh_repo()
        fdir = os.path.join(self.dir, "floors")
        os.makedirs(fdir, exist_ok=True)
        nthreads = min(os.cpu_count() or 1, 8)
        cases = [
            ("pgvault archive-push (default threads)", lambda seg: (self.push_cmd(repo_d, seg), None)),
            ("pgvault archive-push --compress-threads 1",
             lambda seg: (self.push_cmd(repo_1, seg, "--compress-threads", "1"), None)),
            ("zstd -3 + fsync (the floor)", lambda seg: self.zstd_cmd(fdir, seg, 1)),
            (f"zstd -3 -T{nthreads} + fsync", lambda seg: self.zstd_cmd(fdir, seg, nthreads)),
        ]
        times = {c[0]: [] for c in cases}
        os.sync()
        for seg in self.segs:
            self.warm(seg)
            for name, mk in cases:
                cmd, out = mk(seg)
                t0 = time.perf_counter()
                run(cmd, name)
                if out:
                    fd = os.open(out, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
                times[name].append(time.perf_counter() - t0)
        self.thr = [(name, 1000 * statistics.median(ts)) for name, ts in times.items()]

    def zstd_cmd(self, fdir, seg, threads):
        out = os.path.join(fdir, f"{os.path.basename(seg)}-T{threads}.zst")
        return ["zstd", "-3", f"-T{threads}", "-q", "-f", seg, "-o", out], out

    # 6 ------------------------------------------------------------------
    def offcpu(self):
        """One push under `perf record -e sched:sched_switch -g`: per thread,
        time on CPU, time runnable but waiting for a CPU, and time asleep
        (with the function it slept in). perf's DWARF unwinding sometimes
        stops in libc: up to 4 tries for stacks that name the sleeps."""
        for _ in range(4):
            self.offcpu_once()
            if self.off and not any("not unwound" in r[4] for r in self.off[1] if r[1] > 5):
                break

    def offcpu_once(self):
        repo = self.fresh_repo()
        run(self.push_cmd(repo, self.segs[0]), "pgvault archive-push")
        seg = self.segs[-3]
        self.warm(seg)
        data = os.path.join(self.dir, "sched.data")
        # system-wide (-a), so that switches from the idle task (wake-ups on
        # an idle CPU) are seen too; only pgvault's threads are counted
        flt = " || ".join(f'{f} == "{c}"' for f in ("prev_comm", "next_comm")
                          for c in ("pgvault", "tokio-rt-worker"))
        # the push's pid, to tell its threads from other pgvault processes
        pidfile = os.path.join(self.dir, "push.pid")
        cmd = ["sh", "-c", 'echo $$ > "$0"; exec "$@"', pidfile, *self.push_cmd(repo, seg)]
        run(["perf", "record", "-q", "-a", "-e", "sched:sched_switch", "--filter", flt,
             "--call-graph", "dwarf,32768", "-o", data, "--", *cmd],
            "perf record -e sched:sched_switch")
        with open(pidfile) as f:
            pid = int(f.read().strip())
        txt = run(["perf", "script", "-i", data, "-F", "comm,pid,tid,cpu,time,event,trace,ip,sym,dso"],
                  "perf script").stdout.decode(errors="replace")
        self.off = offcpu_summary(txt, pid)

    def report(self):
        w = self.w
        w("### Profile of pgvault archive-push (one 16 MiB segment)")
        w("")
        w(f"Process start-up (medians of 20, from the same harness): `/bin/true` {self.true_ms:.1f} ms, "
          f"`pgvault --version` {self.startup_ms:.1f} ms, `pgvault archive-push` of a missing file "
          f"(options, runtime, then the error) {self.missing_ms:.1f} ms.")
        w("")
        st = self.stat
        w(f"`perf stat` (median of 5 pushes): task-clock {st.get('task-clock', 0):.1f} ms of CPU, "
          f"{st.get('page-faults', 0):.0f} page faults, {st.get('context-switches', 0):.0f} context switches, "
          f"{st.get('cpu-migrations', 0):.0f} CPU migrations.")
        w("")
        k, buckets, top = self.perf
        w(f"CPU samples (`perf record -e cpu-clock -F 4999 -g`, {k} pushes, {self.perf_samples} samples, "
          "all of pgvault's threads; hardware counters are not available in this VM):")
        w("")
        w("| where | share of CPU samples |")
        w("|---|---:|")
        for b, pct in buckets.items():
            w(f"| {b} | {pct:.1f}% |")
        w("")
        w("Top symbols:")
        w("")
        w("| share | dso | symbol |")
        w("|---:|---|---|")
        for pct, dso, kind, sym in top:
            w(f"| {pct:.1f}% | {dso} | `{sym[:80]}` |")
        w("")
        w(f"Wall-clock phases of one push under `strace -f -tt -T` ({1000 * self.strace_total:.1f} ms in all; "
          "strace slows system calls down, read the shares):")
        w("")
        w("| phase | ms | share |")
        w("|---|---:|---:|")
        for ph, t in self.phases.items():
            if t == 0 and ph.startswith("fsync of new"):
                continue
            w(f"| {ph} | {1000 * t:.1f} | {100 * t / self.strace_total:.0f}% |")
        w("")
        w(f"fsync calls: {self.nfsync}, {1000 * self.fsync_total:.1f} ms in all: "
          + ", ".join(f"{n} {ms:.1f} ms" for n, ms in self.fsync_list))
        w("")
        if self.strace_c:
            w("Syscall counts (`strace -c -f`, one push each, not the first into its repository):")
            w("")
            names = ["fsync", "fdatasync", "read", "write", "openat", "mmap", "munmap", "clone3", "futex",
                     "linkat", "rename", "renameat", "renameat2", "unlink", "mkdir", "execve"]
            tools = list(self.strace_c)
            w("| syscall | " + " | ".join(tools) + " |")
            w("|---|" + "---:|" * len(tools))
            for n in names:
                if any(n in self.strace_c[t] for t in tools):
                    w(f"| {n} | " + " | ".join(str(self.strace_c[t].get(n, 0)) for t in tools) + " |")
            w("")
        if self.off:
            total, rows = self.off
            w(f"Threads of one push (`perf record -a -e sched:sched_switch --call-graph dwarf`, "
              f"{total:.1f} ms from the first to the last switch):")
            w("")
            w("| thread | on CPU ms | runnable, waiting for a CPU ms | asleep ms | asleep mostly in |")
            w("|---|---:|---:|---:|---|")
            for role, runms, waitms, sleepms, where in rows:
                w(f"| {role} | {runms:.1f} | {waitms:.1f} | {sleepms:.1f} | {where} |")
            w("")
        w(f"Interleaved, {len(self.segs)} segments, median wall time per segment:")
        w("")
        w("| | median ms |")
        w("|---|---:|")
        for name, ms in self.thr:
            w(f"| {name} | {ms:.1f} |")
        text = "\n".join(self.out) + "\n"
        print(text)
        if self.a.out:
            with open(self.a.out, "a") as f:
                f.write("\n" + text)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", required=True)
    ap.add_argument("--segments", required=True)
    ap.add_argument("--pgdata", required=True)
    ap.add_argument("--pgvault", required=True)
    ap.add_argument("--pgbackrest", default="pgbackrest")
    ap.add_argument("--pgbackrest-conf")
    ap.add_argument("--out")
    a = ap.parse_args()
    for k in ("work", "segments", "pgdata", "pgbackrest_conf", "out"):
        if getattr(a, k):
            setattr(a, k, os.path.abspath(getattr(a, k)))
    for tool in ("perf", "strace"):
        if not shutil.which(tool):
            die(f"{tool} is not installed")
    p = Profile(a)
    p.warm()
    log("profile: start-up")
    p.startup()
    log("profile: perf stat")
    p.perf_stat()
    log("profile: perf record")
    p.perf_record()
    log("profile: strace")
    p.strace_phases()
    log("profile: off-CPU")
    try:
        p.offcpu()
    except SystemExit:
        p.off = None
        log("profile: perf sched_switch tracing failed; skipped")
    log("profile: compress threads")
    p.threads_compare()
    p.report()


if __name__ == "__main__":
    main()
