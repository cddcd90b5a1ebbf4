"""The bundle's JSON workflows end to end on a tiny dataset: training, inference, evaluation, multi-process."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from conftest import BUNDLE_ROOT

CONFIGS = BUNDLE_ROOT / "configs"
TINY_NET = {"features": 8}


def _tiny_dataset(root: Path, n=6, size=32) -> Path:
    """Paired folders, CT-MRI and PET-MRI (colour), with structure so SSIM is meaningful."""
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        base = np.sin(6 * xx + i) * np.cos(5 * yy - i)
        mri = ((base + 1) * 110 + 10).astype(np.uint8)
        ct = ((np.hypot(xx - 0.5, yy - 0.5) < 0.3 + 0.02 * i) * 180 + 30 * (base > 0) + 20).astype(np.uint8)
        pet = np.stack([(base > 0) * 200 + 40, (xx * 150).astype(int), np.full_like(mri, 30)], -1).astype(np.uint8)
        for pair, mod, arr in (("MRI_CT", "CT", ct), ("MRI_PET", "PET", pet)):
            for m, a in (("MRI", mri), (mod, arr)):
                (root / pair / m).mkdir(parents=True, exist_ok=True)
                Image.fromarray(a).save(root / pair / m / f"{i:02d}.png")
    return root


def _workflow(workflow_type, config_file, **override):
    return ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=config_file,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(BUNDLE_ROOT),
        **override,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    wf = _workflow(
        "train",
        str(CONFIGS / "train.json"),
        dataset_dir=str(tiny),
        output_dir=str(out),
        epochs=2,
        batch_size=2,
        patch_size=[32, 32],
        network_overrides=TINY_NET,
    )
    wf.initialize()
    assert wf.check_properties() in (None, [])
    wf.run()
    wf.finalize()
    return out


def test_documented_run_ids_exist():
    """The commands users type: `run training` (train.json), `run inference` (inference.json), `run evaluating`
    (evaluate.json); MONAI Label runs `run`. Each pair must be the same list (one a `%` reference to the other)."""
    for name, alias in (("train.json", "training"), ("inference.json", "inference"), ("evaluate.json", "evaluating")):
        cfg = json.loads((CONFIGS / name).read_text())
        assert (cfg[alias] == "%run" and isinstance(cfg["run"], list)) or (
            cfg["run"] == f"%{alias}" and isinstance(cfg[alias], list)), name


def test_metadata_single_source_of_truth():
    top, inner = BUNDLE_ROOT / "metadata.json", CONFIGS / "metadata.json"
    assert json.loads(top.read_text()) == json.loads(inner.read_text())
    meta = json.loads(inner.read_text())
    assert meta["version"] in meta["changelog"]
    for key in ("monai_version", "pytorch_version", "numpy_version", "network_data_format", "references"):
        assert meta[key]
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 2
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 1


def test_training_writes_loadable_checkpoints(trained):
    from scripts.networks import DRAN

    for name in ("model.pt", "model_final.pt"):
        sd = torch.load(trained / name, map_location="cpu", weights_only=True)
        net = DRAN(**TINY_NET)
        net.load_state_dict(sd)  # strict: the saved weights are exactly the network's
    assert any((trained / "logs").iterdir()), "TensorBoard events expected"


def test_fine_tuning_starts_from_init_ckpt_with_a_cosine_schedule(trained, tiny, tmp_path):
    """--init_ckpt loads weights before the first step (fresh optimizer); at learning rate 0 the run's final weights
    are exactly the initial ones (BatchNorm running statistics aside). The cosine schedule is stepped per
    epoch and saved in the training state."""
    init = torch.load(trained / "model_final.pt", map_location="cpu", weights_only=True)
    init = {k: v.half() if v.is_floating_point() else v for k, v in init.items()}  # shipped-style fp16 file
    torch.save(init, tmp_path / "init.pt")
    wf = _workflow("train", str(CONFIGS / "train.json"), dataset_dir=str(tiny), output_dir=str(tmp_path / "run"),
                   epochs=2, batch_size=2, patch_size=[32, 32], network_overrides=TINY_NET, learning_rate=0.0,
                   init_ckpt=str(tmp_path / "init.pt"), lr_schedule="cosine")
    wf.initialize()
    wf.run()
    wf.finalize()
    final = torch.load(tmp_path / "run" / "model_final.pt", map_location="cpu", weights_only=True)
    learned = [k for k in init if "running_" not in k and "num_batches" not in k]
    assert len(learned) > 10
    for k in learned:
        assert torch.equal(final[k].half(), init[k]), k
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    sched = next(v for k, v in state.items() if k.startswith("lr_scheduler"))
    assert sched["last_epoch"] == 2 and sched["T_max"] == 2

    from scripts.engine import WeightsLoader, lr_scheduler
    from scripts.methods import initial_checkpoint
    from scripts.networks import DRAN

    net = DRAN(**TINY_NET)  # a training state (checkpoint.pt) also serves as --init_ckpt / --ckpt_path
    WeightsLoader(load_path=str(trained / "checkpoint.pt"), load_dict={"model": net})(None)
    saved = torch.load(trained / "checkpoint.pt", map_location="cpu", weights_only=True)["network"]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sch = lr_scheduler(opt, "cosine", epochs=4)
    lrs = []
    for _ in range(4):
        opt.step()
        sch.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[1] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5)) and lrs[-1] == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="lr_schedule must be"):
        lr_scheduler(opt, "step")
    with pytest.raises(FileNotFoundError, match="missing.pt: weights to start training from not found"):
        initial_checkpoint(BUNDLE_ROOT, "dran", str(tmp_path / "missing.pt"))
    assert initial_checkpoint(BUNDLE_ROOT, "dran", "shipped") == str(BUNDLE_ROOT / "models" / "dran.pt")


def test_inference_writes_grey_and_colour_for_every_pair(trained, tiny, tmp_path):
    wf = _workflow(
        "infer",
        str(CONFIGS / "inference.json"),
        dataset_dir=str(tiny),
        output_dir=str(tmp_path),
        ckpt_path=str(trained / "model.pt"),
        network_overrides=TINY_NET,
    )
    wf.initialize()
    wf.run()
    wf.finalize()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 * 12
    for pair in ("CT-MRI", "PET-MRI"):
        grey = Image.open(tmp_path / f"{pair}_00_fused.png")
        rgb = Image.open(tmp_path / f"{pair}_00_fused_rgb.png")
        assert grey.mode == "L" and rgb.mode == "RGB" and grey.size == (32, 32)
        arr = np.asarray(rgb).astype(int)
        coloured = np.abs(arr[..., 0] - arr[..., 2]).max() > 10
        assert coloured == (pair == "PET-MRI")  # colour PET keeps its chroma, CT stays grey


def test_evaluation_writes_metric_tables(trained, tiny, tmp_path):
    wf = _workflow(
        "eval",
        str(CONFIGS / "evaluate.json"),
        dataset_dir=str(tiny),
        output_dir=str(tmp_path),
        ckpt_path=str(trained / "model.pt"),
        network_overrides=TINY_NET,
        metrics=["SSIM", "PSNR", "EN"],
        figures=False,
    )
    wf.initialize()
    wf._run_expr("evaluating")
    wf.finalize()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["method"] for r in rows} == {"dran"}
    expected = {f"{p}_{i:02d}" for p in ("CT-MRI", "PET-MRI") for i in range(6)}
    assert {r["name"] for r in rows} == expected
    # a 2-epoch DRAN: only sanity (the CDDFuse SSIM is a sum of two SSIMs, in [-2, 2])
    assert all(-2 <= float(r["SSIM"]) <= 2 and float(r["EN"]) > 0 and not r["error"] for r in rows)
    assert (tmp_path / "metrics_summary.md").is_file()
    assert (tmp_path / "fused" / "dran" / "CT-MRI_00_fused.png").is_file()


def _chain(exc: BaseException) -> str:
    """All messages of an exception chain (the bundle's config layer wraps the real error)."""
    msgs = []
    while exc is not None:
        msgs.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(msgs)


def test_baseline_cannot_be_trained(tiny, tmp_path):
    wf = _workflow("train", str(CONFIGS / "train.json"), dataset_dir=str(tiny), output_dir=str(tmp_path), method="average")
    with pytest.raises(Exception) as err:
        wf.initialize()
        wf.run()
    assert "method 'average' has no trainable parameters" in _chain(err.value)


def test_unknown_method_lists_the_available_ones(tiny, tmp_path):
    wf = _workflow("infer", str(CONFIGS / "inference.json"), dataset_dir=str(tiny), method="nope")
    with pytest.raises(Exception) as err:
        wf.initialize()
        wf.run()
    assert "unknown method 'nope'; available: average, bsafusion, dran" in _chain(err.value)


def test_cli_inference_with_baseline_and_bad_pair_message(tiny, tmp_path):
    tiny = Path(shutil.copytree(tiny, tmp_path / "data"))
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT)}
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
        "--method", "average", "--dataset_dir", str(tiny), "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    fused = np.asarray(Image.open(tmp_path / "out" / "CT-MRI_03_fused.png")).astype(float)
    mri = np.asarray(Image.open(tiny / "MRI_CT" / "MRI" / "03.png")).astype(float)
    ct = np.asarray(Image.open(tiny / "MRI_CT" / "CT" / "03.png")).astype(float)
    norm = lambda a: (a - a.min()) / (a.max() - a.min())  # noqa: E731
    assert np.abs(fused / 255 - (norm(mri) + norm(ct)) / 2).max() <= 1 / 255 + 1e-6

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tiny / "MRI_CT" / "CT" / "05.png")
    res = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "CT/05.png: image is constant" in res.stderr + res.stdout


def test_multi_gpu_config_runs_two_cpu_processes_with_gloo(tiny, tmp_path):
    from scripts.networks import DRAN

    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training",
        "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
        "--dataset_dir", str(tiny), "--output_dir", str(tmp_path), "--epochs", "1", "--batch_size", "2",
        "--patch_size", "[32, 32]", "--network_overrides", "{'features': 8}",
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    sd = torch.load(tmp_path / "model_final.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in sd)  # DDP wrapper is not saved
    DRAN(**TINY_NET).load_state_dict(sd)
