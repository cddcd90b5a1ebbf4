"""Export: traced TorchScript (through monai.bundle ckpt_export) and ONNX reproduce the eager network on a real pair.

Every method of ``configs/methods`` is exported with seeded random weights (saved as a checkpoint, as a trained
one would be) at the size of the first AANLIB pair (256x256) and run on that pair. The ONNX part needs the
``onnx``, ``onnxscript`` and ``onnxruntime`` packages (not in requirements.txt) and is skipped without them.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from scripts import export
from scripts.methods import available_methods, load_method_config
from scripts.networks.fusion_rules import sfnn

METHODS = available_methods(export.ROOT)
# |export - eager| on the real pair. ONNX: MACTFusion's graph computes the 31x31 grouped conv directly (eager: by
# FFT), BSAFusion's warps run onnxruntime's GridSample: both within the float32 noise of their parity fixtures
TS_ATOL = 1e-5
ONNX_ATOL = {"mactfusion": 5e-4, "bsafusion": 5e-4}
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair(aanlib_dir):
    x = export.load_pair(aanlib_dir, 0)
    assert x.shape == (1, 2, 256, 256) and 0 <= x.min() and x.max() <= 1
    return x


def _network_and_checkpoint(method, tmp_path):
    torch.manual_seed(0)
    net = export.build_network(method, use_default_checkpoint=False)
    ckpt = None
    if load_method_config(export.ROOT, method)["trainable"]:
        ckpt = tmp_path / f"{method}.pt"
        torch.save(net.state_dict(), ckpt)
    return net, ckpt


@pytest.mark.parametrize("method", METHODS)
def test_torchscript_matches_eager_on_real_pair(method, pair, tmp_path):
    net, ckpt = _network_and_checkpoint(method, tmp_path)
    path = export.export_torchscript(method, tmp_path / f"{method}.ts", ckpt, tuple(pair.shape))
    extra = {"metadata.json": "", "inference.json": ""}
    ts = torch.jit.load(str(path), _extra_files=extra)
    assert b"network_data_format" in extra["metadata.json"] and extra["inference.json"]  # bundle info embedded
    with torch.inference_mode():
        ref = net(pair)
        got = ts(pair)
    assert got.shape == ref.shape == (1, 1, 256, 256)
    torch.testing.assert_close(got, ref, atol=TS_ATOL, rtol=0)


@pytest.mark.skipif(not HAS_ONNX, reason="onnx / onnxscript / onnxruntime not installed")
@pytest.mark.parametrize("method", METHODS)
def test_onnx_matches_eager_on_real_pair(method, pair, tmp_path):
    net, ckpt = _network_and_checkpoint(method, tmp_path)
    files = export.export_onnx(method, tmp_path / f"{method}.onnx", ckpt, tuple(pair.shape), net=net)
    assert all(f.is_file() for f in files)
    with torch.inference_mode():
        ref = net(pair).numpy()
    got = export.OnnxFusion(files[0])(pair.numpy())
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= ONNX_ATOL.get(method, TS_ATOL)


def test_numpy_sfnn_matches_torch_rule():
    torch.manual_seed(0)
    fa, fb = torch.randn(2, 6, 12, 10), 1.5 * torch.randn(2, 6, 12, 10)
    ref = sfnn(fa, fb)
    got = export.sfnn_numpy(fa.numpy(), fb.numpy())
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-6, rtol=0)


def test_export_modes_keep_values():
    """The ONNX-friendly formulations (direct large-kernel conv, real-DFT Fourier unit) equal the eager ones."""
    from scripts.networks.mactfusion import LargeKernelGroupedConv
    from scripts.networks.msgfusion import FourierUnit

    torch.manual_seed(0)
    for dims, shape in ((2, (1, 8, 16, 20)), (2, (2, 4, 9, 7)), (3, (1, 4, 6, 5, 8))):
        x = torch.rand(*shape) + 0.5
        for module in (LargeKernelGroupedConv(dims, shape[1], shape[1] // 4, 7), FourierUnit(dims, shape[1])):
            with torch.no_grad():
                ref = module(x)
                module.export_mode = True
                got = module(x)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_ckpt_export_cli(tmp_path):
    """The documented ``python -m monai.bundle ckpt_export`` line works (a baseline: no weights to train)."""
    ckpt = tmp_path / "empty.pt"
    torch.save({}, ckpt)
    out = tmp_path / "max.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(out),
           "--ckpt_file", str(ckpt), "--meta_file", "configs/metadata.json", "--config_file",
           "configs/inference.json", "--method", "max", "--use_trace", "True", "--input_shape", "[1, 2, 32, 32]"]
    env = {**os.environ, "PYTHONPATH": str(export.ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=export.ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    x = torch.rand(2, 2, 32, 32)
    torch.testing.assert_close(torch.jit.load(str(out))(x), torch.maximum(x[:, :1], x[:, 1:]))
