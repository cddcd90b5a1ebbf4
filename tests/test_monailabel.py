"""MONAI Label integration: a real MONAI Label server (monaibundle sample app) serving and training this bundle.

MONAI Label pins numpy<2, so it lives in its own virtual environment, never in the bundle's; this test starts the
server there and talks to it over HTTP on 127.0.0.1. Opt-in (README "MONAI Label" has the set-up commands):

    FUSION_TEST_MONAILABEL=1 FUSION_MONAILABEL_VENV=/tmp/mlvenv python -m pytest -q tests/test_monailabel.py

What it checks, with one server for the module (every method deployed by ``scripts/monailabel_app.py`` as model
``fusion_<method>``, freshly initialised weights, seed 0; local folders, no network: ``--conf zoo_source ngc``):

- ``/info/`` lists every method as a 2D model with the label ``fused``, and a trainer for each trainable one;
- ``POST /infer/fusion_<method>?output=image`` with one real AANLIB CT-MRI pair (a 2-channel NIfTI, as MONAI Label
  sends a single image) returns, for every method, a float fused image on the input's voxel grid ((rows, cols, 1),
  same affine) equal to the bundle's own fusion of that file (``configs/inference.json`` of the model folder, same
  weights), not a label map;
- training: three real AANLIB pairs and placeholder ``final`` labels uploaded through ``/datastore``,
  ``POST /train/fusion_<method>`` (1 epoch) for every trainable method finishes, replaces ``models/model.pt`` with
  different weights that load strictly into the network with ``torch.load(weights_only=True)``, and the server's
  next ``/infer`` answer (a second request to the same model) uses them.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLE_ROOT
from scripts import methods

pytestmark = pytest.mark.skipif(
    os.environ.get("FUSION_TEST_MONAILABEL", "").lower() not in ("1", "true", "yes"),
    reason="MONAI Label server test: set FUSION_TEST_MONAILABEL=1 and FUSION_MONAILABEL_VENV (README 'MONAI Label')",
)

METHODS = methods.available_methods(BUNDLE_ROOT)
TRAINABLE = [m for m in METHODS if methods.load_method_config(BUNDLE_ROOT, m)["trainable"]]
TRAIN_PAIRS = ["CT-MRI/001", "PET-MRI/001", "SPECT-MRI/001"]
TIMINGS: dict = {}


def _venv_python() -> Path:
    venv = Path(os.environ.get("FUSION_MONAILABEL_VENV", "/tmp/mlvenv"))
    py = venv / "bin" / "python"
    if not py.is_file():
        pytest.fail(f"{py}: no MONAI Label virtual environment there (README 'MONAI Label' creates it)")
    return py


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# a non-trivial geometry (spacing, origin) that the answer must keep
AFFINE = np.array([[0.9, 0, 0, -115.0], [0, 0.9, 0, -110.0], [0, 0, 3.0, 12.0], [0, 0, 0, 1]])


def _pair_nifti(aanlib_dir: Path, pair: str, path: Path, source: str = "aligned") -> Path:
    """One AANLIB pair as MONAI Label's single ``image``: a (rows, cols, 1, 2) NIfTI, MRI then CT/PET/SPECT."""
    import nibabel as nib
    from PIL import Image

    folder = aanlib_dir / pair
    other = next(p for p in folder.glob(f"*_{source}.png"))
    mri = np.asarray(Image.open(folder / "mri.png").convert("L"), np.float32)
    oth = np.asarray(Image.open(other).convert("L"), np.float32)
    nib.save(nib.Nifti1Image(np.stack([mri, oth], -1)[:, :, None, :], AFFINE), str(path))
    return path


def _log_tail(server) -> str:
    return server["log"].read_text()[-4000:]


