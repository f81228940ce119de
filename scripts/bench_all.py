"""Run every scripts/bench_*.py and print one table of their ratios.

Each benchmark measures alt-i2v against the naive way side by side in one run and ends with a line
``RESULT <name> key=value ... ratio=<x> target=<y>``; this script collects those lines. It also measures
``import alt_i2v`` and ``python -m alt_i2v --help`` (target: under 1 s each).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def startup_times(repeat: int = 5) -> list[tuple[str, str, str, str]]:
    rows = []
    for label, cmd in (("import alt_i2v", [sys.executable, "-c", "import alt_i2v"]),
                       ("alt-i2v --help", [sys.executable, "-m", "alt_i2v", "--help"])):
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
            best = min(best, time.perf_counter() - t)
        bare = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            bare = min(bare, time.perf_counter() - t)
        rows.append((label, f"{best * 1000:.0f} ms (bare python {bare * 1000:.0f} ms)",
                     f"{best / bare:.2f}x python startup", "< 1 s"))
    return rows


def parse_result(line: str) -> tuple[str, dict[str, str]]:
    _, name, *pairs = line.split()
    return name, dict(p.split("=", 1) for p in pairs if "=" in p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="names of benchmarks to run (e.g. build train)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per benchmark")
    args = ap.parse_args()
    scripts = sorted(p for p in HERE.glob("bench_*.py") if p.name != "bench_all.py")
    if args.only:
        scripts = [p for p in scripts if p.stem.removeprefix("bench_") in args.only]
    rows: list[tuple[str, str, str, str]] = startup_times()
    failed = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t_all = time.perf_counter()
    for script in scripts:
        print(f"--- {script.name}", flush=True)
        t = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                  timeout=args.timeout, cwd=ROOT, env=env)
        except subprocess.TimeoutExpired:
            failed.append(script.name)
            rows.append((script.stem, "timed out", "-", "-"))
            continue
        results = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        for ln in done.stdout.splitlines():
            if not ln.startswith("RESULT "):
                print("   ", ln)
        if done.returncode != 0 or not results:
            failed.append(script.name)
            rows.append((script.stem, f"failed (exit {done.returncode})", "-", "-"))
            print(done.stderr[-2000:], file=sys.stderr)
            continue
        for ln in results:
            name, kv = parse_result(ln)
            ratio, target = kv.pop("ratio", "-"), kv.pop("target", "-")
            detail = ", ".join(f"{k}={v}" for k, v in kv.items())
            rows.append((name, detail, f"{ratio}x" if re.match(r"^[\d.]+$", ratio) else ratio, target))
        print(f"    ({time.perf_counter() - t:.0f} s)", flush=True)
    widths = [max(len(r[i]) for r in rows + [("benchmark", "measured", "ratio", "target")]) for i in range(4)]
    print()
    for r in [("benchmark", "measured", "ratio", "target")] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"\nall benchmarks: {time.perf_counter() - t_all:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
