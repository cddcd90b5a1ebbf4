"""Unit tests for MACTFusion: network blocks, padding, loss, converter, complexity and a tiny train+infer workflow.

Parity with the official code (released CT-MRI weights) is in tests/test_parity.py.
"""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_workflows import CONFIGS, _tiny_dataset, _workflow

from scripts import convert
from scripts.losses import MACTFusionLoss, ms_ssim
from scripts.networks import MACTFusion
from scripts.networks.blocks import SobelGradient, set_fast
from scripts.networks.mactfusion import (
    LargeKernelGroupedConv,
    RelativePositionAttention,
    SpatialAdaptationFusion,
    partition_tokens,
    relative_position_index,
    reverse_tokens,
)

TINY = {"features": [8, 8, 8], "large_kernel_size": 7}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread (on a shared 2-core machine, 2 OpenMP threads make every small op wait for a
    time slice, ~10 ms each); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(**kw):
    torch.manual_seed(0)
    return MACTFusion(**{**TINY, **kw}).eval()


def _randomise_norms(net):
    """Non-trivial BN statistics / SAFM convs so that eval-mode tests exercise every path."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm3d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(1 + 0.2 * torch.rand(m.num_features, generator=g))
        if isinstance(m, SpatialAdaptationFusion):
            for conv in (m.gamma, m.beta):
                conv.weight.data.normal_(0, 0.01, generator=g)
    return net


# ---------------------------------------------------------------- network


def test_parameter_count_matches_official_used():
    net = MACTFusion()
    n = sum(p.numel() for p in net.parameters())
    assert n == 571_035  # official: 623,355 registered, 571,035 used in the forward pass
    assert all(p.requires_grad for p in net.parameters())  # trainable Sobel included
    # buffers: BN statistics only (the relative position index is recomputed, not saved)
    assert not any("relative_position_index" in k for k in net.state_dict())


def test_every_parameter_is_used():
    net = _net().train()
    x = torch.rand(2, 2, 16, 16)
    MACTFusionLoss()(net(x, mode="train"), x).backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert not unused, unused


def test_shapes_modes_and_errors():
    net = _net()
    x = torch.rand(2, 2, 16, 24)
    with torch.no_grad():
        assert net(x).shape == (2, 1, 16, 24)
        assert net(x, mode="train").shape == (2, 1, 16, 24)
        out, inter = net.fuse(x, return_intermediates=True)
    assert set(inter) == {"feat_a", "feat_b", "cross_a", "cross_b"}
    assert all(v.shape == (2, 8, 16, 24) for v in inter.values())
    with pytest.raises(ValueError, match="2 channels"):
        net(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="spatial dims"):
        net(torch.rand(2, 16, 16))
    with pytest.raises(ValueError, match="mode"):
        net(x, mode="bogus")
    with pytest.raises(ValueError, match="spatial_dims"):
        MACTFusion(spatial_dims=1)
    with pytest.raises(ValueError, match="num_heads"):
        MACTFusion(features=(8, 8, 10))


def test_odd_sizes_are_padded_and_cropped_back():
    net = _randomise_norms(_net())
    x = torch.rand(1, 2, 13, 21)
    with torch.no_grad():
        out, inter = net.fuse(x, return_intermediates=True)
        # 13 -> 16 and 21 -> 24: reflect pad (1, 2) per axis, network, crop back
        ref, ref_inter = net.fuse(F.pad(x, (1, 2, 1, 2), mode="reflect"), return_intermediates=True)
    assert out.shape == (1, 1, 13, 21) and inter["cross_b"].shape == (1, 8, 13, 21)
    torch.testing.assert_close(out, ref[..., 1:14, 1:22])
    torch.testing.assert_close(inter["feat_a"], ref_inter["feat_a"][..., 1:14, 1:22])
    with torch.no_grad():  # smaller than the pad: replicate padding
        tiny = net(torch.rand(2, 2, 3, 5))
    assert tiny.shape == (2, 1, 3, 5) and torch.isfinite(tiny).all()


def test_batched_equals_per_sample():
    net = _randomise_norms(_net())
    x = torch.rand(3, 2, 16, 16)
    x[1] *= 0.3
    with torch.no_grad():
        both = net(x)
        singles = torch.cat([net(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(both, singles, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_fast_path_matches_reference(dims):
    """The default (fast) forward reorders memory, not arithmetic: eval outputs and intermediates (without and
    with autograd) and training gradients equal the reference path's within float rounding."""
    kw = {"spatial_dims": dims, "window_size": 4} if dims == 3 else {}
    fast = _randomise_norms(_net(**kw))
    ref = set_fast(copy.deepcopy(fast), False)
    x = torch.rand(2, 2, *((16, 16, 16) if dims == 3 else (16, 24)))
    with torch.no_grad():
        out_r, inter_r = ref.fuse(x, return_intermediates=True)
        out_f, inter_f = fast.fuse(x, return_intermediates=True)
    torch.testing.assert_close(out_f, out_r, atol=1e-4, rtol=1e-4)
    for k in inter_r:
        torch.testing.assert_close(inter_f[k], inter_r[k], atol=5e-4, rtol=1e-3)
    torch.testing.assert_close(fast(x.requires_grad_()), out_r, atol=1e-4, rtol=1e-4)
    x = x.detach()
    for net in (fast.train(), ref.train()):
        MACTFusionLoss()(net(x, mode="train"), x).backward()
    for (name, p_f), p_r in zip(fast.named_parameters(), ref.parameters()):  # float rounding: ~1e-5 of the norm
        assert (p_f.grad - p_r.grad).norm() <= 1e-4 * p_r.grad.norm(), name


