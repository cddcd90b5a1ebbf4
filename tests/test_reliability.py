"""Reliability and safety: resumable training, determinism, hostile inputs, batch inference policy, safe loading,
output confinement and constant memory (README "What happens when")."""

import contextlib
import csv
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from PIL import Image

from conftest import BUNDLE_ROOT
from scripts import io as fio
from scripts.data import build_datalist
from scripts.engine import CheckpointError, capture_rng, restore_rng, training_state_of
from scripts.transforms import FusionDataError, LoadFusionPaird

CONFIGS = BUNDLE_ROOT / "configs"
TINY_NET = {"features": 8}
EPOCHS = 4  # x 5 iterations (10 training pairs, batch 2) = 20 iterations


# ------------------------------------------------------------------------------------------------------ helpers
def _tiny_dataset(root: Path, n=6, size=32) -> Path:
    """Paired folders CT-MRI and PET-MRI (colour PET): 12 pairs, 10 for training, 2 for validation."""
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


def _workflow(kind, config, **override):
    return ConfigWorkflow(
        workflow_type=kind,
        config_file=str(CONFIGS / config),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,  # keep pytest's log capture (a logging config would replace its handler)
        bundle_root=str(BUNDLE_ROOT),
        **override,
    )


@contextlib.contextmanager
def _one_thread():
    """Train with one thread in-process, as the subprocess runs (OMP_NUM_THREADS=1): same float sums."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _train(data, out, hook=None, **override):
    args = dict(dataset_dir=str(data), output_dir=str(out), epochs=EPOCHS, batch_size=2, patch_size=[32, 32],
                network_overrides=TINY_NET)
    args.update(override)
    wf = _workflow("train", "train.json", **args)
    wf.initialize()
    assert wf.check_properties() in (None, [])  # still a valid MONAI training bundle
    trainer = wf.parser.get_parsed_content("train#trainer")
    if hook is not None:
        hook(trainer)
    with _one_thread():
        try:
            wf.run()
        finally:
            wf.finalize()
    return trainer


def _signal_at(iteration, signum):
    """Deliver a real signal to this process at the end of training iteration ``iteration``."""

    def hook(trainer):
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=iteration), lambda e: os.kill(os.getpid(), signum))

    return hook


def _results(out: Path) -> dict:
    ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    return {
        "final": torch.load(out / "model_final.pt", map_location="cpu", weights_only=True),
        "best": torch.load(out / "model.pt", map_location="cpu", weights_only=True),
        "optimizer": {f"{i}.{name}": v for i, s in ck["optimizer"]["state"].items() for name, v in s.items()},
        "iteration": ck["trainer"]["iteration"],
        "best_metric": ck["progress"]["evaluators"][0]["best_metric"],
    }


def _assert_identical(a: dict, b: dict) -> None:
    assert a["iteration"] == b["iteration"] == 5 * EPOCHS
    assert a["best_metric"] == b["best_metric"]
    for part in ("final", "best", "optimizer"):
        assert a[part].keys() == b[part].keys()
        diff = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not diff, f"{part}: {len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted training run (seed 0)."""
    out = tmp_path_factory.mktemp("reference")
    _train(tiny, out)
    return _results(out)


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_data_gives_identical_cpu_weights(tiny, reference, tmp_path):
    _train(tiny, tmp_path / "again")
    _assert_identical(_results(tmp_path / "again"), reference)
    _train(tiny, tmp_path / "seed1", seed=1)
    other = _results(tmp_path / "seed1")
    assert any(not torch.equal(other["final"][k], reference["final"][k]) for k in reference["final"])


