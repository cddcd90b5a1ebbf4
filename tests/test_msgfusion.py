"""Unit and workflow tests for MsgFusion: network, ablation switches, V', loss, colour V' transform, bundle run."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.metrics import SSIMMetric
from PIL import Image
from test_workflows import CONFIGS, _tiny_dataset, _workflow

from scripts.losses import MsgFusionLoss
from scripts.networks import MsgFusion
from scripts.networks.msgfusion import FourierUnit, msgfusion_v_prime, weighted_map_fusion
from scripts.transforms import MsgFusionVPrimed, rgb_to_ycbcr


def _net(features=4, seed=0, **kw):
    torch.manual_seed(seed)
    return MsgFusion(features=features, **kw).eval()


def _n_params(net):
    return sum(p.numel() for p in net.parameters())


def _randomise_classifier(net, seed=1):
    """The classifier's last conv starts at zero (uniform classes); give it weights so the classes vary."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.classifier.net[-1].parameters():
            p.copy_(torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------ network
def test_parameter_counts():
    assert _n_params(MsgFusion()) == 2_701_252
    assert _n_params(MsgFusion(use_frequency=False)) == 2_701_252 - (4 * 64 * 64 + 2 * 64)
    assert _n_params(MsgFusion(share_norm=True)) == 2_699_204
    assert _n_params(MsgFusion(use_v_prime=False)) == 2_701_252  # V' path reuses the SF conv and the decoder


def test_shapes_modes_and_input_checks():
    net = _net()
    x = torch.rand(2, 2, 16, 20)
    with torch.no_grad():
        out, inter = net.fuse(x, return_intermediates=True)
        assert out.shape == net(x).shape == net(x, mode="train").shape == (2, 1, 16, 20)
        assert net(torch.rand(2, 3, 16, 20)).shape == (2, 1, 16, 20)  # optional V' channel
    for k in ("sf1", "sf2", "sf", "gv1", "feat"):
        assert inter[k].shape == (2, 4, 16, 20), k
    assert inter["probs"].shape == (2, 3, 16, 20)
    torch.testing.assert_close(inter["probs"].sum(1), torch.ones(2, 16, 20))
    assert inter["v_prime"].shape == inter["f1"].shape == inter["f2"].shape == (2, 1, 16, 20)
    assert float(inter["gv1"].min()) >= 0 and float(inter["gv1"].max()) < 1  # ReLU then tanh
    for bad in (torch.rand(1, 1, 16, 16), torch.rand(1, 4, 16, 16), torch.rand(2, 16, 16)):
        with pytest.raises(ValueError):
            net(bad)
    with pytest.raises(ValueError):
        net(x, mode="bogus")
    with pytest.raises(ValueError):
        MsgFusion(variant="mri")
    with pytest.raises(ValueError):
        MsgFusion(spatial_dims=1)


@pytest.mark.parametrize("size", [(15, 17), (7, 9), (5, 4), (33, 32)])
def test_odd_and_small_sizes(size):
    with torch.no_grad():
        assert _net()(torch.rand(1, 2, *size)).shape == (1, 1, *size)


def test_3d():
    net = _net(spatial_dims=3)
    with torch.no_grad():
        assert net(torch.rand(1, 2, 9, 10, 11)).shape == (1, 1, 9, 10, 11)


def test_batched_equals_per_sample():
    net = _net(features=6)
    _randomise_classifier(net)
    x = torch.rand(3, 2, 24, 28)
    x[1] *= 0.5
    with torch.no_grad():
        both = net(x)
        singles = torch.cat([net(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(both, singles, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ frequency path
def test_fourier_unit_is_a_real_frequency_domain_operation():
    unit = FourierUnit(2, 3)
    x = torch.rand(2, 3, 12, 13)
    with torch.no_grad():  # identity amplitude map, identity phase map (bias shift keeps the LeakyReLU linear)
        for seq, shift in ((unit.amplitude, 0.0), (unit.phase, 4.0)):
            seq[0].weight.copy_(torch.eye(3)[..., None, None])
            seq[2].weight.copy_(torch.eye(3)[..., None, None])
            if seq[0].bias is not None:
                seq[0].bias.fill_(shift)
                seq[2].bias.fill_(-shift)
        torch.testing.assert_close(unit(x), x, atol=1e-5, rtol=0)  # rfft -> |Z|, angle -> irfft round trip
        # a phase offset shifts nothing but scales the DC term: shift by pi flips the image's sign
        unit.phase[2].bias.fill_(-4.0 + math.pi)
        torch.testing.assert_close(unit(x), -x, atol=1e-4, rtol=0)


def test_frequency_path_changes_output_and_is_global():
    full = _net(features=4)
    ablated = _net(features=4, use_frequency=False)
    ablated.load_state_dict(full.state_dict(), strict=False)  # same weights, Fourier unit removed
    assert set(full.state_dict()) - set(ablated.state_dict()) == {
        f"sf.fourier.{p}.{i}.{w}" for p in ("amplitude", "phase") for i in (0, 2) for w in ("weight", "bias")
    } - {f"sf.fourier.amplitude.{i}.bias" for i in (0, 2)}
    x = torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        o_full, i_full = full.fuse(x, return_intermediates=True)
        o_abl, i_abl = ablated.fuse(x, return_intermediates=True)
        assert (o_full - o_abl).abs().max() > 1e-3
        torch.testing.assert_close(i_full["sf1"], i_abl["sf1"])  # spatial part untouched
        # without the Fourier unit SF2 is the 3x3 conv features: a pixel change stays local; with it, global
        x2 = x.clone()
        x2[..., 0, 0] += 1.0
        far = (slice(None), slice(None), slice(16, None), slice(16, None))
        d_abl = (ablated.fuse(x2, True)[1]["sf2"] - i_abl["sf2"])[far].abs().max()
        d_full = (full.fuse(x2, True)[1]["sf2"] - i_full["sf2"])[far].abs().max()
    assert d_abl == 0 and d_full > 1e-4


# ------------------------------------------------------------------------------------------------------- V'
def test_v_prime_closed_forms():
    g = torch.full((1, 1, 2, 2), 100 / 255)
    torch.testing.assert_close(msgfusion_v_prime(g, "functional", normalize=False), torch.full_like(g, 200 / 255))
    torch.testing.assert_close(msgfusion_v_prime(g, "ct", normalize=False), torch.full_like(g, 45 / 255))
    rgb = torch.tensor([[1.0, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 1]]).T.reshape(1, 3, 2, 2)  # red yellow white blue
    v1 = msgfusion_v_prime(rgb, "functional", normalize=False).flatten().tolist()
    assert v1 == [0.0, 1.0, 1.0, 0.0]
    v2 = msgfusion_v_prime(rgb, "ct", normalize=False).flatten().tolist()
    assert v2 == [0.0, 1.0, 1.0, 0.0]
    # per-image min-max; a constant V' (a CT darker than 1/3) becomes zeros, not NaN
    v = msgfusion_v_prime(torch.rand(2, 1, 8, 8), "functional")
    assert v.amin((1, 2, 3)).tolist() == [0.0, 0.0] and v.amax((1, 2, 3)).tolist() == [1.0, 1.0]
    assert torch.equal(msgfusion_v_prime(torch.full((1, 1, 4, 4), 0.2), "ct"), torch.zeros(1, 1, 4, 4))


def test_v_prime_switch_variant_and_third_channel():
    net = _net()
    _randomise_classifier(net)
    x = torch.rand(2, 2, 16, 16)
    no_v = _net(use_v_prime=False)
    no_v.load_state_dict(net.state_dict())  # same parameters: the V' path has none of its own
    ct = _net(variant="ct")
    ct.load_state_dict(net.state_dict())
    with torch.no_grad():
        out, inter = net.fuse(x, True)
        out_nv, inter_nv = no_v.fuse(x, True)
        torch.testing.assert_close(out_nv, inter["f1"])  # without V': the decoder output F1
        assert "v_prime" not in inter_nv and (out - out_nv).abs().max() > 1e-4
        torch.testing.assert_close(out, inter["f1"] + inter["probs"][:, 1:2] * torch.relu(inter["f2"] - inter["f1"]))
        assert (out >= inter["f1"] - 1e-6).all()  # the injection only brightens
        torch.testing.assert_close(inter["v_prime"], msgfusion_v_prime(x[:, 1:2], "functional"))
        assert (ct(x) - out).abs().max() > 1e-4  # the variants differ by their V' rule
        # a third channel replaces the V' computed from channel 1; ignored when use_v_prime=False
        vp = torch.rand(2, 1, 16, 16)
        assert torch.equal(net.fuse(torch.cat([x, vp], 1), True)[1]["v_prime"], vp)
        torch.testing.assert_close(no_v(torch.cat([x, vp], 1)), out_nv)
        torch.testing.assert_close(net(torch.cat([x, inter["v_prime"]], 1)), out)


def test_colour_v_prime_transform():
    rgb = torch.rand(3, 8, 8) * 255
    ycc = rgb_to_ycbcr(rgb)
    d = MsgFusionVPrimed()({"source_b": ycc[:1], "source_b_chroma": ycc[1:]})
    torch.testing.assert_close(d["v_prime"], msgfusion_v_prime(rgb[None] / 255)[0], atol=1e-5, rtol=0)
    grey = torch.rand(1, 8, 8) * 300 + 7
    d = MsgFusionVPrimed(variant="ct")({"source_b": grey})
    scaled = (grey - grey.min()) / (grey.max() - grey.min())
    torch.testing.assert_close(d["v_prime"], msgfusion_v_prime(scaled[None], "ct")[0])


def test_weighted_map_fusion():
    a, b = torch.rand(2, 3, 5, 5), torch.rand(2, 3, 5, 5)
    wa = torch.exp(a.mean(1, keepdim=True))
    wb = torch.exp(b.mean(1, keepdim=True))
    torch.testing.assert_close(weighted_map_fusion(a, b), (wa * a + wb * b) / (wa + wb))


# ------------------------------------------------------------------------------------------------ training
def test_gradients_flow_and_stay_finite():
    net = MsgFusion(features=4).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    loss_fn = MsgFusionLoss()
    x = torch.rand(2, 2, 24, 24)
    x[0, 0] = 0.0  # an all-zero MRI: zero Fourier coefficients, where angle() has no gradient
    for _ in range(2):  # the classifier's first conv only gets gradients once its zero-initialised head moved
        opt.zero_grad()
        loss_fn(net(x, mode="train"), x).backward()
        opt.step()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_runs_under_autocast():
    """AMP (the workflows use it on GPU): the Fourier unit computes its spectra in float32."""
    net = MsgFusion(features=4).train()
    x = torch.rand(2, 2, 24, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, mode="train")
    MsgFusionLoss()(out.float(), x).backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_short_training_gives_sensible_eval_mode():
    """Running BN statistics are a plain average over the first batches: eval mode is usable after few steps."""
    torch.manual_seed(0)
    net = MsgFusion(features=4).train()
    x = torch.rand(4, 2, 16, 16) * 0.1
    with torch.no_grad():
        net(x)
    bn = net.sf.spatial_norms[0]
    mean = net.sf.spatial(x[:, :1]).mean((0, 2, 3))
    torch.testing.assert_close(bn.running_mean, mean, atol=1e-5, rtol=1e-4)  # not 0.1 * mean
    assert bn.momentum == 1.0 and int(bn.num_batches_tracked) == 1


def test_stem_weights_from_local_file(tmp_path):
    w = torch.randn(4, 3, 7, 7)
    torch.save({"conv1.weight": w, "fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    net = MsgFusion(features=4, stem_weights=str(tmp_path / "resnet.pth"))
    torch.testing.assert_close(net.gv.stem.weight, w.sum(1, keepdim=True))
    assert not net.gv.stem.weight.requires_grad
    with pytest.raises(FileNotFoundError):
        MsgFusion(features=4, stem_weights=str(tmp_path / "missing.pth"))
    torch.save(torch.randn(8, 3, 7, 7), tmp_path / "wrong.pth")
    with pytest.raises(ValueError):
        MsgFusion(features=4, stem_weights=str(tmp_path / "wrong.pth"))


# ----------------------------------------------------------------------------------------------------- loss
def _reference_ssim(x, y, win=11, sigma=1.5, c1=1e-4, c2=9e-4):
    """Textbook Gaussian-window SSIM with 'valid' filtering (the pytorch_msssim definition)."""
    c = torch.arange(win, dtype=torch.float64) - win // 2
    g = torch.exp(-(c**2) / (2 * sigma**2))
    g = (g / g.sum())[None, None]
    k = (g[..., :, None] * g[..., None, :]).to(x.dtype)
    f = lambda t: F.conv2d(t, k)  # noqa: E731
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    return (((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean()


def test_loss_formula_and_ssim_definition():
    torch.manual_seed(0)
    pred, target = torch.rand(2, 1, 32, 32), torch.rand(2, 2, 32, 32)
    loss = MsgFusionLoss()
    t = loss.terms(pred, target)
    for key, src in (("ssim_a", 0), ("ssim_b", 1)):
        ref = 1 - _reference_ssim(pred.double(), target[:, src : src + 1].double())
        assert abs(float(t[key]) - float(ref)) < 1e-5
        ssim = SSIMMetric(spatial_dims=2, data_range=1.0)(pred, target[:, src : src + 1]).mean()
        assert abs(float(t[key]) - (1 - float(ssim))) < 1e-6
    mse = F.mse_loss(pred, target[:, :1]) + F.mse_loss(pred, target[:, 1:])
    expected = 0.4 * (t["ssim_a"] + t["ssim_b"]) + 0.1 * mse
    torch.testing.assert_close(loss(pred, target), expected)
    # weights: all SSIM, all on the MRI
    torch.testing.assert_close(MsgFusionLoss(1.0, 1.0, 1.0)(pred, target), t["ssim_a"])
    # zero when the fused image equals both sources; larger for a worse fusion; extra target channels ignored
    same = target[:, :1].repeat(1, 2, 1, 1)
    assert float(loss(target[:, :1], same)) < 1e-6
    good = target.mean(1, keepdim=True)
    assert float(loss(good, target)) < float(loss(1 - good, target))
    torch.testing.assert_close(loss(pred, torch.cat([target, torch.rand(2, 1, 32, 32)], 1)), loss(pred, target))
    p = pred.clone().requires_grad_(True)
    loss(p, target).backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert torch.isfinite(loss(torch.rand(1, 1, 12, 12, 12), torch.rand(1, 2, 12, 12, 12)))  # 3D
    for bad_pred, bad_target in ((pred.repeat(1, 2, 1, 1), target), (pred, target[:, :1]), (pred, target[..., :16])):
        with pytest.raises(ValueError):
            loss(bad_pred, bad_target)


def test_clamp_output_option_scores_what_the_metrics_see():
    """clamp_output=True: the loss of a prediction equals that of its [0, 1] clamp; below-black pixels get no
    gradient, above-black background does (the default scores and pushes the raw tanh output)."""
    torch.manual_seed(0)
    target = torch.rand(1, 2, 32, 32)
    target[..., :8, :] = 0  # black background band in both sources
    pred = target.mean(1, keepdim=True).clone()
    pred[..., :4, :] = -0.1  # below black: clamped away
    pred[..., 4:8, :] = 0.05  # a few grey levels above black
    clamped, plain = MsgFusionLoss(clamp_output=True), MsgFusionLoss()
    torch.testing.assert_close(clamped(pred, target), plain(pred.clamp(0, 1), target))
    darker = pred.clone()
    darker[..., :4, :] = -0.5  # further below black: invisible after the clamp, penalised by the default
    assert float(clamped(darker, target)) == float(clamped(pred, target))
    assert float(plain(darker, target)) > float(plain(pred, target))
    p = pred.clone().requires_grad_(True)
    clamped(p, target).backward()
    assert p.grad[..., :4, :].abs().max() == 0 and p.grad[..., 4:8, :].abs().sum() > 0


# ------------------------------------------------------------------------------------------------ workflow
def test_train_then_infer_workflow(tmp_path):
    tiny = _tiny_dataset(tmp_path / "data")
    net_cfg = {"features": 4}
    train_out = tmp_path / "train"
    wf = _workflow(
        "train", str(CONFIGS / "train.json"), method="msgfusion", dataset_dir=str(tiny), output_dir=str(train_out),
        epochs=1, batch_size=4, patch_size=[32, 32], network_overrides=net_cfg,
    )  # fmt: skip
    wf.initialize()
    wf.run()
    wf.finalize()
    sd = torch.load(train_out / "model.pt", map_location="cpu", weights_only=True)
    net = MsgFusion(**net_cfg)
    net.load_state_dict(sd)  # strict: exactly the network's weights

    out = tmp_path / "fused"
    wf = _workflow(
        "infer", str(CONFIGS / "inference.json"), method="msgfusion", dataset_dir=str(tiny), output_dir=str(out),
        ckpt_path=str(train_out / "model.pt"), network_overrides=net_cfg,
    )  # fmt: skip
    wf.initialize()
    wf.run()
    wf.finalize()
    assert len(list(out.iterdir())) == 2 * 12
    for pair in ("CT-MRI", "PET-MRI"):
        grey = Image.open(out / f"{pair}_00_fused.png")
        rgb = Image.open(out / f"{pair}_00_fused_rgb.png")
        assert grey.mode == "L" and rgb.mode == "RGB" and grey.size == (32, 32)
        arr = np.asarray(rgb).astype(int)
        assert (np.abs(arr[..., 0] - arr[..., 2]).max() > 10) == (pair == "PET-MRI")
        assert np.asarray(grey).std() > 0


def test_workflows_feed_colour_v_prime_as_third_channel(tmp_path):
    """inference.json (and train/evaluate, same keys) give MsgFusion V' computed from the colour PET, CT-style V'
    for CT pairs, and only the two sources as the training target."""
    tiny = _tiny_dataset(tmp_path / "data", n=2)
    wf = _workflow("infer", str(CONFIGS / "inference.json"), method="msgfusion", dataset_dir=str(tiny),
                   output_dir=str(tmp_path / "out"), ckpt_path=None)
    wf.initialize()
    items = {it["pair"]: it for it in wf.parser.get_parsed_content("datalist")}
    pre = wf.parser.get_parsed_content("preprocessing")
    for pair, variant in (("PET-MRI", "functional"), ("CT-MRI", "ct")):
        d = pre(items[pair])
        assert d["image"].shape[0] == 3
        rgb = np.asarray(Image.open(items[pair]["source_b"]).convert("RGB"), dtype=np.float32) / 255.0
        expected = msgfusion_v_prime(torch.from_numpy(rgb).permute(2, 1, 0)[None], variant)[0]  # MONAI (x, y)
        torch.testing.assert_close(torch.as_tensor(d["image"][2:]).float(), expected, atol=2e-2, rtol=0)
    train = _workflow("train", str(CONFIGS / "train.json"), method="msgfusion", dataset_dir=str(tiny),
                      output_dir=str(tmp_path / "t"))
    train.initialize()
    d = train.parser.get_parsed_content("validate#preprocessing")(items["PET-MRI"])
    assert d["image"].shape[0] == 3 and d["label"].shape[0] == 2