def test_window_and_grid_partitions():
    x = torch.arange(2 * 3 * 16 * 24, dtype=torch.float32).view(2, 3, 16, 24)
    w = partition_tokens(x, (8, 8), "window")
    g = partition_tokens(x, (8, 8), "grid")
    assert w.shape == g.shape == (2 * 2 * 3, 64, 3)
    # window group 0 = top-left 8x8 tile, row-major; grid group 0 = pixels (2 * i, 3 * j) (stride H/P, W/P)
    torch.testing.assert_close(w[0, :, 0], x[0, 0, :8, :8].reshape(-1))
    torch.testing.assert_close(g[0, :, 0], x[0, 0, ::2, ::3].reshape(-1))
    torch.testing.assert_close(g[1, :, 1], x[0, 1, ::2, 1::3].reshape(-1))  # second group: offset (0, 1)
    for kind, t in (("window", w), ("grid", g)):
        assert torch.equal(reverse_tokens(t, (16, 24), (8, 8), kind), x)
    x3 = torch.randn(1, 2, 8, 8, 12)
    for kind in ("window", "grid"):
        t = partition_tokens(x3, (4, 4, 4), kind)
        assert t.shape == (2 * 2 * 3, 64, 2)
        assert torch.equal(reverse_tokens(t, (8, 8, 12), (4, 4, 4), kind), x3)


def test_relative_position_index_is_swin():
    idx = relative_position_index((8, 8))
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    i, j = i.flatten(), j.flatten()
    ref = (i[:, None] - i[None] + 7) * 15 + (j[:, None] - j[None] + 7)
    assert torch.equal(idx, ref) and idx.max() == 224
    assert relative_position_index((2, 3, 4)).max() == 3 * 5 * 7 - 1


@pytest.mark.parametrize("cross", [False, True])
def test_attention_matches_naive(cross):
    torch.manual_seed(0)
    attn = RelativePositionAttention(48, 4, (8, 8), scale=4**-0.5, cross=cross)
    x, ctx = torch.randn(5, 64, 48), torch.randn(5, 64, 48)
    if cross:
        q, (k, v) = attn.q(x), attn.kv(ctx).chunk(2, -1)
    else:
        q, k, v = attn.qkv(x).chunk(3, -1)
    heads = [t.view(5, 64, 4, 12).transpose(1, 2) for t in (q, k, v)]  # contiguous 12-channel heads
    logits = 0.5 * heads[0] @ heads[1].transpose(-1, -2) + attn.relative_position_bias()
    ref = attn.proj((logits.softmax(-1) @ heads[2]).transpose(1, 2).reshape(5, 64, 48))
    torch.testing.assert_close(attn(x, ctx if cross else None), ref, atol=1e-5, rtol=1e-5)


def test_attention_scale_option():
    assert _net().fusion_a.transformer.window_attn.attn.scale == 0.5  # official num_heads ** -0.5
    fixed = MACTFusion(fix_attention_scale=True)
    assert math.isclose(fixed.encoder_b.mixer.grid_attn.attn.scale, 12**-0.5)


