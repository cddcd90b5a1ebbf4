"""The GPU-only paths of the workflows, exercised on CPU (CI has no GPU).

- Mixed precision (``amp``, the workflows' default on CUDA) with CPU bfloat16 / float16 autocast, which casts the
  same op families (convolutions, matrix products, attention) to the low-precision type: catches ops that mix
  dtypes (in-place products are not autocast) and losses or statistics that break in low precision. Before these
  tests, DRAN's inference failed under autocast, MACTFusion's loss was NaN and BSAFusion's float16 gradients were
  NaN (statistics over whole maps in float16: now computed in float32).
- Device placement, with every network and loss on PyTorch's ``meta`` device: a tensor created on the CPU inside a
  forward pass or a loss (it would be on the wrong device on a GPU) fails there too.
"""

import pytest
import torch

from scripts.engine import FusionInferer, float32_outputs
from scripts.losses import MACTFusionLoss
from scripts.methods import build, load_method_config
from scripts.volumes import VolumeInferer

SIZES = {"dran": 32, "mactfusion": 32, "msgfusion": 32, "bsafusion": 64}  # BSAFusion: 16-px patches


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _method(name):
    cfg = load_method_config(".", name)
    torch.manual_seed(0)
    return build(cfg["network"]), build(cfg["loss"])


def _batch(name):
    g = torch.Generator().manual_seed(1)
    s = SIZES[name]
    x = torch.rand(2, 2, s, s, generator=g)
    # BSAFusion's label: [fixed, aligned moving]; the others': the two sources
    return x, x.clone()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(SIZES))
def test_training_step_under_autocast(name, dtype):
    net, loss_fn = _method(name)
    x, label = _batch(name)
    net.train()
    ref = float(loss_fn(net(x, mode="train"), label))
    with torch.autocast("cpu", dtype=dtype):
        loss = loss_fn(net(x, mode="train"), label)
    assert loss.dtype == torch.float32  # losses run in float32 whatever the context
    assert torch.isfinite(loss)
    assert float(loss) == pytest.approx(ref, rel=0.05)  # low-precision network, float32 loss: close to float32
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", list(SIZES))
def test_inference_under_autocast_returns_float32(name):
    net, _ = _method(name)
    net.eval()
    x, _ = _batch(name)
    inferer = FusionInferer()
    with torch.inference_mode():
        ref = float32_outputs(inferer(x, net))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = inferer(x, net)
    ref = ref["fused"] if isinstance(ref, dict) else ref
    out = out["fused"] if isinstance(out, dict) else out
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    # bfloat16 keeps 8 bits of mantissa: the fused image stays within a few grey levels of the float32 one
    assert (out - ref).abs().mean() < 0.02 * max(float(ref.abs().mean()), 1.0)


def test_float32_outputs_casts_nested_outputs_only_when_low_precision():
    h = torch.ones(2, dtype=torch.float16)
    i = torch.ones(2, dtype=torch.int64)
    f = torch.ones(2)
    out = float32_outputs({"a": h, "b": [h, i], "c": (f,), "d": "text"})
    assert out["a"].dtype == torch.float32 and out["b"][0].dtype == torch.float32
    assert out["b"][1].dtype == torch.int64 and out["c"][0] is f and out["d"] == "text"


def test_sliding_window_stitches_in_float32_under_autocast():
    net, _ = _method("dran")
    net.eval()
    x, _ = _batch("dran")
    inferer = VolumeInferer(roi_size=[16, 16], sw_batch_size=2, overlap=0.25)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = inferer(x, net)
    assert inferer.last_plan["kind"] == "windows"
    assert out.dtype == torch.float32 and out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()
    with torch.inference_mode():
        ref = VolumeInferer(roi_size=[16, 16], sw_batch_size=2, overlap=0.25)(x, net)
    assert (out - ref).abs().mean() < 0.02 * max(float(ref.abs().mean()), 1.0)


def test_loss_ignores_an_enclosing_autocast():
    """The trainer calls the loss inside autocast: the result equals the float32 loss of the same prediction."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, 1, 32, 32, generator=g), torch.rand(2, 2, 32, 32, generator=g)
    loss = MACTFusionLoss()
    expected = loss(pred, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss(pred.bfloat16(), target)
    assert torch.isfinite(inside)
    torch.testing.assert_close(inside, loss(pred.bfloat16().float(), target))
    assert float(inside) == pytest.approx(float(expected), rel=0.01)


@pytest.mark.parametrize("name", list(SIZES))
def test_no_cpu_tensor_inside_networks_and_losses(name):
    net, loss_fn = _method(name)
    net.to("meta")
    loss_fn.to("meta")
    for m in net.modules():  # MsgFusion's debiased BatchNorm reads its batch count once (a meta tensor has none)
        if hasattr(m, "_base_momentum") or type(m).__name__.startswith("_BatchNorm"):
            m._seen = 0
    x = torch.empty(2, 2, SIZES[name], SIZES[name], device="meta")
    net.train()
    out = net(x, mode="train")
    loss = loss_fn(out, x)
    assert loss.device.type == "meta"
    loss.backward()
    net.eval()
    with torch.no_grad():
        fused = net(x)
    fused = fused["fused"] if isinstance(fused, dict) else fused
    assert fused.device.type == "meta" and fused.shape == (2, 1, SIZES[name], SIZES[name])
