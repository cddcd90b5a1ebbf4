"""MsgFusion ablation: the full model vs. no frequency path vs. no HSV V' path, trained briefly on the same data.

Every variant starts from the same weights (the ablated models take the full model's initial weights for the modules
they keep), sees the same batches (crops, flips) in the same order, and is scored on the same held-out real pairs
of the Harvard Whole Brain Atlas (AANLIB) with :func:`scripts.metrics.compute_metrics`, using the published
evaluator's conventions: the sources as stored (0..255 grey), the fused image written as 8-bit and min-max stretched
to 0..255 (:func:`scripts.metrics.to_grey255` with ``minmax=True``), as ``configs/evaluate.json`` does. The
parameter-free average fusion is scored alongside as a floor.

    python -m scripts.ablation_msgfusion --data ../shared/data/aanlib

trains on the training split (CRC32 name hash, 80%) of the PET-MRI and SPECT-MRI pairs (the paper's ablation is
MR-PET) and evaluates on the held-out 20%; ``--latency`` also times one 256x256 fusion of the full-width model.
CPU-sized by default (width 16, 250 Adam steps of 4 crops of 64x64: about 2 minutes per variant on 2 idle cores,
much longer when the cores are shared): evidence that the switches work and of their direction at small scale,
not the paper's numbers.
"""

from __future__ import annotations

import argparse
import time

import torch

from scripts import metrics as M
from scripts.data import build_datalist
from scripts.evaluation import grey255
from scripts.losses import MsgFusionLoss
from scripts.networks import AverageFusion, MsgFusion
from scripts.transforms import LoadFusionPaird

VARIANTS = {
    "MsgFusion (full)": {},
    "w/o frequency path": {"use_frequency": False},
    "w/o HSV V' path": {"use_v_prime": False},
}
DEFAULT_METRICS = ["EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM"]


def load_pairs(data: str, split: str, pairs: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(N, 2, H, W)`` network inputs (each source min-max scaled to [0, 1]), ``(N, 2, H, W)`` 0..255 scoring
    sources (as stored), pair names."""
    items = build_datalist(data, split, pairs=pairs, pair_source="aligned")
    loader = LoadFusionPaird()
    xs, scores, names = [], [], []
    for it in items:
        d = loader({"source_a": it["source_a"], "source_b": it["source_b"]})
        a, b = d["source_a"].as_tensor().float(), d["source_b"].as_tensor().float()
        scores.append(torch.cat([grey255(a), grey255(b)]))
        xs.append(torch.cat([(s - s.min()) / (s.max() - s.min()) for s in (a, b)]))
        names.append(it["name"])
    return torch.stack(xs), torch.stack(scores), names


def batch_plan(n_images: int, size, steps: int, batch: int, patch: int, seed: int) -> list[list[tuple]]:
    """The same crops/flips for every variant: ``steps`` lists of ``(index, top, left, flip_h, flip_w)``."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    plan = []
    for _ in range(steps):
        idx = torch.randint(0, n_images, (batch,), generator=g).tolist()
        top = torch.randint(0, h - patch + 1, (batch,), generator=g).tolist()
        left = torch.randint(0, w - patch + 1, (batch,), generator=g).tolist()
        flips = (torch.rand(batch, 2, generator=g) < 0.5).tolist()
        plan.append([(i, t, l_, fh, fw) for i, t, l_, (fh, fw) in zip(idx, top, left, flips)])
    return plan


def make_batch(x: torch.Tensor, step: list[tuple], patch: int) -> torch.Tensor:
    out = []
    for i, t, l_, fh, fw in step:
        crop = x[i, :, t : t + patch, l_ : l_ + patch]
        dims = [d for d, f in ((1, fh), (2, fw)) if f]
        out.append(crop.flip(dims) if dims else crop)
    return torch.stack(out)


def train(net: torch.nn.Module, x: torch.Tensor, plan, patch: int, lr: float) -> tuple[float, float]:
    """Adam on :class:`MsgFusionLoss`; returns (mean loss of the last 10% of steps, seconds)."""
    loss_fn = MsgFusionLoss()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    net.train()
    losses, t0 = [], time.perf_counter()
    for step in plan:
        batch = make_batch(x, step, patch)
        loss = loss_fn(net(batch, mode="train"), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail), time.perf_counter() - t0


@torch.no_grad()
def fuse_and_score(net: torch.nn.Module, x: torch.Tensor, scores: torch.Tensor, names: list[str]) -> dict:
    net.eval()
    fused = torch.cat([net(x[i : i + 1]) for i in range(len(x))]).clamp(0, 1)
    fused = torch.round(fused * 255.0) / 255.0  # the 8-bit PNG inference writes
    f = M.to_grey255(fused, minmax=True)
    return M.compute_metrics(scores[:, :1], scores[:, 1:], f, names=DEFAULT_METRICS)


def latency(features: int = 64, size: int = 256, repeats: int = 3) -> float:
    net = MsgFusion(features=features).eval()
    x = torch.rand(1, 2, size, size)
    with torch.inference_mode():
        net(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    return min(times)


def markdown(results: dict, n_test: int, pairs: list[str]) -> str:
    cols = DEFAULT_METRICS
    head = "| variant | params | train s | final loss | " + " | ".join(f"{c} {M.METRICS[c][1] and '↑' or '↓'}" for c in cols)
    lines = [head + " |", "|" + "---|" * (4 + len(cols))]
    for name, r in results.items():
        vals = " | ".join(f"{float(r['metrics'][c].mean()):.3f}" for c in cols)
        lines.append(f"| {name} | {r['params']} | {r['seconds']} | {r['loss']} | {vals} |")
    lines.append(f"\nMean over {n_test} held-out {'/'.join(pairs)} pairs (AANLIB, aligned, 256x256).")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/aanlib")
    ap.add_argument("--pairs", nargs="+", default=["PET-MRI", "SPECT-MRI"])
    ap.add_argument("--variant", default="functional", choices=["functional", "ct"])
    ap.add_argument("--features", type=int, default=16)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency", action="store_true", help="also time one 256x256 fusion at width 64")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    x_tr, _, _ = load_pairs(args.data, "training", args.pairs)
    x_te, s_te, names = load_pairs(args.data, "validation", args.pairs)
    print(f"training pairs: {len(x_tr)}, held-out pairs: {len(x_te)}", flush=True)
    plan = batch_plan(len(x_tr), x_tr.shape[2:], args.steps, args.batch_size, args.patch, args.seed)

    torch.manual_seed(args.seed)
    initial = MsgFusion(features=args.features, variant=args.variant).state_dict()
    results = {}
    for name, switches in VARIANTS.items():
        net = MsgFusion(features=args.features, variant=args.variant, **switches)
        net.load_state_dict({k: v for k, v in initial.items() if k in net.state_dict()})
        loss, secs = train(net, x_tr, plan, args.patch, args.lr)
        results[name] = {"metrics": fuse_and_score(net, x_te, s_te, names), "loss": f"{loss:.4f}",
                         "seconds": f"{secs:.0f}", "params": sum(p.numel() for p in net.parameters())}
        print(f"{name}: {secs:.0f} s, final loss {loss:.4f}", flush=True)
    results["average (baseline)"] = {"metrics": fuse_and_score(AverageFusion(), x_te, s_te, names), "loss": "-",
                                     "seconds": "-", "params": 0}
    print()
    print(markdown(results, len(x_te), args.pairs))
    if args.latency:
        print(f"\nlatency, width 64, 256x256, {args.threads} threads: {latency():.2f} s per pair")


if __name__ == "__main__":
    main()