# ----------------------------------------------------------------------------------------------------- resume
def test_sigterm_mid_epoch_saves_state_and_resume_is_bit_identical(tiny, reference, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        _train(tiny, out, hook=_signal_at(7, signal.SIGTERM))  # 2 batches into epoch 2
    assert stop.value.code == 128 + signal.SIGTERM
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["trainer"]["iteration"] == 7 and ck["rng_epoch_start"] is not None
    assert not (out / "model_final.pt").exists()  # an interrupted run is not a finished one
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the run
    _train(tiny, out, resume=True)
    _assert_identical(_results(out), reference)


def test_sigint_at_epoch_end_saves_after_validation_and_resume_is_bit_identical(tiny, reference, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        _train(tiny, out, hook=_signal_at(10, signal.SIGINT))  # last iteration of epoch 2
    assert stop.value.code == 128 + signal.SIGINT
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["trainer"]["iteration"] == 10 and ck["rng_epoch_start"] is None  # saved after epoch 2's validation
    assert ck["progress"]["evaluators"][0]["best_metric_epoch"] >= 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _train(tiny, out, resume="true")  # the command line passes strings
    _assert_identical(_results(out), reference)


def test_interval_state_resumes_from_file_bit_identical(tiny, reference, tmp_path):
    run = tmp_path / "interval"
    copies = {}

    def keep_copies(trainer):
        @trainer.on(Events.ITERATION_COMPLETED)
        def _copy(engine):
            if engine.state.iteration == 13:  # the state file and the best model as they are now
                copies["state"] = (run / "checkpoint.pt").read_bytes()
                copies["best"] = (run / "model.pt").read_bytes()

    _train(tiny, run, hook=keep_copies, checkpoint_iterations=3)
    _assert_identical(_results(run), reference)  # saving does not perturb training
    saved = tmp_path / "elsewhere" / "checkpoint.pt"
    saved.parent.mkdir()
    saved.write_bytes(copies["state"])
    (saved.parent / "model.pt").write_bytes(copies["best"])
    assert torch.load(saved, weights_only=True)["trainer"]["iteration"] == 12  # written every 3 iterations
    out = tmp_path / "resumed"  # another folder: the best model so far comes along
    _train(tiny, out, resume_from=str(saved))
    _assert_identical(_results(out), reference)


def test_sigterm_to_a_training_subprocess_then_resume_matches_uninterrupted_run(tiny, reference, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
        "--dataset_dir", str(tiny), "--output_dir", str(out), "--epochs", str(EPOCHS), "--batch_size", "2",
        "--patch_size", "[32, 32]", "--network_overrides", "{'features': 8}", "--checkpoint_iterations", "3",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=BUNDLE_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not (out / "checkpoint.pt").exists():  # written atomically at iteration 3
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "training did not start"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=240)
    text = log.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "received SIGTERM" in text and "continue with --resume true" in text
    iteration = torch.load(out / "checkpoint.pt", weights_only=True)["trainer"]["iteration"]
    assert 3 <= iteration < 5 * EPOCHS, "the signal must land mid-run"
    assert not (out / "model_final.pt").exists()
    res = subprocess.run(cmd + ["--resume", "true"], cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert f"resumed from {out / 'checkpoint.pt'}: epoch" in res.stdout
    _assert_identical(_results(out), reference)


def test_resume_problems_are_clear_errors(tiny, tmp_path):
    with pytest.raises(Exception) as err:
        _train(tiny, tmp_path / "none", resume=True)
    assert re.search(r"none/checkpoint\.pt: no training state to resume from", _chain(err.value))

    _train(tiny, tmp_path / "fresh", resume="auto", epochs=1)  # nothing to resume: starts a new run
    state = tmp_path / "fresh" / "checkpoint.pt"
    assert torch.load(state, weights_only=True)["trainer"]["iteration"] == 5

    wf = _workflow("train", "train.json", dataset_dir=str(tiny), output_dir=str(tmp_path / "x"), epochs=2,
                   batch_size=2, patch_size=[32, 32], network_overrides=TINY_NET)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    handler = training_state_of(trainer)
    with pytest.raises(CheckpointError, match=r"model_final\.pt: not a training state"):
        handler.load(trainer, tmp_path / "fresh" / "model_final.pt")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"damaged\.pt: cannot read the training state"):
        handler.load(trainer, damaged)
    other = _workflow("train", "train.json", dataset_dir=str(tiny), output_dir=str(tmp_path / "y"), epochs=2,
                      batch_size=2, patch_size=[32, 32], network_overrides={"features": 4})
    other.initialize()
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: does not match this training run"):
        other_trainer = other.parser.get_parsed_content("train#trainer")
        training_state_of(other_trainer).load(other_trainer, state)
    bigger_batch = _workflow("train", "train.json", dataset_dir=str(tiny), output_dir=str(tmp_path / "z"), epochs=2,
                             batch_size=5, patch_size=[32, 32], network_overrides=TINY_NET)
    bigger_batch.initialize()
    other_trainer = bigger_batch.parser.get_parsed_content("train#trainer")
    other_trainer.state.epoch_length = len(other_trainer.data_loader)  # as Engine.run sets it before STARTED
    with pytest.raises(CheckpointError, match=r"saved with 5 iterations per epoch but this run has 2"):
        training_state_of(other_trainer).load(other_trainer, state)
    evil, marker = _evil_pickle(tmp_path)
    with pytest.raises(CheckpointError, match="refusing to load a training state that contains pickled"):
        handler.load(trainer, evil)
    assert not marker.exists()


def test_state_is_written_atomically(tmp_path):
    target = tmp_path / "checkpoint.pt"
    fio.atomic_save(target, lambda tmp: torch.save({"v": torch.ones(3)}, tmp))

    def dies_half_way(tmp):
        Path(tmp).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # e.g. a second Ctrl-C while saving

    with pytest.raises(KeyboardInterrupt):
        fio.atomic_save(target, dies_half_way)
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.ones(3))  # the old state, intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def test_rng_state_round_trip_is_tensors_only(tmp_path):
    from monai.transforms import Compose, RandFlipd, RandSpatialCropd

    t = Compose([RandSpatialCropd(keys="x", roi_size=[4, 4], random_size=False), RandFlipd(keys="x", prob=0.5)])
    t.set_random_state(3)
    state = capture_rng([t])
    torch.save(state, tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)  # only tensors and plain values
    x = {"x": torch.arange(64.0).reshape(1, 8, 8)}
    first = [t(x)["x"], torch.rand(3), np.random.rand(3)]
    restore_rng(state, [t])
    again = [t(x)["x"], torch.rand(3), np.random.rand(3)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]) and np.array_equal(first[2], again[2])
    with pytest.raises(ValueError, match="transform random states"):
        restore_rng(state, [])


