"""Smoke test of scripts/benchmark.py (``--quick``): every section runs and the JSON report holds what the README
promises. Timings themselves are not checked (shared machine)."""

import json

import pytest
import torch

from scripts import benchmark
from scripts.methods import available_methods


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
    from scripts.networks.blocks import tune_cpu_allocator

    tune_cpu_allocator(False)


def test_registry_matches_method_configs():
    methods = set(available_methods(benchmark.ROOT))
    assert {e.method for e in benchmark.REGISTRY.values()} <= methods
    for key, (seconds, source) in benchmark.OFFICIAL_LATENCY_S.items():
        assert seconds > 0 and "../shared/parity/" in source and key in source


def test_quick_run_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = benchmark.main(["--quick", "--methods", "dran", "msgfusion", "average", "--sizes", "32", "8x8x8",
                             "--threads", "1", "--device", "cpu", "--no-data", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| method | size | device |" in printed and "GFLOP/s" in printed
    saved = json.loads(out.read_text())
    assert saved["environment"]["threads"] == 1 and saved["environment"]["peak_gflops"]["cpu"]["peak"] > 0
    rows = {(r["name"], r["size"]): r for r in report["results"]}
    assert set(rows) == {(m, s) for m in ("dran", "msgfusion", "average") for s in ("32x32", "8x8x8")}
    for (name, size), r in rows.items():
        assert "error" not in r, r
        assert {"reference", "reference+alloc", "optimised"} <= set(r["latency_s"])
        assert all(v > 0 for v in r["latency_s"].values())
        assert r["best_pairs_per_s"] > 0 and set(r["peak_mib"]) == {"reference", "optimised"}
        assert r["load_before"] == r["load_before"]  # a number (not nan) on Linux
    dran = rows[("dran", "32x32")]
    assert dran["has_reference_path"] and dran["params"] == 414_081
    assert dran["gmac_optimised"] < 0.6 * dran["gmac_reference"]  # the basis trick halves DRAN's convolutions
    assert dran["train"]["iters_per_s"]["optimised"] > 0 and "train" not in rows[("dran", "8x8x8")]
    assert not rows[("average", "32x32")]["has_reference_path"] and "train" not in rows[("average", "32x32")]


def test_official_ratio_and_data_check(tmp_path, monkeypatch, aanlib_dir):
    """The ratio to the official latency is reported for 256x256 CPU runs with 2 threads; the loader check runs."""
    monkeypatch.setitem(benchmark.OFFICIAL_LATENCY_S, "max", (0.5, "../shared/parity/max (test entry)"))
    report = benchmark.main(["--quick", "--methods", "max", "msgfusion", "--sizes", "256", "--threads", "2",
                             "--device", "cpu", "--data", "--data-dir", str(aanlib_dir)])
    row = next(r for r in report["results"] if r["name"] == "max")
    assert row["official_s"] == 0.5
    assert row["optimised_over_official"] == pytest.approx(row["latency_s"]["optimised"] / 0.5)
    msg = next(r for r in report["results"] if r["name"] == "msgfusion")
    assert msg["paper_s"] == 2.0 and "official_s" not in msg
    targets = {t["name"]: t for t in report["targets"]}
    assert set(targets) == {"max", "msgfusion"}
    assert targets["max"]["value"] == pytest.approx(row["optimised_over_official"])
    assert targets["max"]["status"] == ("met" if row["optimised_over_official"] <= 0.5 else "missed")
    assert targets["msgfusion"]["limit"] == 0.5 and targets["msgfusion"]["value"] == msg["latency_s"]["optimised"]
    assert {d["num_workers"] for d in report["data"]} == {0, 2}
    assert all(d["batches_per_s"] > 0 and d["method"] == "msgfusion" for d in report["data"])


def test_scaling_mode_reports_every_side(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    report = benchmark.main(["--scaling", "16", "32", "--methods", "dran", "average", "--repeats", "1",
                             "--threads", "1", "--device", "cpu", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| method | device | 16x16 s | 32x32 s | cost per pixel at 32 / at 16 |" in printed
    rows = {r["name"]: r for r in report["scaling"]}
    assert set(rows) == {"dran", "average"}
    for r in rows.values():
        assert set(r["latency_s"]) == {16, 32} and all(v > 0 for v in r["latency_s"].values())
    assert json.loads(out.read_text())["scaling"][0]["name"] == "dran"


def _row(name, method, device="cpu", size="256x256", **extra):
    return {"name": name, "method": method, "size": size, "device": device, "latency_s": {"optimised": 1.0},
            "speedup_optimised_vs_reference": 2.0, **extra}


def test_targets_status_margin_and_reason(capsys):
    rows = [
        _row("dran", "dran", official_s=1.76, optimised_over_official=0.6),
        _row("mactfusion", "mactfusion", official_s=2.88, optimised_over_official=0.4),
        _row("bsafusion", "bsafusion", official_s=0.37, optimised_over_official=2.2, achieved_gflops=30.0,
             share_of_peak=0.2),
        _row("msgfusion@64", "msgfusion", paper_s=2.0),
        _row("dran", "dran", device="cuda", best_pairs_per_s=150.0, best_batch=8),
        _row("bsafusion", "bsafusion", device="cuda", best_pairs_per_s=80.0, best_batch=8),
        _row("dran", "dran", size="512x512", official_s=1.76, optimised_over_official=3.0),  # no target at 512
        _row("average", "average"),  # no official figure: no target
    ]
    t = {(x["name"], x["device"]): x for x in benchmark.check_targets(rows, cpu="AMD EPYC 7B13")}
    assert set(t) == {("dran", "cpu"), ("mactfusion", "cpu"), ("bsafusion", "cpu"), ("msgfusion@64", "cpu"),
                      ("dran", "cuda"), ("bsafusion", "cuda")}
    assert t["dran", "cpu"]["status"] == "missed" and t["dran", "cpu"]["by"] == "x1.20 the target latency"
    assert "nuclear norms" in t["dran", "cpu"]["why"]
    assert t["mactfusion", "cpu"]["status"] == "met" and "why" not in t["mactfusion", "cpu"]
    assert t["bsafusion", "cpu"]["status"] == "reported" and "20% of the measured peak" in t["bsafusion", "cpu"]["measured"]
    assert t["msgfusion@64", "cpu"]["status"] == "missed" and "F = 64" in t["msgfusion@64", "cpu"]["why"]
    assert t["dran", "cuda"]["status"] == "missed" and t["dran", "cuda"]["by"] == "0.75 of the target throughput"
    assert t["bsafusion", "cuda"]["status"] == "met"
    table = benchmark.format_targets(list(t.values()))
    assert "| dran | cpu | <= 0.50 of official latency (1.76 s) | 0.60 of official (1.000 s) | missed (x1.20" in table
    assert all(x.get("comparable", True) for x in t.values())
    other = {x["name"]: x for x in benchmark.check_targets(rows[:2], cpu="Intel(R) Xeon(R) Processor")}
    assert other["dran"]["comparable"] is False and "optimised / reference ratio (0.50)" in other["dran"]["note"]
    assert "not comparable" in benchmark.format_targets(list(other.values()))