def _reference_fusion(model_dir: Path, nifti: Path) -> np.ndarray:
    """What the bundle itself computes for that file with the model folder's config and weights."""
    from monai.bundle import ConfigParser
    from monai.data import decollate_batch

    parser = ConfigParser()
    parser.read_config(str(model_dir / "configs" / "inference.json"))
    parser["bundle_root"] = str(model_dir)
    parser["device"] = "$torch.device('cpu')"
    pre = parser.get_parsed_content("preprocessing")
    net = parser.get_parsed_content("network_def")
    inferer = parser.get_parsed_content("inferer")
    post = parser.get_parsed_content("postprocessing")
    state = torch.load(model_dir / "models" / "model.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state["model"] if isinstance(state.get("model"), dict) else state)
    net.eval()
    d = pre({"image": str(nifti)})
    with torch.no_grad():
        out = inferer(d["image"].as_tensor()[None], net)
    d["pred"] = decollate_batch(out)[0] if isinstance(out, dict) else out[0]
    return torch.as_tensor(post(d)["pred"]).squeeze().numpy()


def _infer(server, model: str, nifti: Path) -> tuple[np.ndarray, float, np.ndarray]:
    import nibabel as nib
    import requests

    t0 = time.time()
    with open(nifti, "rb") as f:
        r = requests.post(f"{server['url']}/infer/{model}", params={"output": "image"},
                          files={"file": (nifti.name, f, "application/gzip")},
                          data={"params": json.dumps({"device": "cpu"})}, timeout=600)
    assert r.status_code == 200, f"{r.status_code} {r.text[-2000:]}\n{_log_tail(server)}"
    seconds = time.time() - t0
    out = server["root"] / f"answer_{model}.nii.gz"
    out.write_bytes(r.content)
    answer = nib.load(str(out))
    return np.asarray(answer.dataobj), seconds, answer.affine


@pytest.fixture(scope="module")
def server(tmp_path_factory, aanlib_dir):
    """A MONAI Label server with every method of the bundle, for the whole module."""
    import requests

    from scripts.monailabel_app import deploy

    py = _venv_python()
    root = tmp_path_factory.mktemp("monailabel")
    app_src = Path(subprocess.run(
        [str(py), "-c", "import os, sys; print(os.path.join(sys.prefix, 'monailabel', 'sample-apps', 'monaibundle'))"],
        capture_output=True, text=True, check=True).stdout.strip())
    app = Path(shutil.copytree(app_src, root / "apps" / "monaibundle"))
    models = deploy(app, METHODS, fresh=True, seed=0)
    studies = root / "studies"
    studies.mkdir()

    port = _free_port()
    log_path = root / "server.log"
    log = open(log_path, "w")
    # MONAI_LABEL_RELOAD_APP_LIB=false: keep the bundle's modules loaded between requests (README "MONAI Label")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": "", "MONAI_LABEL_RELOAD_APP_LIB": "false"}
    cmd = [str(py), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port), "--conf", "models", ",".join(models),
           "--conf", "zoo_source", "ngc", "--conf", "sam2", "false"]  # fmt: skip
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        info = None
        while time.time() - t0 < 600:
            if proc.poll() is not None:
                pytest.fail("server exited:\n" + log_path.read_text()[-4000:])
            try:
                r = requests.get(f"{url}/info/", timeout=10)
                if r.ok:
                    info = r.json()
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        assert info is not None, "server did not answer in 600 s:\n" + log_path.read_text()[-4000:]
        TIMINGS["server start"] = time.time() - t0
        yield {"url": url, "app": app, "root": root, "studies": studies, "info": info, "log": log_path}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        print("\nMONAI Label timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def ct_mri_pair(server, aanlib_dir) -> Path:
    return _pair_nifti(aanlib_dir, "CT-MRI/001", server["root"] / "ct_mri_001.nii.gz")


def test_info_lists_every_method(server):
    info = server["info"]
    for m in METHODS:
        model = info["models"].get(f"fusion_{m}")
        assert model is not None, (m, sorted(info["models"]))
        assert model["dimension"] == 2 and model["labels"] == {"fused": 0}, model
    assert sorted(info["trainers"]) == sorted(f"fusion_{m}" for m in TRAINABLE)


@pytest.mark.parametrize("method", METHODS)
def test_infer_every_method(server, ct_mri_pair, method):
    model = f"fusion_{method}"
    fused, seconds, affine = _infer(server, model, ct_mri_pair)
    TIMINGS[f"infer {method}"] = seconds
    assert np.issubdtype(fused.dtype, np.floating), fused.dtype  # an image, not a label map
    assert fused.shape == (256, 256, 1), fused.shape  # the input's voxel grid (rows, cols, 1), same affine
    np.testing.assert_allclose(affine, AFFINE, atol=1e-4)
    assert len(np.unique(fused)) > 50 and 0.0 <= fused.min() and fused.max() <= 1.0
    ref = _reference_fusion(server["app"] / "model" / model, ct_mri_pair)
    np.testing.assert_allclose(fused[:, :, 0], ref, atol=1e-4)


@pytest.fixture(scope="module")
def datastore(server, aanlib_dir):
    """Three real pairs (CT, PET, SPECT with MRI) in the studies datastore, each with a placeholder final label."""
    import nibabel as nib
    import requests

    url = server["url"]
    placeholder = server["root"] / "placeholder.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.eye(4)), str(placeholder))
    for pair in TRAIN_PAIRS:
        image_id = pair.replace("/", "_").lower()
        nifti = _pair_nifti(aanlib_dir, pair, server["root"] / f"{image_id}.nii.gz")
        with open(nifti, "rb") as f:
            r = requests.put(f"{url}/datastore/image", params={"image": image_id},
                             files={"file": (nifti.name, f, "application/gzip")}, timeout=60)
        assert r.ok, r.text
        with open(placeholder, "rb") as f:
            r = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": "final"},
                             files={"label": (f"{image_id}.nii.gz", f, "application/gzip")}, timeout=60)
        assert r.ok, r.text
    datalist = requests.get(f"{url}/datastore/", params={"output": "train"}, timeout=60).json()
    assert len(datalist) == len(TRAIN_PAIRS), datalist
    return datalist


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", TRAINABLE)
def test_train_every_trainable_method(server, datastore, ct_mri_pair, method):
    import requests

    model = f"fusion_{method}"
    model_dir = server["app"] / "model" / model
    model_pt = model_dir / "models" / "model.pt"
    before = torch.load(model_pt, map_location="cpu", weights_only=True)
    sha_before = _sha(model_pt)

    t0 = time.time()
    r = requests.post(f"{server['url']}/train/{model}", json={"max_epochs": 1, "device": "cpu"}, timeout=60)
    assert r.ok, r.text
    task_id = r.json()["id"]
    task = None
    while time.time() - t0 < 900:
        task = requests.get(f"{server['url']}/train/", params={"all": True}, timeout=60).json()
        task = next(t for t in task if t["id"] == task_id)
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(3)
    TIMINGS[f"train {method}"] = time.time() - t0
    assert task is not None and task["status"] == "DONE", (task, _log_tail(server))

    assert _sha(model_pt) != sha_before, "models/model.pt was not replaced"
    after = torch.load(model_pt, map_location="cpu", weights_only=True)
    after = after["model"] if isinstance(after.get("model"), dict) else after
    net = methods.build(methods.load_method_config(BUNDLE_ROOT, method)["network"], spatial_dims=2)
    net.load_state_dict(after, strict=True)
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    assert sorted(p.name for p in (model_dir / "models").glob("*.pt")) == ["model.pt"]

    # the server serves the new weights (it reloads model.pt when the file changes): a second request to this model
    fused, _, _ = _infer(server, model, ct_mri_pair)
    np.testing.assert_allclose(fused[:, :, 0], _reference_fusion(model_dir, ct_mri_pair), atol=1e-4)