@pytest.mark.parametrize("dims", [2, 3])
def test_large_kernel_fft_conv_equals_grouped_conv(dims):
    torch.manual_seed(0)
    conv = LargeKernelGroupedConv(dims, 16, 4, 7 if dims == 3 else 31)
    x = torch.randn(2, 16, *([9] * dims)) if dims == 3 else torch.randn(2, 16, 20, 27)
    fn = (F.conv2d, F.conv3d)[dims - 2]
    ref = fn(x.double(), conv.weight.double(), padding=conv.kernel_size // 2, groups=4)
    torch.testing.assert_close(conv(x).double(), ref, atol=1e-4, rtol=1e-5)


def test_safm_is_adain_at_init():
    safm = SpatialAdaptationFusion(2, 6)
    own, other = torch.randn(2, 6, 9, 11) * 3 + 1, torch.randn(2, 6, 9, 11)
    mu, sd = own.mean((2, 3), keepdim=True), own.std((2, 3), keepdim=True)
    o_mu, o_var = other.mean((2, 3), keepdim=True), other.var((2, 3), unbiased=False, keepdim=True)
    ref = (other - o_mu) / torch.sqrt(o_var + 1e-5) * sd + mu
    torch.testing.assert_close(safm(own, other), ref, atol=1e-5, rtol=1e-5)


def test_gradient_blocks_use_shared_sobel():
    net = _net()
    assert isinstance(net.encoder_a.grdb1.sobel, SobelGradient) and net.encoder_a.grdb1.sobel.weight.requires_grad


def test_3d_forward_and_loss():
    net = _net(spatial_dims=3, window_size=4, large_kernel_size=3)
    x = torch.rand(1, 2, 8, 8, 10)  # depth 10 is padded to 12
    out = net(x, mode="train")
    assert out.shape == (1, 1, 8, 8, 10)
    loss = MACTFusionLoss(ms_ssim_weights=(0.5, 0.5))(out, x)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()


# ---------------------------------------------------------------- complexity


def _count_macs(net, x):
    """Multiply-accumulates of convolutions (incl. the Sobel and FFT ones, counted as direct), linear layers and the
    two attention matmuls (q k^T, attn v), via forward hooks."""
    macs = {"conv": 0, "linear": 0, "attention": 0}

    def conv(m, i, o):
        macs["conv"] += o.numel() * math.prod(m.weight.shape[1:])

    def sobel(m, i, o):
        macs["conv"] += i[0].numel() * m.weight.shape[0] // m.channels * 3 ** (i[0].ndim - 2)

    def linear(m, i, o):
        macs["linear"] += o.numel() * m.in_features

    def attention(m, i, o):
        g, n, c = i[0].shape
        macs["attention"] += 2 * g * n * n * c

    hooks = []
    for mod in net.modules():
        hook = {torch.nn.Conv2d: conv, torch.nn.Conv3d: conv, LargeKernelGroupedConv: conv, SobelGradient: sobel,
                torch.nn.Linear: linear, RelativePositionAttention: attention}.get(type(mod))
        if hook is not None:
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return macs


def test_macs_match_official_count():
    # every map is full resolution and every group has 64 tokens, so MACs scale exactly with H*W: 64^2 x 16 = 256^2
    macs = {k: v * 16 / 1e9 for k, v in _count_macs(MACTFusion().eval(), torch.rand(1, 2, 64, 64)).items()}
    # official, fvcore at 256x256: conv 21.94, linear 14.50, attention matmuls 3.22 GMAC (+ 0.46 norms = 40.11)
    assert macs["conv"] == pytest.approx(21.94, abs=0.01)
    assert macs["linear"] == pytest.approx(14.50, abs=0.01)
    assert macs["attention"] == pytest.approx(3.22, abs=0.01)


# ---------------------------------------------------------------- loss


def test_loss_zero_for_perfect_fusion_and_positive_otherwise():
    loss_fn = MACTFusionLoss()
    a = torch.rand(2, 1, 32, 32)
    terms = loss_fn.terms(a.clone(), torch.cat([a, a], 1))  # identical sources, fused = them
    assert all(abs(v.item()) < 1e-6 for v in terms.values()), terms
    target = torch.rand(2, 2, 32, 32)
    pred = torch.rand(2, 1, 32, 32, requires_grad=True)
    loss = loss_fn(pred, target)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # gradient descent on the fused image decreases the loss
    opt = torch.optim.Adam([pred], lr=0.05)
    history = []
    for _ in range(10):
        opt.zero_grad()
        value = loss_fn(pred, target)
        value.backward()
        opt.step()
        history.append(value.item())
    assert history[-1] < 0.8 * history[0]


def test_loss_terms_by_hand():
    loss_fn = MACTFusionLoss(ssim_weight=1.0, intensity_weight=2.0, grad_weight=3.0)
    torch.manual_seed(0)
    target, pred = torch.rand(2, 2, 32, 32), torch.rand(2, 1, 32, 32)
    t = loss_fn.terms(pred, target)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)  # official loss kernels
    ky = torch.tensor([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]]).view(1, 1, 3, 3)

    def grad(x):
        return F.conv2d(x, kx, padding=1).abs() + F.conv2d(x, ky, padding=1).abs()

    a, b = target[:, :1], target[:, 1:]
    torch.testing.assert_close(t["grad"], F.l1_loss(grad(pred), torch.max(grad(a), grad(b))))
    torch.testing.assert_close(t["intensity"], F.mse_loss(pred, torch.max(a, b)))
    ssim = 0.5 * (1 - ms_ssim(pred, a)).mean() + 0.5 * (1 - ms_ssim(pred, b)).mean()
    torch.testing.assert_close(t["ssim"], ssim)
    torch.testing.assert_close(loss_fn(pred, target), t["ssim"] + 2 * t["intensity"] + 3 * t["grad"])
    with pytest.raises(ValueError, match="target"):
        loss_fn(pred, target[:, :1])


