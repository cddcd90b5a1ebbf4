"""Memory of batch inference over many pairs: resident memory (RSS) every N pairs.

``configs/inference.json`` streams the pairs (a plain ``Dataset``, batch size 1, nothing kept per pair), so its
memory must not grow with the number of pairs. This script runs it over ``--pairs`` pairs cycled from a dataset
(default: the embedded phantom, 2D) and prints the RSS after every ``--every`` pairs::

    python scripts/benchmark_memory.py                       # 1000 pairs of the embedded dataset, method 'average'
    python scripts/benchmark_memory.py --pairs 5000 --method dran --ckpt_path runs/dran/model.pt --json mem.json

The pairs go through the normal data layer: a ``pairs.csv`` manifest (``source_a,source_b,name``) naming the
dataset's files over and over. Outputs are written to a temporary folder (removed afterwards) unless
``--output_dir`` is given. Linux reads RSS from ``/proc/self/statm``; elsewhere the peak RSS is reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))


def rss_mb() -> float:
    """Current resident set size in MiB (peak RSS where /proc is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def write_manifest(dataset_dir, n_pairs: int, path: Path) -> Path:
    """A ``source_a,source_b,name`` manifest of ``n_pairs`` rows cycling through the pairs of ``dataset_dir``."""
    from scripts.data import build_datalist

    base = build_datalist(dataset_dir, "all", check=False)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["source_a", "source_b", "name", "pair"])
        for i in range(n_pairs):
            it = base[i % len(base)]
            w.writerow([it["source_a"], it["source_b"], f"{i:06d}_{it['name']}", it.get("pair", "")])
    return path


def run(n_pairs=1000, every=100, method="average", dataset_dir=None, output_dir=None, ckpt_path=None,
        network_overrides=None, extra_handlers=()) -> dict:
    """Fuse ``n_pairs`` pairs and sample RSS every ``every`` pairs; ``extra_handlers`` are called after each pair
    (the test's leak control uses it)."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    if dataset_dir is None:
        from scripts.phantom import default_dataset_dir, ensure_phantom_dataset

        dataset_dir = ensure_phantom_dataset(default_dataset_dir(BUNDLE_ROOT))
    work = Path(tempfile.mkdtemp(prefix="fusion_mem_"))
    out = Path(output_dir) if output_dir else work / "fused"
    try:
        manifest = write_manifest(dataset_dir, n_pairs, work / "pairs.csv")
        overrides = {"dataset_dir": str(manifest), "output_dir": str(out), "method": method}
        if ckpt_path:
            overrides["ckpt_path"] = str(ckpt_path)
        if network_overrides:
            overrides["network_overrides"] = network_overrides
        wf = ConfigWorkflow(
            workflow_type="infer", config_file=str(BUNDLE_ROOT / "configs" / "inference.json"),
            meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"), logging_file=False,
            bundle_root=str(BUNDLE_ROOT), **overrides,
        )
        wf.initialize()
        evaluator = wf.parser.get_parsed_content("evaluator")
        samples = [(0, rss_mb(), 0.0)]
        start = time.perf_counter()

        def record(engine):
            samples.append((engine.state.iteration, rss_mb(), time.perf_counter() - start))
            print(f"{engine.state.iteration:>7d} pairs  RSS {samples[-1][1]:8.1f} MiB  {samples[-1][2]:7.1f} s", flush=True)

        for h in extra_handlers:
            evaluator.add_event_handler(Events.ITERATION_COMPLETED, h)
        evaluator.add_event_handler(Events.ITERATION_COMPLETED(every=max(1, int(every))), record)
        wf.run()
        wf.finalize()
        n_written = sum(1 for p in out.iterdir() if p.name.endswith("_fused.png") or p.name.endswith("_fused.nii.gz"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    after_first = [s for s in samples if s[0] > 0]
    first, last = after_first[0], after_first[-1]
    result = {
        "pairs": n_pairs, "method": method, "every": every, "written": n_written,
        "samples": [{"pairs": p, "rss_mb": round(r, 2), "seconds": round(t, 2)} for p, r, t in samples],
        "rss_start_mb": round(samples[0][1], 2),
        "rss_first_sample_mb": round(first[1], 2),
        "rss_end_mb": round(last[1], 2),
        "growth_mb": round(last[1] - first[1], 2),  # from the first sample (warmed up) to the end
        "growth_mb_per_1000_pairs": round((last[1] - first[1]) / max(1, last[0] - first[0]) * 1000, 2),
    }
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--every", type=int, default=100, help="record RSS every N pairs")
    p.add_argument("--method", default="average")
    p.add_argument("--dataset_dir", default=None, help="default: the embedded phantom dataset (2D)")
    p.add_argument("--output_dir", default=None, help="keep the fused images here (default: a temporary folder)")
    p.add_argument("--ckpt_path", default=None)
    p.add_argument("--network_overrides", default=None, help="JSON, e.g. '{\"features\": 8}'")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    res = run(a.pairs, a.every, a.method, a.dataset_dir, a.output_dir, a.ckpt_path,
              json.loads(a.network_overrides) if a.network_overrides else None)
    print(f"{res['written']} pairs fused; RSS {res['rss_first_sample_mb']:.1f} MiB after {a.every} pairs, "
          f"{res['rss_end_mb']:.1f} MiB after {a.pairs} ({res['growth_mb']:+.1f} MiB, "
          f"{res['growth_mb_per_1000_pairs']:+.2f} MiB per 1000 pairs)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
