"""Unit tests for DRAN: network, fusion rules, loss and checkpoint converter (no fixtures needed)."""

import pytest
import torch
import torch.nn.functional as F

from scripts import convert
from scripts.losses import DRANLoss, VGG16BNFeatures, sobel_gradient_loss
from scripts.networks import DRAN
from scripts.networks.blocks import PoolGate, SobelGradient, sobel_kernels
from scripts.networks.fusion_rules import FEATURE_FUSION_RULES, get_fusion_rule


def _net(features=8, **kw):
    torch.manual_seed(0)
    return DRAN(features=features, **kw).eval()


def test_parameter_count():
    net = DRAN()
    assert sum(p.numel() for p in net.parameters()) == 414_081
    assert all(p.requires_grad for p in net.parameters())  # trainable Sobel included


def test_shapes_fuse_and_train():
    net = _net()
    x = torch.rand(2, 2, 16, 20)
    with torch.no_grad():
        assert net(x).shape == (2, 1, 16, 20)
        assert net(x, mode="fuse").shape == (2, 1, 16, 20)
        assert net(x, mode="train").shape == (2, 2, 16, 20)
        assert net.encode(x[:, :1]).shape == (2, 8, 16, 20)
        assert net.decode(net.encode(x[:, :1])).shape == (2, 1, 16, 20)
    with pytest.raises(ValueError):
        net(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError):
        net(x, mode="bogus")


def test_train_mode_is_per_channel_autoencoder():
    net = _net()
    x = torch.rand(2, 2, 16, 16)
    with torch.no_grad():
        rec = net(x, mode="train")
        assert torch.allclose(rec[:, 1:], net.decode(net.encode(x[:, 1:])), atol=1e-6)
    net.train()
    rec = net(x, mode="train")
    rec.mean().backward()
    assert net.encoder.edge.sobel.weight.grad is not None


def test_batched_fuse_equals_single_calls():
    net = _net(features=16)
    x = torch.rand(2, 2, 32, 32)
    x[1] = x[1] * 0.5  # different per-sample SFNN weights
    with torch.no_grad():
        both, inter = net.fuse(x, return_intermediates=True)
        singles = torch.cat([net(x[:1]), net(x[1:])])
    assert inter["w_a"].shape == (2,) and not torch.allclose(inter["w_a"][0], inter["w_a"][1])
    torch.testing.assert_close(both, singles, atol=1e-5, rtol=0)


def test_odd_sizes_pad_and_crop():
    net = _net()
    with torch.no_grad():
        assert net(torch.rand(1, 2, 15, 17)).shape == (1, 1, 15, 17)
        assert net(torch.rand(1, 2, 7, 8), mode="train").shape == (1, 2, 7, 8)
    # the gate on an odd image equals the gate on the replicate-padded image, cropped back
    x = torch.randn(1, 3, 5, 7)
    padded = F.pad(x, (0, 1, 0, 1), mode="replicate")
    torch.testing.assert_close(PoolGate(2)(x), PoolGate(2)(padded)[..., :5, :7])
    # even sizes: plain ReLU(upsample(avgpool))
    y = torch.randn(2, 3, 6, 8)
    ref = torch.relu(F.interpolate(F.avg_pool2d(y, 2), scale_factor=2, mode="nearest"))
    assert torch.equal(PoolGate(2)(y), ref)


def test_trainable_sobel_init():
    sob = SobelGradient(4)
    w = sob.weight.view(4, 2, 3, 3)
    kx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
    assert torch.equal(w[:, 0], kx.expand(4, 3, 3)) and torch.equal(w[:, 1], kx.T.expand(4, 3, 3))
    x = torch.randn(1, 4, 9, 9)
    ref = F.conv2d(x, kx.expand(4, 1, 3, 3), padding=1, groups=4).abs() + \
        F.conv2d(x, kx.T.expand(4, 1, 3, 3), padding=1, groups=4).abs()
    torch.testing.assert_close(sob(x), ref)
    assert sobel_kernels(3).shape == (3, 3, 3, 3)


# ---------------------------------------------------------------- fusion rules

def _naive_sfnn_weights(fa, fb):
    def m(f):
        s = torch.softmax(f.double(), dim=0)
        return max(torch.linalg.svdvals(s[c]).sum().item() for c in range(s.shape[0]))
    ma, mb = m(fa), m(fb)
    return ma**2 / (ma**2 + mb**2), mb**2 / (ma**2 + mb**2)