def test_ms_ssim_definition():
    from monai.metrics.regression import compute_ssim_and_cs

    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert torch.allclose(ms_ssim(x, x), torch.ones(2))
    # one scale: the (normalised) mean SSIM of MONAI
    s, _ = compute_ssim_and_cs(x, y, 2, kernel_size=[11, 11], kernel_sigma=[1.5, 1.5])
    torch.testing.assert_close(ms_ssim(x, y, weights=(1.0,)), (s.flatten(1).mean(1) + 1) / 2)
    # five scales at 64 px (windows 11/11/11/7/3), no NaN gradient for anti-correlated images
    z = (1 - x).requires_grad_()
    v = ms_ssim(z, x)
    assert torch.all((v > 0) & (v < 1))
    v.sum().backward()
    assert torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="16"):
        ms_ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


# ---------------------------------------------------------------- converter


def _fake_official(net):
    """Invert the converter's map: an official-layout state dict (with dead modules and index buffers)."""
    ours = net.state_dict()
    off = {}
    for old, (new, suffixes) in convert._MACT_MAP.items():
        for s in suffixes:
            off[old + s] = ours[new + s].clone()
    for new, old in convert._MACT_SOBEL.items():
        w = ours[new].view(-1, 2, 1, 3, 3)
        off[old + "x.weight"], off[old + "y.weight"] = w[:, 0].clone(), w[:, 1].clone()
    for k in convert._MACT_INDEX:
        off[k] = relative_position_index((8, 8))
    off["vis_max.mb2_conv.main_path.3.weight"] = torch.zeros(48, 48, 1, 1)
    off["inf_cross.t1_adap_1.conv_noshared.0.bias"] = torch.zeros(48)
    return off


def test_convert_roundtrip_errors_and_cli(tmp_path):
    torch.manual_seed(0)
    net = MACTFusion()
    off = _fake_official(net)
    conv = convert.convert_state_dict("mactfusion", off)
    fresh = MACTFusion()
    fresh.load_state_dict(conv, strict=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, conv[k]), k
    with pytest.raises(convert.CheckpointConversionError, match="unexpected"):
        convert.convert_state_dict("mactfusion", {**off, "vis_max.extra.weight": torch.zeros(1)})
    for key in ("decode.2.conv2d.bias", "inf_rgbd2.sobelconv.convy.weight",
                "vis_cross.sam.grid_transformer.attention.relative_position_index"):
        broken = {k: v for k, v in off.items() if k != key}
        with pytest.raises(convert.CheckpointConversionError, match="missing") as err:
            convert.convert_state_dict("mactfusion", broken)
        assert key in str(err.value)
    bad_index = {**off, convert._MACT_INDEX[0]: relative_position_index((7, 7))}
    with pytest.raises(convert.CheckpointConversionError, match="8x8"):
        convert.convert_state_dict("mactfusion", bad_index)
    with pytest.raises(convert.CheckpointConversionError, match="already"):
        convert.convert_state_dict("mactfusion", conv)
    path, out = tmp_path / "official.pth", tmp_path / "models" / "mactfusion.pt"
    torch.save(off, path)
    assert convert.main(["--method", "mactfusion", "--input", str(path), "--output", str(out)]) == 0
    assert set(torch.load(out, weights_only=True)) == set(conv)


# ---------------------------------------------------------------- workflows


def test_train_one_epoch_then_infer(tmp_path):
    tiny = _tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    wf = _workflow("train", str(CONFIGS / "train.json"), method="mactfusion", dataset_dir=str(tiny),
                   output_dir=str(run), epochs=1, batch_size=2, patch_size=[32, 32], network_overrides=TINY)
    wf.initialize()
    wf.run()
    wf.finalize()
    sd = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    MACTFusion(**TINY).load_state_dict(sd)  # strict: exactly the network's weights

    fused = tmp_path / "fused"
    wf = _workflow("infer", str(CONFIGS / "inference.json"), method="mactfusion", dataset_dir=str(tiny),
                   output_dir=str(fused), ckpt_path=str(run / "model.pt"), network_overrides=TINY)
    wf.initialize()
    wf.run()
    wf.finalize()
    names = sorted(p.name for p in fused.iterdir())
    assert len(names) == 2 * 12  # grey + RGB for 6 CT-MRI and 6 PET-MRI pairs
    grey = np.asarray(Image.open(fused / "CT-MRI_00_fused.png"))
    assert grey.shape == (32, 32) and grey.std() > 0
