"""Time the fusion-metric suite (scripts/metrics.py) on CPU.

Default: 100 pairs of 256x256 built from the real AANLIB pairs in ../shared/data/aanlib (repeated; A = the
aligned CT/PET/SPECT luminance, B = the MRI, F = round((A+B)/2)), or random images with ``--source random``,
scored with 2 torch threads. Prints seconds and pairs/s per metric and for the whole suite in one call.

    python scripts/benchmark_metrics.py [--pairs 100] [--threads 2] [--source real|random] [--chunk-size 4]
                                        [--omp-passive]

``--omp-passive`` sets OMP_WAIT_POLICY=PASSIVE before torch is imported: on a machine whose cores are busy
with other processes, spinning OpenMP workers otherwise slow multi-threaded runs down several-fold.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_S = 20.0


def load_pairs(n: int, source: str, shared: Path):
    import torch

    if source == "random":
        g = torch.Generator().manual_seed(0)
        a = torch.randint(0, 256, (n, 1, 256, 256), generator=g).to(torch.float32)
        b = torch.randint(0, 256, (n, 1, 256, 256), generator=g).to(torch.float32)
    else:
        from PIL import Image

        root = shared / "data" / "aanlib"
        rows = list(csv.DictReader(open(root / "pairs.csv")))
        rows = [rows[i % len(rows)] for i in range(n)]

        def read(p):
            return np.asarray(Image.open(root / p).convert("L"), dtype=np.float32)

        a = torch.from_numpy(np.stack([read(r["aligned"]) for r in rows]))[:, None]
        b = torch.from_numpy(np.stack([read(r["mri"]) for r in rows]))[:, None]
    return a, b, torch.round((a + b) / 2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--source", choices=["real", "random"], default="real")
    ap.add_argument("--chunk-size", type=int, default=4)
    ap.add_argument("--names", nargs="*", default=None, help="metrics to time (default: all)")
    ap.add_argument("--omp-passive", action="store_true", help="set OMP_WAIT_POLICY=PASSIVE (before importing torch)")
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("FUSION_SHARED_DIR", ROOT.parent / "shared")))
    args = ap.parse_args(argv)
    if args.omp_passive:
        if "torch" in sys.modules:
            print("warning: torch already imported, --omp-passive has no effect")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    from scripts import metrics as M

    torch.set_num_threads(args.threads)
    a, b, f = load_pairs(args.pairs, args.source, args.shared)
    names = args.names or [n for n in M.METRICS if M._applicable(n, a.shape)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.pairs} pairs of "
          f"{tuple(a.shape[2:])} ({args.source}), chunk_size {args.chunk_size}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average {load:.2f}")
    t0 = time.perf_counter()
    M.compute_metrics(a[:2], b[:2], f[:2], names=names, chunk_size=args.chunk_size)  # imports, FMI table warm-up
    print(f"warm-up on 2 pairs: {time.perf_counter() - t0:.2f} s")

    per = {}
    print(f"{'metric':<8} {'seconds':>8} {'pairs/s':>9} {'cpu_s':>8}   (cpu_s: process CPU time, all threads)")
    for n in names:
        t0, c0 = time.perf_counter(), time.process_time()
        M.compute_metrics(a, b, f, names=[n], chunk_size=args.chunk_size)
        per[n] = time.perf_counter() - t0
        print(f"{n:<8} {per[n]:8.3f} {args.pairs / per[n]:9.1f} {time.process_time() - c0:8.3f}")
    t0, c0 = time.perf_counter(), time.process_time()
    M.compute_metrics(a, b, f, names=names, chunk_size=args.chunk_size)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"{'sum':<8} {sum(per.values()):8.3f}   (separate calls; Q_S/Q_W/Q_E share work in one call)")
    ok = total * 100 / args.pairs < TARGET_S
    print(f"{'TOTAL':<8} {total:8.3f} {args.pairs / total:9.1f} {cpu:8.3f}   full suite in one compute_metrics call "
          f"[target < {TARGET_S:.0f} s per 100 pairs: {'met' if ok else 'NOT met'}]")
    print(f"load average after: {os.getloadavg()[0]:.2f} (other processes on these cores inflate wall time)")
    return {"per_metric_s": per, "total_s": total, "total_cpu_s": cpu}


if __name__ == "__main__":
    main()