def test_sfnn_matches_naive_and_is_symmetric():
    torch.manual_seed(1)
    fa, fb = torch.randn(3, 5, 6, 7), 2 * torch.randn(3, 5, 6, 7)
    fused, info = FEATURE_FUSION_RULES["sfnn"](fa, fb, return_weights=True)
    assert info["nuc_a"].shape == (3, 5) and info["nuc_a"].dtype == torch.float64
    torch.testing.assert_close(info["w_a"] + info["w_b"], torch.ones(3, dtype=torch.float64))
    for i in range(3):
        wa, wb = _naive_sfnn_weights(fa[i], fb[i])
        assert abs(info["w_a"][i].item() - wa) < 1e-6 and abs(info["w_b"][i].item() - wb) < 1e-6
        nuc = torch.stack([torch.linalg.svdvals(torch.softmax(fa[i].double(), 0)[c]).sum() for c in range(5)])
        torch.testing.assert_close(info["nuc_a"][i], nuc, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(fused[i], wa * fa[i] + wb * fb[i], atol=1e-5, rtol=1e-5)
    swapped, info_s = FEATURE_FUSION_RULES["sfnn"](fb, fa, return_weights=True)
    assert torch.equal(fused, swapped) and torch.equal(info["w_a"], info_s["w_b"])


def test_sfnn_3d_flattens_depth():
    fa, fb = torch.randn(1, 3, 2, 4, 5), torch.randn(1, 3, 2, 4, 5)
    _, info = FEATURE_FUSION_RULES["sfnn"](fa, fb, return_weights=True)
    ref = torch.linalg.matrix_norm(torch.softmax(fa, 1).reshape(1, 3, 8, 5), ord="nuc").double()
    torch.testing.assert_close(info["nuc_a"], ref)


def test_simple_rules_exact():
    fa = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]]]])
    fb = torch.tensor([[[[3.0, 1.0], [0.0, -1.0]]]])
    assert torch.equal(get_fusion_rule("addition")(fa, fb), torch.tensor([[[[4.0, -1.0], [0.0, 2.0]]]]))
    assert torch.equal(get_fusion_rule("average")(fa, fb), torch.tensor([[[[2.0, -0.5], [0.0, 1.0]]]]))
    assert torch.equal(get_fusion_rule("max")(fa, fb), torch.tensor([[[[3.0, 1.0], [0.0, 3.0]]]]))
    # fer: k_a = a^2/(a^2+b^2), zero denominator -> 0
    fer = get_fusion_rule("fer")(fa, fb)
    torch.testing.assert_close(fer, torch.tensor([[[[(1 + 27) / 10, (-8 + 1) / 5], [0.0, (27 - 1) / 10]]]]))
    # l1 (FL1N): l_a = 6, l_b = 5, per sample
    fused, info = get_fusion_rule("l1")(torch.cat([fa, fa]), torch.cat([fb, 2 * fb]), return_weights=True)
    torch.testing.assert_close(info["w_a"], torch.tensor([6 / 11, 6 / 16], dtype=torch.float64))
    torch.testing.assert_close(fused[0], (6 * fa[0] + 5 * fb[0]) / 11)
    for name, rule in FEATURE_FUSION_RULES.items():
        assert torch.equal(rule(fa, fb), rule(fb, fa)), name
    with pytest.raises(ValueError):
        get_fusion_rule("nope")


def test_network_uses_configured_rule():
    net = _net(fusion_rule="average")
    x = torch.rand(1, 2, 8, 8)
    with torch.no_grad():
        f = net.encode(x.view(2, 1, 8, 8))
        torch.testing.assert_close(net(x), net.decode((f[:1] + f[1:]) / 2), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- 3D

def test_3d_construct_and_forward():
    net = _net(spatial_dims=3)
    x = torch.rand(1, 2, 5, 6, 7)
    with torch.no_grad():
        assert net(x).shape == (1, 1, 5, 6, 7)
        rec = net(x, mode="train")
    assert rec.shape == (1, 2, 5, 6, 7)
    loss = DRANLoss()(rec, x)
    assert torch.isfinite(loss) and loss > 0


# ---------------------------------------------------------------- loss

def test_loss_zero_and_positive():
    loss_fn = DRANLoss()
    t = torch.rand(2, 1, 16, 16)
    assert loss_fn(t, t.clone()).item() == 0.0
    p = (t + 0.1 * torch.randn_like(t)).requires_grad_()
    loss = loss_fn(p, t)
    assert loss.item() > 0
    loss.backward()
    assert p.grad is not None
    # gradient term by hand: valid Sobel, |.| difference, mean per direction
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    ky = torch.tensor([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]]).view(1, 1, 3, 3)
    ref = sum(((F.conv2d(p, k).abs() - F.conv2d(t, k).abs()) ** 2).mean() for k in (kx, ky))
    torch.testing.assert_close(sobel_gradient_loss(p, t), ref)
    torch.testing.assert_close(loss, F.mse_loss(p, t) + 0.5 * ref)


