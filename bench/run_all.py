"""Run issue 9's benchmarks one after another and write bench/results.md (what `make bench` does).

Each benchmark runs as its own process (its own stack and database; a Ctrl-C or SIGTERM here is
passed on and every benchmark stops what it started), writes its figures as JSON, and this script
gathers them into one markdown table (benchmark, figure, value, baseline, ratio/target, verdict)
with the date, the machine (cores, memory, load) and the git commit, followed by each script's
own output.

  full (make bench):        lifecycle 200,000 (the headline); ingest 200,000; bulk_throughput 50,000
                            and 200,000; scaling 50k/100k/200k
  --quick (make bench-quick): lifecycle 5,000; ingest 5,000; bulk_throughput 3,000; scaling
                            2,000/4,000/8,000, smaller baselines

Run: .venv/bin/python bench/run_all.py [--quick] [--output bench/results.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _support import BENCH_DIR, ROOT, TABLE_HEADER, Figure, figure_row

FULL = [
    ("lifecycle", ["lifecycle.py", "--messages", "200000"]),
    ("ingest", ["ingest.py", "--messages", "200000"]),
    ("bulk_throughput 50k", ["bulk_throughput.py", "--messages", "50000"]),
    ("bulk_throughput 200k", ["bulk_throughput.py", "--messages", "200000"]),
    ("scaling", ["scaling.py", "--base", "50000"]),
]
QUICK = [
    ("lifecycle", ["lifecycle.py", "--messages", "5000", "--baseline-tasks", "3000"]),
    ("ingest", ["ingest.py", "--messages", "5000", "--baseline-rows", "5000"]),
    ("bulk_throughput", ["bulk_throughput.py", "--messages", "3000", "--baseline-tasks", "3000"]),
    # More than one batch (BULK_BATCH_SIZE 500) per step: a single batch is dispatched in one write, its
    # first -> last dispatch is 0 s and scaling.py divided by it. Still a smoke run: -c 4 takes four
    # batches at once, so only the larger steps' rates mean anything.
    ("scaling", ["scaling.py", "--base", "2000", "--baseline-tasks", "2000"]),
]


def machine() -> str:
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "?",
    )
    return f"{os.cpu_count()} cores ({model}), {mem_kb / 1024 / 1024:.1f} GiB memory, {platform.platform()}"


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{git('rev-parse', '--short', 'HEAD')} {git('log', '-1', '--format=%s')}{dirty}"


def run(name: str, argv: list[str], json_path: Path) -> tuple[int, str, float]:
    """One benchmark as a child process (its own group), output echoed live and kept."""
    cmd = [sys.executable, str(BENCH_DIR / argv[0]), *argv[1:], "--json", str(json_path)]
    print(f"\n##### {name}: {' '.join(cmd[1:])}", flush=True)
    began = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: let it stop its own processes (its finally), then reap it
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return proc.returncode, "".join(lines), time.monotonic() - began


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts, a smoke run of every script")
    parser.add_argument("--output", default=str(BENCH_DIR / "results.md"), help="default bench/results.md")
    parser.add_argument("--only", help="comma-separated names to run, e.g. 'ingest,scaling' (default: all)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        plan = [(name, argv) for name, argv in plan if name.split()[0] in wanted or name in wanted]

    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    figures: list[Figure] = []
    outputs: list[tuple[str, str, int, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        for n, (name, argv) in enumerate(plan):
            json_path = Path(tmp) / f"{n}.json"
            code, output, seconds = run(name, argv, json_path)
            outputs.append((name, " ".join(argv), code, seconds))
            if code == 0 and json_path.exists():
                figures.extend(Figure(**f) for f in json.loads(json_path.read_text())["figures"])
            else:
                figures.append(Figure(name, "did not finish", f"exit {code}", verdict="FAIL"))
            (Path(tmp) / f"{n}.out").write_text(output)
        logs = [(Path(tmp) / f"{n}.out").read_text() for n in range(len(plan))]

    finished = datetime.datetime.now(datetime.UTC)
    lines = [
        "# Benchmark results" + (" (quick smoke run: small counts, not the issue's figures)" if args.quick else ""),
        "",
        f"- date: {started:%Y-%m-%d %H:%M} - {finished:%H:%M} UTC",
        f"- machine: {machine()}; load average at start {load_before[0]:.2f} / {load_before[1]:.2f} / "
        f"{load_before[2]:.2f} (1/5/15 min)",
        f"- commit: {git_commit()}",
        f"- command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
        "- sandbox: Twilio at 50 ms per send; receipts on in lifecycle (Twilio's `sent` then `delivered`), "
        "off in the bulk runs (final_only callbacks, receipt_loss_rate 1.0)",
        "",
        TABLE_HEADER,
        *(figure_row(f) for f in figures),
        "",
        "Verdicts: PASS meets the target, FLOOR meets only the floor (bulk throughput >= 1x), "
        "FAIL neither; info has no target.",
        "",
        "## Runs",
        "",
    ]
    for (name, argv, code, seconds), log in zip(outputs, logs, strict=True):
        lines += [f"### {name} (`{argv}`; exit {code}, {seconds:.0f} s)", "", "```", log.rstrip(), "```", ""]
    Path(args.output).write_text("\n".join(lines))
    print(f"\nwrote {args.output}", flush=True)
    if any(code for _, _, code, _ in outputs):
        sys.exit(1)


if __name__ == "__main__":
    main()