# --------------------------------------------------------------------------------------- hostile / odd inputs
def _png(path: Path, arr, mode=None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)
    return str(path)


def _nii(path: Path, arr) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
    return str(path)


def _zoo(root: Path) -> tuple[Path, list[str], dict[str, str]]:
    """A manifest of odd-but-valid pairs and of bad pairs (name -> expected message)."""
    import itk

    r = np.random.default_rng(0)
    g = lambda h=24, w=20: (r.random((h, w)) * 200 + 20).astype(np.uint8)  # noqa: E731
    rgb = (r.random((24, 20, 3)) * 255).astype(np.uint8)
    vol = (r.random((24, 20)) + 0.1).astype(np.float32)
    rows, good, bad = [], [], {}

    def add(name, a, b, problem=None):
        rows.append((a, b, name))
        (bad.__setitem__(name, problem) if problem else good.append(name))

    d = root / "files"
    mri = _png(d / "mri.png", g())
    add("grey", mri, _png(d / "ct.png", g()))
    add("rgb pet", mri, _png(d / "pet_rgb.png", rgb))
    add("rgba pet", mri, _png(d / "pet_rgba.png", np.concatenate([rgb, np.full((24, 20, 1), 255, np.uint8)], -1)))
    add("grey+alpha", _png(d / "la.png", np.stack([g(), np.full((24, 20), 255, np.uint8)], -1), "LA"), mri)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "pet_palette.png")
    add("palette pet", mri, str(d / "pet_palette.png"))
    add("16-bit", _png(d / "mri16.png", (r.random((24, 20)) * 60000 + 100).astype(np.uint16)), mri)
    Image.fromarray((r.random((24, 20)) * 3.5 - 1).astype(np.float32)).save(d / "float.tiff")
    add("float tiff", str(d / "float.tiff"), mri)
    add("odd size", _png(d / "odd_a.png", g(37, 53)), _png(d / "odd_b.png", g(37, 53)))
    add("nifti float", _nii(d / "a.nii.gz", vol), _nii(d / "b.nii.gz", (vol * 1000).astype(np.int16)))
    dcm = (r.random((24, 20)) * 3000 + 10).astype(np.uint16)
    itk.imwrite(itk.image_from_array(dcm), str(d / "one_slice.dcm"))
    add("dicom slice", str(d / "one_slice.dcm"), _png(d / "dcm_partner.png", g(24, 20)))

    add("size mismatch", mri, _png(d / "big.png", g(25, 20)), r"size mismatch: .*mri\.png is \(20, 24\) but .*big\.png")
    trunc = d / "truncated.png"
    trunc.write_bytes(Path(mri).read_bytes()[:120])
    add("truncated png", mri, str(trunc), r"truncated\.png: cannot read as an image \(.*truncated")
    (d / "text.png").write_text("this is not an image")
    add("text as png", mri, str(d / "text.png"), r"text\.png: cannot read as an image \(.*cannot identify")
    (d / "empty.png").write_bytes(b"")
    add("empty file", mri, str(d / "empty.png"), r"empty\.png: file is empty")
    add("missing file", mri, str(d / "gone.png"), r"gone\.png: file not found")
    add("constant", mri, _png(d / "black.png", np.zeros((24, 20), np.uint8)), r"black\.png: image is constant")
    nan = vol.copy()
    nan[3, 4] = np.nan
    nan[5, 6] = np.inf
    add("nan inf", _nii(d / "c.nii.gz", vol), _nii(d / "nan.nii.gz", nan), r"nan\.nii\.gz: contains 1 NaN and 1 Inf")
    gz = Path(_nii(d / "whole.nii.gz", vol)).read_bytes()
    (d / "cut.nii.gz").write_bytes(gz[: len(gz) // 2])
    add("truncated nifti", _nii(d / "e.nii.gz", vol), str(d / "cut.nii.gz"), r"cut\.nii\.gz: cannot read as an image")
    (d / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 40)
    add("corrupt dicom", str(d / "one_slice.dcm"), str(d / "bad.dcm"), r"bad\.dcm: cannot read as an image")
    add("volume in 2d", _nii(d / "v1.nii.gz", np.ones((24, 20, 5), np.float32) * vol[..., None]),
        _nii(d / "v2.nii.gz", np.ones((24, 20, 5), np.float32) * vol[..., None]),
        r"v1\.nii\.gz: 3D image of size \(24, 20, 5\) in a 2D workflow")
    manifest = root / "pairs.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["source_a", "source_b", "name"])
        w.writerows(rows)
    return manifest, good, bad


def _outputs(folder: Path) -> set[str]:
    return {re.sub(r"_fused(_rgb)?\.(png|nii\.gz)$", "", p.name) for p in folder.iterdir()}


def _chain(exc: BaseException) -> str:
    msgs = []
    while exc is not None:
        msgs.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(msgs)


def test_batch_inference_skips_each_bad_pair_logs_it_and_fails_at_the_end(tmp_path, caplog):
    manifest, good, bad = _zoo(tmp_path)
    out = tmp_path / "out"
    wf = _workflow("infer", "inference.json", dataset_dir=str(manifest), output_dir=str(out), method="average")
    wf.initialize()
    with pytest.raises(Exception) as err:
        wf.run()
    assert _outputs(out) == set(good)  # every valid pair fused, odd ones included
    assert (out / "dicom slice_fused.nii.gz").is_file() and (out / "16-bit_fused.png").is_file()
    assert Image.open(out / "odd size_fused.png").size == (53, 37)
    rgb = np.asarray(Image.open(out / "palette pet_fused_rgb.png")).astype(int)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 10  # the palette PET keeps its colour
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "skipping pair" in r.getMessage()]
    for name, pattern in bad.items():
        hits = [m for m in logged if m.startswith(f"skipping pair {name}: ")]
        assert len(hits) == 1 and re.search(pattern, hits[0]), (name, hits)
    summary = _chain(err.value)
    assert f"{len(bad)} of {len(bad) + len(good)} pairs failed ({len(good)} fused)" in summary
    assert all(f"\n  {name}: " in summary for name in bad)


def test_strict_inference_stops_at_the_first_bad_pair(tmp_path):
    manifest, good, bad = _zoo(tmp_path)
    out = tmp_path / "out"
    wf = _workflow("infer", "inference.json", dataset_dir=str(manifest), output_dir=str(out), method="average",
                   strict="true")
    wf.initialize()
    with pytest.raises(Exception) as err:
        wf.run()
    first_bad = next(iter(bad))
    assert f"pair {first_bad}: " in _chain(err.value) and re.search(bad[first_bad], _chain(err.value))
    assert _outputs(out) == set(good)  # the manifest lists the good pairs first; nothing after the first bad one


def test_missing_partner_is_skipped_in_inference_and_fatal_in_strict_mode(tmp_path, caplog):
    data = _tiny_dataset(tmp_path / "data", n=3)
    os.remove(data / "MRI_PET" / "PET" / "01.png")
    items = build_datalist(data, skip_bad=True, check=False)
    assert [it["name"] for it in items if it.get("fusion_error")] == ["PET-MRI_01"]
    wf = _workflow("infer", "inference.json", dataset_dir=str(data), output_dir=str(tmp_path / "out"),
                   method="average")
    wf.initialize()
    with pytest.raises(Exception) as err:
        wf.run()
    assert "1 of 6 pairs failed (5 fused)" in _chain(err.value)
    assert any(re.search(r"skipping pair PET-MRI_01: .*MRI/01\.png: no partner named '01\.\*'", r.getMessage())
               for r in caplog.records)
    strict = _workflow("infer", "inference.json", dataset_dir=str(data), output_dir=str(tmp_path / "o2"),
                       method="average", strict=True)
    with pytest.raises(Exception) as err:
        strict.initialize()
        strict.run()
    assert "MRI/01.png: no partner named '01.*'" in _chain(err.value)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    wf = _workflow("infer", "inference.json", dataset_dir=str(tmp_path / "empty"), output_dir=str(tmp_path / "o"),
                   method="average")
    with pytest.raises(Exception) as err:
        wf.initialize()
        wf.run()
    assert "empty: no image pairs found" in _chain(err.value)


def test_read_only_output_folder_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
    data = _tiny_dataset(tmp_path / "data", n=2)
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    try:
        try:  # root ignores permission bits: then simulate the refused write
            (out / "probe").touch()
            (out / "probe").unlink()
            real_mkstemp = fio.tempfile.mkstemp

            def refuse(*a, dir=None, **k):
                if Path(dir) == out:
                    raise PermissionError(errno.EACCES, "Permission denied", str(out))
                return real_mkstemp(*a, dir=dir, **k)

            monkeypatch.setattr(fio.tempfile, "mkstemp", refuse)
        except PermissionError:
            pass
        for config, extra in (("inference.json", {"method": "average"}), ("train.json", {"network_overrides": TINY_NET})):
            wf = _workflow(config.split(".")[0].replace("inference", "infer"), config, dataset_dir=str(data),
                           output_dir=str(out), **extra)
            with pytest.raises(Exception) as err:
                wf.initialize()
            assert f"{out}: output folder is not writable (Permission denied)" in _chain(err.value), config
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_cli_paths_with_spaces_and_non_ascii_bad_pair_exit_code_and_summary(tmp_path):
    data = _tiny_dataset(tmp_path / "my data" / "Ünïcødé 数据", n=3)
    for sub in ("MRI", "CT"):
        os.rename(data / "MRI_CT" / sub / "02.png", data / "MRI_CT" / sub / "scan é 02.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(data / "MRI_CT" / "CT" / "01.png")
    out = tmp_path / "out put" / "résultats"
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
        "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
        "--method", "average", "--dataset_dir", str(data), "--output_dir", str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode != 0
    assert re.search(r"skipping pair CT-MRI_01: .*CT/01\.png: image is constant", text)
    assert "1 of 6 pairs failed (5 fused)" in text
    assert (out / "CT-MRI_scan é 02_fused.png").is_file() and (out / "PET-MRI_02_fused_rgb.png").is_file()
    assert not (out / "CT-MRI_01_fused.png").exists()


@pytest.mark.parametrize("method", sorted(p.stem for p in (CONFIGS / "methods").glob("*.json")))
def test_networks_fuse_odd_sizes_and_crop_back(method):
    from scripts.methods import build, load_method_config

    small = {"dran": {"features": 8}, "mactfusion": {"features": [8, 8, 8], "num_heads": 2}, "msgfusion": {"features": 8}}
    net = build(load_method_config(BUNDLE_ROOT, method)["network"], small.get(method, {}), spatial_dims=2).eval()
    torch.manual_seed(0)
    for size in ((37, 53), (5, 3)):
        with torch.no_grad():
            y = net(torch.rand(1, 2, *size), mode="fuse")
        assert tuple(y.shape) == (1, 1, *size) and bool(torch.isfinite(y).all()), (method, size, tuple(y.shape))


@pytest.mark.parametrize("method", ["bsafusion", "dran", "mactfusion", "msgfusion"])
def test_fine_tuning_after_inference_mode_forward(method):
    """Inference first (torch.inference_mode, as the inference workflow runs), then training of the same module:
    nothing cached during the inference forward (e.g. weights converted to channels-last) may be an inference
    tensor that autograd refuses to save."""
    from scripts.methods import build, load_method_config

    small = {"dran": {"features": 8}, "mactfusion": {"features": [8, 8, 8], "num_heads": 2}, "msgfusion": {"features": 8}}
    torch.manual_seed(0)
    net = build(load_method_config(BUNDLE_ROOT, method)["network"], small.get(method, {}), spatial_dims=2).eval()
    x = torch.rand(2, 2, 32, 32)
    with torch.inference_mode():
        net(x, mode="fuse")
    net.train()
    out = net(x, mode="train") if method == "bsafusion" else net(x)
    (out["fused"] if isinstance(out, dict) else out).float().mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


# ------------------------------------------------------------------------------------------------------- safety
def _evil_pickle(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint whose unpickling would create ``marker`` (i.e. run code)."""
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "w": torch.ones(1)}, evil)
    return evil, marker


def test_every_checkpoint_and_fixture_load_is_weights_only():
    load, unpickle, unsafe_flag = "torch" + ".load(", "pickle" + ".load", "weights_only" + "=False"
    calls = []
    for folder in ("scripts", "tests"):
        for py in sorted((BUNDLE_ROOT / folder).rglob("*.py")):
            text = py.read_text(encoding="utf-8")
            for m in re.finditer(re.escape(load), text):
                depth, i = 1, m.end()
                while depth and i < len(text):
                    depth += {"(": 1, ")": -1}.get(text[i], 0)
                    i += 1
                calls.append((py.relative_to(BUNDLE_ROOT), text[m.start():i]))
            assert unpickle not in text.replace(load, ""), py  # no unpickling of files besides torch.load
            assert unsafe_flag not in text.replace(" ", ""), py
    unsafe = [(f, c) for f, c in calls if not re.search(r"weights_only\s*=\s*True", c)]
    assert calls and not unsafe, unsafe
    import inspect

    from monai.handlers import CheckpointLoader

    assert "weights_only=True" in inspect.getsource(CheckpointLoader.__call__)  # used for --ckpt_path


def test_pickled_code_is_refused_everywhere(tmp_path):
    evil, marker = _evil_pickle(tmp_path)
    from scripts.convert import main as convert_main

    with pytest.raises(SystemExit) as ex:  # the converter CLI
        convert_main(["--method", "dran", "--input", str(evil), "--output", str(tmp_path / "out.pt")])
    assert ex.value.code == 1
    data = _tiny_dataset(tmp_path / "data", n=2)
    wf = _workflow("infer", "inference.json", dataset_dir=str(data), output_dir=str(tmp_path / "o"),
                   ckpt_path=str(evil), network_overrides=TINY_NET)  # inference weights
    wf.initialize()
    with pytest.raises(Exception) as err:
        wf.run()
    assert "evil.pt: refusing to load a checkpoint that contains pickled Python objects" in _chain(err.value)
    npy = tmp_path / "evil.npy"  # an input image that is a pickle
    np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FusionDataError, match=r"evil\.npy: cannot read as an image"):
        LoadFusionPaird()({"source_a": str(npy), "source_b": str(npy)})
    assert not marker.exists()


def test_method_names_are_validated_against_the_registry(tmp_path):
    from scripts.methods import load_method_config

    for name in ("../methods/dran", "methods/../dran", "/etc/passwd", "dran.json", "DRAN "):
        with pytest.raises(ValueError, match="unknown method"):
            load_method_config(BUNDLE_ROOT, name)
    decoy = tmp_path / "decoy.json"  # a JSON outside the registry that would instantiate code if loaded
    decoy.write_text(json.dumps({"network": {"_target_": "os.mkdir", "path": str(tmp_path / "PWNED")}}))
    rel = os.path.relpath(decoy.with_suffix(""), CONFIGS / "methods")
    wf = _workflow("infer", "inference.json", method=rel, output_dir=str(tmp_path / "o"))
    with pytest.raises(Exception) as err:
        wf.initialize()
        wf.run()
    assert "unknown method" in _chain(err.value) and not (tmp_path / "PWNED").exists()


def test_dataset_paths_and_names_are_data_not_code(tmp_path):
    hostile = "x'+str(__import__('os').mkdir('PWNED'))+'$@%y"
    data = _tiny_dataset(tmp_path / hostile, n=2)
    out = tmp_path / "out"
    wf = _workflow("infer", "inference.json", dataset_dir=str(data), output_dir=str(out), method="average")
    wf.initialize()
    wf.run()
    assert len(_outputs(out)) == 4
    assert not (BUNDLE_ROOT / "PWNED").exists() and not Path("PWNED").exists()


def test_crafted_names_cannot_leave_the_output_folder(tmp_path):
    data = _tiny_dataset(tmp_path / "data", n=1)
    mri, ct = data / "MRI_CT" / "MRI" / "00.png", data / "MRI_CT" / "CT" / "00.png"
    names = ["../../escape", "/tmp/abs_evil", "..", "a\\..\\..\\b", "sub/../../x", ".hidden", "~", "\u202e\tz\n",
             "$__import__('os').mkdir('PWNED')", "é" * 200]
    (tmp_path / "pairs.csv").write_text(
        "source_a,source_b,name\n" + "".join(f'{mri},{ct},"{n}"\n' for n in names), encoding="utf-8"
    )
    out = tmp_path / "deep" / "out"
    before = {p for p in tmp_path.rglob("*")}
    wf = _workflow("infer", "inference.json", dataset_dir=str(tmp_path / "pairs.csv"), output_dir=str(out),
                   method="average")
    wf.initialize()
    wf.run()
    created = {p for p in tmp_path.rglob("*")} - before
    files = sorted(p for p in created if p.is_file())
    assert len(files) == 2 * len(names)
    assert all(p.parent == out and not p.name.startswith(".") and len(p.name.encode()) <= 255 for p in files)
    assert {p for p in created if p.is_dir()} <= {out, out.parent}
    assert not Path("/tmp/abs_evil_fused.png").exists() and not Path("PWNED").exists()
    collide = tmp_path / "collide.csv"
    collide.write_text(f"source_a,source_b,name\n{mri},{ct},a/b\n{mri},{ct},a_b\n")
    with pytest.raises(FusionDataError, match=r"'a/b' and 'a_b' give the same output file name 'a_b'"):
        build_datalist(collide)


# -------------------------------------------------------------------------------------------------- memory
def test_batch_inference_memory_does_not_grow_with_the_number_of_pairs(tmp_path):
    """200 pairs of 128x128 through configs/inference.json in a fresh process: RSS flat after warm-up. The control
    run keeps each pair's batch alive (a leak) and must exceed the same tolerance, so the check can fail. (In this
    pytest process the heap left by earlier tests would hide a leak; hence the subprocess.)"""
    data = _tiny_dataset(tmp_path / "data", n=4, size=128)
    code = (
        "import json, sys; from scripts.benchmark_memory import run; kept = []; "
        f"clean = run(200, 25, dataset_dir={str(data)!r}, output_dir={str(tmp_path / 'o1')!r}); "
        f"leaky = run(200, 25, dataset_dir={str(data)!r}, output_dir={str(tmp_path / 'o2')!r}, "
        "extra_handlers=[lambda e: kept.append([e.state.batch, e.state.output])]); "
        "print('RESULT' + json.dumps([clean, leaky]))"
    )
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    clean, leaky = json.loads(res.stdout.split("RESULT", 1)[1])
    assert clean["written"] == leaky["written"] == 200
    tolerance_mb = 12.0
    rss = [s["rss_mb"] for s in clean["samples"][2:]]  # from 50 pairs on
    assert max(rss) - rss[0] < tolerance_mb, clean["samples"]
    rss = [s["rss_mb"] for s in leaky["samples"][2:]]
    assert max(rss) - rss[0] > tolerance_mb, leaky["samples"]