def test_perceptual_requires_weights_path(tmp_path):
    with pytest.raises(ValueError, match="vgg_weights_path"):
        DRANLoss(perceptual_weight=0.5)
    with pytest.raises(ValueError, match="vgg_weights_path"):
        DRANLoss(perceptual_weight=0.5, vgg_weights_path=tmp_path / "absent.pth")


def test_perceptual_with_local_random_vgg(tmp_path):
    torch.manual_seed(0)
    vgg = VGG16BNFeatures()
    sd = {f"features.{k}": v for k, v in vgg.features.state_dict().items()}
    sd["features.24.weight"] = torch.zeros(1)  # deeper layers / classifier of a full torchvision file: ignored
    sd["classifier.0.weight"] = torch.zeros(1)
    path = tmp_path / "vgg16_bn.pth"
    torch.save(sd, path)
    loss_fn = DRANLoss(grad_weight=0.0, perceptual_weight=0.2, vgg_weights_path=path)
    loss_fn.train()
    assert not loss_fn.vgg.training
    t = torch.rand(1, 2, 32, 32)
    assert loss_fn(t, t.clone()).item() == 0.0
    p = (t + 0.1 * torch.randn_like(t)).requires_grad_()
    loss = loss_fn(p, t)
    feats = vgg(p.reshape(2, 1, 32, 32).expand(-1, 3, -1, -1)), vgg(t.reshape(2, 1, 32, 32).expand(-1, 3, -1, -1))
    assert [f.shape[1:] for f in feats[0]] == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]
    ref = F.mse_loss(p, t) + 0.2 * sum(F.mse_loss(a, b) for a, b in zip(*feats))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert p.grad is not None and all(q.grad is None for q in loss_fn.vgg.parameters())
    del sd["features.21.running_var"]
    torch.save(sd, path)
    with pytest.raises(ValueError, match="vgg16_bn"):
        DRANLoss(perceptual_weight=0.2, vgg_weights_path=path)


# ---------------------------------------------------------------- converter

def _fake_official(net):
    """Invert the converter's key map to build an official-layout state dict (plus dead modules)."""
    ours = net.state_dict()
    off = {}
    for old, (new, suffixes) in convert._DRAN_MAP.items():
        for s in suffixes:
            off[old + s] = ours[new + s].clone()
    w = ours["encoder.edge.sobel.weight"].view(-1, 2, 1, 3, 3)
    off[convert._DRAN_SOBEL[0]], off[convert._DRAN_SOBEL[1]] = w[:, 0].clone(), w[:, 1].clone()
    off["fe.conv_id.0.weight"] = torch.zeros(64, 192, 1, 1)
    off["fe.fe.dilran.bnorm.running_mean"] = torch.zeros(64)
    return off


def test_convert_roundtrip_and_errors(tmp_path):
    net = _net()
    off = _fake_official(net)
    conv = convert.convert_state_dict("dran", off)
    fresh = DRAN(features=8)
    fresh.load_state_dict(conv, strict=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, conv[k]), k
    with pytest.raises(convert.CheckpointConversionError, match="unexpected"):
        convert.convert_state_dict("dran", {**off, "fe.extra.weight": torch.zeros(1)})
    broken = dict(off)
    del broken["recon.recon_conv.4.bias"]
    with pytest.raises(convert.CheckpointConversionError, match="missing"):
        convert.convert_state_dict("dran", broken)
    with pytest.raises(ValueError, match="no converter"):
        convert.convert_state_dict("nope", off)

    # wrappers and module. prefixes
    path = tmp_path / "official.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in off.items()}}, path)
    assert set(convert.load_official_checkpoint(path)) == set(off)
    # pickled code is refused
    bad = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, bad)
    with pytest.raises(convert.CheckpointConversionError, match="pickled"):
        convert.load_official_checkpoint(bad)

    # CLI: atomic write, refuses to overwrite its input
    out = tmp_path / "models" / "dran.pt"
    assert convert.main(["--method", "dran", "--input", str(path), "--output", str(out)]) == 0
    assert set(torch.load(out, weights_only=True)) == set(conv)
    assert [p.name for p in out.parent.iterdir()] == ["dran.pt"]
    with pytest.raises(SystemExit):
        convert.main(["--method", "dran", "--input", str(path), "--output", str(path)])


def test_num_threads_untouched():
    n = torch.get_num_threads()
    with torch.no_grad():
        _net()(torch.rand(1, 2, 8, 8))
    assert torch.get_num_threads() == n
