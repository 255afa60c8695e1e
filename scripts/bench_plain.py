"""SOFT against SDPA as a library user meets them: a fresh Python process that imports torch and `soft_attention` and
calls nothing else of ours (no CLI, no `lra_soft.allocator` call), one process per setting.

    python scripts/bench_plain.py                        # the default settings below, 3 processes each
    python scripts/bench_plain.py --setting plain --setting off --processes 5 --json /tmp/plain.json

Each child builds q, v (and k = q for SDPA, as SOFT ties K to Q) of shape (b, h, n, d) from one seed, warms both up,
then times forward+backward (`torch.autograd.grad` with a fixed output gradient) in interleaved rounds: SDPA, SOFT,
SDPA, SOFT, ..., so a drifting machine load hits both alike. A child reports both medians and their ratio; the parent
prints the median ratio over its processes per setting. Settings differ only in the child's environment or in one
line run before the timing:

- plain: nothing but the import and the calls (whatever the library does on its own);
- off: `LRA_SOFT_MALLOC_TUNING=0`, the opt-out of the lazy allocator tuning;
- tuned: `lra_soft.allocator.keep_freed_memory()` called first, as the CLI does.

Also reported: the minor page faults of a SOFT call (fresh pages the kernel zeroed), and the process's resident
memory after the timing, before and after `lra_soft.allocator.release_freed_memory()`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
from lra_soft.attention.soft import soft_attention

cfg = json.loads(sys.argv[1])
if cfg["threads"]:
    torch.set_num_threads(cfg["threads"])
if cfg["prelude"]:
    exec(cfg["prelude"])
torch.manual_seed(0)
b, h, n, d = cfg["batch"], cfg["heads"], cfg["n"], cfg["head_dim"]
q = torch.randn(b, h, n, d, requires_grad=True)  # (b, h, n, d)
v = torch.randn(b, h, n, d, requires_grad=True)
grad_out = torch.randn(b, h, n, d)
options = cfg["options"]


def sdpa():
    return torch.autograd.grad(F.scaled_dot_product_attention(q, q, v), (q, v), grad_out)


def soft():
    return torch.autograd.grad(soft_attention(q, v, **options), (q, v), grad_out)


faults = {"sdpa": 0, "soft": 0}  # minor page faults in the timed calls: fresh pages the kernel had to zero


def timed(name, fn):
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return elapsed


for _ in range(cfg["warmup"]):
    sdpa(), soft()
times = {"sdpa": [], "soft": []}
for _ in range(cfg["repeats"]):
    times["sdpa"].append(timed("sdpa", sdpa))
    times["soft"].append(timed("soft", soft))
from lra_soft import allocator  # already imported by the library; read only now, after the calls
median = {k: sorted(t)[len(t) // 2] for k, t in times.items()}
page = resource.getpagesize() / 2**20


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page


rss = rss_mib()  # what the process holds once every call's tensors are freed
allocator.release_freed_memory()
print(json.dumps({"sdpa_ms": 1e3 * median["sdpa"], "soft_ms": 1e3 * median["soft"],
                  "ratio": median["soft"] / median["sdpa"], "malloc_tuned": allocator.tuned,
                  "soft_fault_mib": faults["soft"] * page / cfg["repeats"], "rss_mib": rss,
                  "rss_released_mib": rss_mib()}))
"""

SETTINGS = {
    "plain": ({}, ""),
    "off": ({"LRA_SOFT_MALLOC_TUNING": "0"}, ""),
    "tuned": ({}, "from lra_soft.allocator import keep_freed_memory; keep_freed_memory()"),
}


def run_child(setting: str, cfg: dict) -> dict:
    env_extra, prelude = SETTINGS[setting]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({**cfg, "prelude": prelude})], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the {setting!r} process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", choices=sorted(SETTINGS),
                        help="repeatable; default: plain, off, tuned")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per setting, run round-robin")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="soft_attention option (default: window=4, inverse=solve, the paper's LRA setting)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in the child; 0: torch's default (a plain process's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per process; the median is kept")
    parser.add_argument("--json", type=Path, help="also write every process's result here")
    args = parser.parse_args()

    options = {"window": 4, "inverse": "solve"}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = int(value) if value.isdigit() else value
    cfg = {"n": args.n, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "options": options,
           "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats}
    settings = args.setting or ["plain", "off", "tuned"]
    results = {s: [] for s in settings}
    for _ in range(args.processes):  # round-robin over the settings, so a load change hits all of them
        for s in settings:
            results[s].append(run_child(s, cfg))

    print(f"soft_attention({', '.join(f'{k}={v}' for k, v in options.items())}) against SDPA, forward+backward, "
          f"b={args.batch} h={args.heads} n={args.n} d={args.head_dim}, "
          f"{args.threads or 'default'} torch threads")
    print("| setting | processes | SDPA ms | SOFT ms | SOFT / SDPA (median) | min-max | malloc_tuned | "
          "SOFT page faults MiB/call | RSS MiB after | RSS MiB after release_freed_memory() |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s, rows in results.items():
        ratios = [r["ratio"] for r in rows]
        print(f"| {s} | {len(rows)} | {statistics.median(r['sdpa_ms'] for r in rows):.1f} | "
              f"{statistics.median(r['soft_ms'] for r in rows):.1f} | {statistics.median(ratios):.2f} | "
              f"{min(ratios):.2f}-{max(ratios):.2f} | {sorted({r['malloc_tuned'] for r in rows})} | "
              f"{statistics.median(r['soft_fault_mib'] for r in rows):.0f} | "
              f"{statistics.median(r['rss_mib'] for r in rows):.0f} | "
              f"{statistics.median(r['rss_released_mib'] for r in rows):.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"config": cfg, "results": results}, indent=1))


if __name__ == "__main__":
    main()
