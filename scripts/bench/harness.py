#!/usr/bin/env python3
"""Timing harness for scripts/bench.sh (no dependencies beyond python3).

For every round: fresh repositories for pgvault and pgBackRest (stanza-create
in each), `sync`, then for each segment: read it once (untimed) so it is in
the page cache, then one after the other:

  A  pgvault --repo R --stanza bench --catalog off archive-push SEG
  B  pgbackrest --stanza=bench --repo1-path=R archive-push SEG
  C  zstd -3 -q -f SEG -o OUT, then open(OUT) + fsync + close   (the floor)

Each is timed as wall time around subprocess.run (process start-up included,
the same for all three), with the children's CPU time from getrusage.
Any non-zero exit is fatal, with the tool's own output.
"""

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time

STANZA = "bench"
TOOLS = ("pgvault", "pgbackrest", "floor")


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def log(msg):
    print(f"==> {msg}", file=sys.stderr, flush=True)


def run_checked(cmd, what, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    if p.returncode != 0:
        die(
            f"{what} failed (exit {p.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{p.stdout.decode(errors='replace')}"
            f"--- stderr ---\n{p.stderr.decode(errors='replace')}"
        )
    return p


class Bench:
    def __init__(self, a):
        self.a = a
        self.segs = sorted(
            os.path.join(a.segments, f) for f in os.listdir(a.segments)
        )
        if not self.segs:
            die(f"no segments in {a.segments}")
        self.tools = [t for t in TOOLS if t != "pgvault" or a.pgvault]
        self.notes = []  # odd things seen (output on success, ...)

    # --- commands -------------------------------------------------------
    def pgvault(self, repo, *args):
        return [self.a.pgvault, "--repo", repo, "--stanza", STANZA, *args]

    def pgbr(self, repo, *args):
        return [
            self.a.pgbackrest,
            f"--config={self.a.pgbackrest_conf}",
            f"--stanza={STANZA}",
            f"--repo1-path={repo}",
            *args,
        ]

    def fresh_repos(self, tag):
        d = os.path.join(self.a.work, tag)
        os.makedirs(d)
        repos = {"floor": os.path.join(d, "floor")}
        os.makedirs(repos["floor"])
        if "pgvault" in self.tools:
            repos["pgvault"] = os.path.join(d, "pgvault")
            run_checked(
                self.pgvault(repos["pgvault"], "stanza-create", "--pgdata", self.a.pgdata),
                "pgvault stanza-create",
            )
        repos["pgbackrest"] = os.path.join(d, "pgbackrest")
        os.makedirs(repos["pgbackrest"])
        run_checked(self.pgbr(repos["pgbackrest"], "stanza-create"), "pgbackrest stanza-create")
        return repos

    def command(self, tool, repo, seg):
        if tool == "pgvault":
            # pgBackRest's compress-level=3, not pgvault's WAL default (1)
            return self.pgvault(repo, "--catalog", "off", "--compress-level", "3", "archive-push", seg), None
        if tool == "pgbackrest":
            return self.pgbr(repo, "archive-push", seg), None
        out = os.path.join(repo, os.path.basename(seg) + ".zst")
        return ["zstd", "-3", "-q", "-f", seg, "-o", out], out

    # --- one timed call -------------------------------------------------
    def timed(self, tool, repo, seg):
        cmd, fsync_path = self.command(tool, repo, seg)
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if p.returncode == 0 and fsync_path is not None:
            fd = os.open(fsync_path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        t1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            die(
                f"{tool} failed on {os.path.basename(seg)} (exit {p.returncode}): {' '.join(cmd)}\n"
                f"--- stdout ---\n{p.stdout.decode(errors='replace')}"
                f"--- stderr ---\n{p.stderr.decode(errors='replace')}"
            )
        if tool == "pgvault" and (p.stdout or p.stderr):
            self.notes.append(
                f"pgvault printed output on a successful push of {os.path.basename(seg)}: "
                f"{(p.stdout + p.stderr).decode(errors='replace').strip()[:300]!r}"
            )
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return t1 - t0, cpu

    @staticmethod
    def warm(seg):
        with open(seg, "rb") as f:
            while f.read(1 << 20):
                pass

    def warm_segments(self):
        for s in self.segs:
            self.warm(s)

    # --- the run ----------------------------------------------------------
    def run(self):
        a = self.a
        log(f"{len(self.segs)} segments x {a.rounds} rounds, interleaved: {' '.join(self.tools)}")
        # Untimed warm-up: binaries, libraries and the segment in the page
        # cache, for all three alike.
        self.warm_segments()
        repos = self.fresh_repos("warmup")
        for tool in self.tools:
            self.timed(tool, repos[tool], self.segs[0])

        self.samples = {t: [] for t in self.tools}  # (round, seg, wall, cpu)
        self.last_repos = None
        self.load = {}
        for r in range(1, a.rounds + 1):
            repos = self.fresh_repos(f"round{r}")
            load0 = os.getloadavg()[0]
            os.sync()
            time.sleep(1)
            self.warm_segments()
            for i, seg in enumerate(self.segs):
                # read just before, so it is in the page cache whatever
                # reclaims cold pages on this machine
                self.warm(seg)
                for tool in self.tools:
                    wall, cpu = self.timed(tool, repos[tool], seg)
                    self.samples[tool].append((r, i, wall, cpu))
            med = "  ".join(
                f"{t} {1000 * statistics.median(w for (rr, _, w, _) in self.samples[t] if rr == r):.1f} ms"
                for t in self.tools
            )
            self.load[r] = (load0, os.getloadavg()[0])
            log(f"round {r}: median {med} (load average {load0:.2f} -> {self.load[r][1]:.2f})")
            self.last_repos = repos
        os.sync()
        self.check_round_trip()
        self.sizes = self.repo_sizes(self.last_repos)
        self.rss = self.peak_rss()

    def check_round_trip(self):
        """Untimed: every segment comes back byte-identical from both repos."""
        repos = self.last_repos
        d = os.path.join(self.a.work, "get")
        os.makedirs(d)
        for seg in self.segs:
            name = os.path.basename(seg)
            with open(seg, "rb") as f:
                orig = f.read()
            for tool in ("pgvault", "pgbackrest"):
                if tool not in self.tools:
                    continue
                dest = os.path.join(d, f"{tool}-{name}")
                if tool == "pgvault":
                    cmd = self.pgvault(repos[tool], "--catalog", "off", "archive-get", name, dest)
                else:
                    cmd = self.pgbr(repos[tool], "archive-get", name, dest)
                run_checked(cmd, f"{tool} archive-get {name}")
                with open(dest, "rb") as f:
                    if f.read() != orig:
                        die(f"{tool}: {name} did not come back byte-identical")
                os.unlink(dest)
        log(f"round trip: all {len(self.segs)} segments come back byte-identical from "
            + " and ".join(t for t in ("pgvault", "pgbackrest") if t in self.tools))

    def repo_sizes(self, repos):
        sizes = {}
        for tool in self.tools:
            total = 0
            for dp, _, fs in os.walk(repos[tool]):
                for f in fs:
                    # WAL objects only (not stanza/archive.info metadata)
                    if re.match(r"^[0-9A-F]{24}", f):
                        total += os.path.getsize(os.path.join(dp, f))
            sizes[tool] = total
        sizes["original"] = sum(os.path.getsize(s) for s in self.segs)
        return sizes

    def peak_rss(self):
        """Peak RSS (KiB) of one push of one segment into a fresh repository."""
        repos = self.fresh_repos("rss")
        os.sync()
        out = {}
        for tool in self.tools:
            cmd, _ = self.command(tool, repos[tool], self.segs[-1])
            p = subprocess.run(
                ["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            if p.returncode != 0:
                die(f"/usr/bin/time -v {tool} failed:\n{p.stderr.decode(errors='replace')}")
            m = re.search(rb"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
            out[tool] = int(m.group(1)) if m else None
        return out

    # --- report -------------------------------------------------------------
    def report(self):
        a = self.a
        lines = []
        w = lines.append
        with open(a.machine) as f:
            machine = f.read().rstrip("\n")
        w("### Machine")
        w("")
        w("```")
        w(machine)
        w(f"segments: {len(self.segs)} x 16 MiB, {os.path.basename(self.segs[0])} .. {os.path.basename(self.segs[-1])}")
        w(f"rounds: {a.rounds} (fresh repositories each round), order per segment: {', '.join(self.tools)}")
        w("```")
        w("")
        w("### Per-segment wall time (ms), all rounds")
        w("")
        w("| | n | median | mean | min | p90 | max | median CPU (user+sys) |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|")
        label = {
            "pgvault": "pgvault archive-push",
            "pgbackrest": "pgBackRest archive-push",
            "floor": "floor: zstd -3 + fsync",
        }
        med = {}
        for t in self.tools:
            ws = sorted(1000 * s[2] for s in self.samples[t])
            cs = [1000 * s[3] for s in self.samples[t]]
            med[t] = statistics.median(ws)
            p90 = ws[min(len(ws) - 1, int(round(0.9 * (len(ws) - 1))))]
            w(
                f"| {label[t]} | {len(ws)} | {med[t]:.1f} | {statistics.mean(ws):.1f} | {ws[0]:.1f} | "
                f"{p90:.1f} | {ws[-1]:.1f} | {statistics.median(cs):.1f} |"
            )
        w("")
        w("Median per round (ms):")
        w("")
        w("| round | " + " | ".join(self.tools) + " | 1-min load average, start -> end |")
        w("|---:|" + "---:|" * len(self.tools) + "---|")
        for r in range(1, a.rounds + 1):
            w(
                f"| {r} | "
                + " | ".join(
                    f"{1000 * statistics.median(s[2] for s in self.samples[t] if s[0] == r):.1f}"
                    for t in self.tools
                )
                + f" | {self.load[r][0]:.2f} -> {self.load[r][1]:.2f} |"
            )
        w("")
        w("### Ratios")
        w("")

        def paired(x, y):
            ys = {(s[0], s[1]): s[2] for s in self.samples[y]}
            return statistics.median(s[2] / ys[(s[0], s[1])] for s in self.samples[x])

        pairs = [("pgbackrest", "floor", None)]
        if "pgvault" in self.tools:
            pairs = [("pgvault", "pgbackrest", 0.5), ("pgvault", "floor", 1.2)] + pairs
        w("| ratio | of medians | median of per-segment ratios | target | |")
        w("|---|---:|---:|---:|---|")
        for x, y, target in pairs:
            r = med[x] / med[y]
            verdict = "" if target is None else ("met" if r <= target else "**missed**")
            w(
                f"| {x} / {y} | {r:.2f} | {paired(x, y):.2f} | "
                f"{'' if target is None else f'<= {target}'} | {verdict} |"
            )
        w("")
        w("### Peak RSS of one archive-push of a 16 MiB segment (`/usr/bin/time -v`)")
        w("")
        w("| | max RSS |")
        w("|---|---:|")
        for t in self.tools:
            v = self.rss.get(t)
            w(f"| {label[t]} | {'?' if v is None else f'{v / 1024:.1f} MiB'} |")
        w("")
        w("### Compressed size of the segments (last round)")
        w("")
        w("| | bytes | ratio |")
        w("|---|---:|---:|")
        orig = self.sizes["original"]
        w(f"| original | {orig} | 1.000 |")
        for t in self.tools:
            w(f"| {t} | {self.sizes[t]} | {self.sizes[t] / orig:.3f} |")
        if self.notes:
            w("")
            w("### Notes")
            w("")
            for n in sorted(set(self.notes))[:10]:
                w(f"- {n}")
        text = "\n".join(lines) + "\n"
        print(text)
        if a.out:
            with open(a.out, "w") as f:
                f.write(text)
            log(f"results written to {a.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", required=True)
    ap.add_argument("--segments", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pgdata", required=True)
    ap.add_argument("--pgvault")
    ap.add_argument("--pgbackrest", required=True)
    ap.add_argument("--pgbackrest-conf", required=True)
    ap.add_argument("--machine", required=True)
    ap.add_argument("--out")
    a = ap.parse_args()
    for k in ("work", "segments", "pgdata", "pgbackrest_conf", "machine", "out"):
        if getattr(a, k):
            setattr(a, k, os.path.abspath(getattr(a, k)))
    b = Bench(a)
    b.run()
    b.report()


if __name__ == "__main__":
    main()
