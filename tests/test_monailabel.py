"""MONAI Label integration: a real MONAI Label server (monaibundle sample app) serving this bundle's fusion.

MONAI Label pins numpy<2, so it lives in its own virtual environment, never in the bundle's; this test starts the
server there and talks to it over HTTP on 127.0.0.1. Opt-in (README "MONAI Label" has the set-up commands):

    FUSION_TEST_MONAILABEL=1 FUSION_MONAILABEL_VENV=/tmp/mlvenv python -m pytest -q tests/test_monailabel.py

What it checks: the bundle loads from a local folder with no network (``--conf zoo_source ngc``), ``/info/`` lists it,
and ``POST /infer/<model>?output=image`` with one real AANLIB CT-MRI pair (a 2-channel NIfTI, as MONAI Label sends a
single image) returns a float fused image equal to the bundle's own fusion of that file with the same weights, not a
label map.
"""

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

MODEL = "multimodal_fusion"
pytestmark = pytest.mark.skipif(
    os.environ.get("FUSION_TEST_MONAILABEL", "").lower() not in ("1", "true", "yes"),
    reason="MONAI Label server test: set FUSION_TEST_MONAILABEL=1 and FUSION_MONAILABEL_VENV (README 'MONAI Label')",
)


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


def _pair_nifti(aanlib_dir: Path, path: Path) -> Path:
    """One AANLIB CT-MRI pair as MONAI Label's single ``image``: a (rows, cols, 1, 2) NIfTI, MRI then CT."""
    import nibabel as nib
    from PIL import Image

    mri = np.asarray(Image.open(aanlib_dir / "CT-MRI/001/mri.png").convert("L"), np.float32)
    ct = np.asarray(Image.open(aanlib_dir / "CT-MRI/001/ct_aligned.png").convert("L"), np.float32)
    nib.save(nib.Nifti1Image(np.stack([mri, ct], -1)[:, :, None, :], np.eye(4)), str(path))
    return path


def _deploy_bundle(model_dir: Path, weights: dict) -> None:
    """The bundle as MONAI Label expects it in ``<app>/model/<name>``: configs/, scripts/ (links to this checkout,
    or to ``$FUSION_MONAILABEL_BUNDLE``) and models/model.pt. inference.json resolves its default checkpoint
    (models/<method>.pt) while building the network, so the same weights are linked as models/dran.pt too."""
    bundle = Path(os.environ.get("FUSION_MONAILABEL_BUNDLE", BUNDLE_ROOT))
    (model_dir / "models").mkdir(parents=True)
    for name in ("configs", "scripts"):
        (model_dir / name).symlink_to(bundle / name, target_is_directory=True)
    torch.save(weights, model_dir / "models" / "model.pt")
    (model_dir / "models" / "dran.pt").symlink_to("model.pt")


def _reference_fusion(nifti: Path, weights: dict) -> np.ndarray:
    """What the bundle's own 2D inference computes for that file (preprocessing of configs/inference.json)."""
    from monai.transforms import Compose, ConcatItemsd, ScaleIntensityd

    from scripts.networks import DRAN
    from scripts.transforms import LoadFusionPaird

    keys = ["source_a", "source_b"]
    pre = Compose([LoadFusionPaird(keys, spatial_dims=2), ScaleIntensityd(keys), ConcatItemsd(keys, "image")])
    x = pre({"image": str(nifti)})["image"].as_tensor()[None]
    net = DRAN()
    net.load_state_dict(weights)
    net.eval()
    with torch.no_grad():
        return net(x).clamp(0, 1)[0, 0].numpy()


def test_monailabel_server_serves_fused_image(aanlib_dir, tmp_path):
    import nibabel as nib
    import requests

    py = _venv_python()
    app_src = Path(subprocess.run(
        [str(py), "-c", "import os, sys; print(os.path.join(sys.prefix, 'monailabel', 'sample-apps', 'monaibundle'))"],
        capture_output=True, text=True, check=True).stdout.strip())
    app = Path(shutil.copytree(app_src, tmp_path / "apps" / "monaibundle"))
    from scripts.networks import DRAN

    torch.manual_seed(0)
    weights = DRAN().state_dict()
    _deploy_bundle(app / "model" / MODEL, weights)
    studies = tmp_path / "studies"
    studies.mkdir()
    pair = _pair_nifti(aanlib_dir, tmp_path / "ct_mri_001.nii.gz")

    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": ""}
    cmd = [str(py), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
           "--host", "127.0.0.1", "--port", str(port), "--conf", "models", MODEL, "--conf", "zoo_source", "ngc",
           "--conf", "skip_trainers", "true", "--conf", "sam2", "false"]  # fmt: skip
    t0 = time.time()
    server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        info = None
        while time.time() - t0 < 600:
            if server.poll() is not None:
                pytest.fail("server exited:\n" + (tmp_path / "server.log").read_text()[-4000:])
            try:
                r = requests.get(f"{url}/info/", timeout=10)
                if r.ok:
                    info = r.json()
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        assert info is not None, "server did not answer in 600 s:\n" + (tmp_path / "server.log").read_text()[-4000:]
        startup = time.time() - t0
        assert MODEL in info["models"], info["models"].keys()
        assert info["models"][MODEL]["dimension"] == 2 and info["models"][MODEL]["labels"] == {"fused": 0}

        t1 = time.time()
        with open(pair, "rb") as f:
            r = requests.post(f"{url}/infer/{MODEL}", params={"output": "image"},
                              files={"file": (pair.name, f, "application/gzip")},
                              data={"params": json.dumps({"device": "cpu"})}, timeout=600)
        assert r.status_code == 200, r.text[-3000:]
        infer = time.time() - t1
        out = tmp_path / "fused.nii.gz"
        out.write_bytes(r.content)
        fused = np.asarray(nib.load(str(out)).dataobj)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    print(f"MONAI Label: server up in {startup:.0f} s, one 256x256 fusion round trip {infer:.1f} s, "
          f"result {fused.dtype} {fused.shape}")

    assert np.issubdtype(fused.dtype, np.floating), fused.dtype  # an image, not a label map
    fused = fused.squeeze()
    assert fused.shape == (256, 256), fused.shape
    ref = _reference_fusion(pair, weights)
    assert len(np.unique(fused)) > 50 and 0.0 <= fused.min() and fused.max() <= 1.0
    np.testing.assert_allclose(fused, ref, atol=1e-4)
