"""BSAFusion: network contract, warps, converter, loss, misalignment synthesis, registration outputs and workflows.

Parity with the official forward pass is in ``test_parity.py``.
"""

import csv
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import BUNDLE_ROOT, PARITY_DIR, require_path
from scripts.convert import CheckpointConversionError, convert_state_dict, load_official_checkpoint
from scripts.losses import BSAFusionLoss
from scripts.networks import BSAFusion
from scripts.networks.bsafusion import FieldWarp
from scripts.registration import (RandMisalignd, SaveRegistrationd, SplitRegistrationd, folding_fraction,
                                  invert_ddf, jacobian_determinant, registration_scores, warp)

SMALL = dict(hidden_size=32, num_heads=2, pos_size=32, reg_channels=(32, 16, 8, 8, 4, 1),
             fusion_channels=(16, 8, 8, 4), shallow_channels=4)
# tiny 3D network: patch 4 (3 registration levels, 2 fusion stages), 3D token table over (16 / 4)^3 tokens
SMALL3 = dict(hidden_size=16, num_heads=2, pos_size=16, reg_channels=(16, 8, 4, 1), fusion_channels=(8, 4),
              shallow_channels=4)


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return BSAFusion(**SMALL).eval()


def _pair(b=1, h=48, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 2, h, w, generator=g)


# ------------------------------------------------------------------------------------------------ network
@pytest.mark.parametrize("h,w", [(32, 32), (48, 64), (37, 53)])
def test_fuse_shapes_any_size(small_net, h, w):
    x = _pair(2, h, w)
    with torch.no_grad():
        fused = small_net(x)
        full = small_net(x, mode="full")
    assert fused.shape == (2, 1, h, w)
    assert fused.min() > 0 and fused.max() < 1  # Sigmoid output
    assert torch.equal(full["fused"], fused)
    assert full["aligned"].shape == (2, 1, h, w) and full["ddf"].shape == (2, 2, h, w)
    assert full["logits_fixed"].shape == (2, 2) and full["logits_moving"].shape == (2, 2)
    assert "aligned_official" in full


def test_fast_path_matches_reference_forward_and_gradients():
    """The default channels-last forward (``set_fast(net, True)``) reorders memory, not arithmetic: every output
    and every parameter gradient equals the plain NCHW reference path's within float rounding; switching paths
    changes the convolution weights' layout only, never the state dict's values. (2D only: CPU conv3d returns
    NCDHW whatever its input's layout, so 3D runs the reference path.)"""
    import copy

    from scripts.networks.blocks import set_fast

    torch.manual_seed(0)
    ref = BSAFusion(**SMALL, fast=False)
    assert not any(getattr(m, "fast", False) for m in ref.modules())
    fast = set_fast(copy.deepcopy(ref), True)
    x = _pair(2, 37, 53)
    outs, grads = [], []
    for net in (ref, fast):
        net.train()
        torch.manual_seed(1)  # same dropout masks
        out = net(x, mode="train")
        target = torch.cat([x[:, :1], x[:, 1:].flip(-1)], 1)
        BSAFusionLoss(adaptive_lambda=False)(out, target).backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    layout = torch.channels_last
    assert fast.encoder_shallow.proj.weight.is_contiguous(memory_format=layout)
    assert ref.encoder_shallow.proj.weight.is_contiguous()
    seen = []  # the path really runs channels-last: a decoder convolution's output
    hook = fast.fusion.stages[-1].ffn_out.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(
        memory_format=layout)))
    fast(x, mode="fuse")
    hook.remove()
    assert seen == [True]
    for key in ("fused", "aligned", "ddf", "logits_fixed", "logits_moving"):
        torch.testing.assert_close(outs[1][key], outs[0][key], atol=1e-5, rtol=1e-4, msg=key)
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 100
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-4, rtol=1e-3, msg=name)
    for (k, a), b in zip(ref.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), k
    set_fast(fast, False)
    fast(x, mode="fuse")
    assert fast.encoder_shallow.proj.weight.is_contiguous()  # back to NCHW for the reference path


def test_aligned_output_is_monai_warp_of_moving_by_ddf(small_net):
    from monai.networks.blocks import Warp

    x = _pair(1, 32, 48)
    with torch.no_grad():
        full = small_net(x, mode="full")
    expected = Warp(mode="bilinear", padding_mode="border")(x[:, 1:], full["ddf"])
    torch.testing.assert_close(full["aligned"], expected, atol=1e-5, rtol=0)
    assert full["ddf"].abs().max() > 0.1  # random weights give a non-trivial field


def test_field_warp_border_identity_and_official_quirk():
    img = torch.rand(1, 3, 20, 20)
    zero = torch.zeros(1, 2, 20, 20)
    torch.testing.assert_close(FieldWarp(official=False)(img, zero), img, atol=1e-6, rtol=0)
    # the official Warper2d: normalise with (N - 1), sample with align_corners=False and zero padding
    flow = torch.randn(1, 2, 20, 20) * 2  # (column, row) order
    ys, xs = torch.meshgrid(torch.arange(20.0), torch.arange(20.0), indexing="ij")
    grid = torch.stack([2 * (xs + flow[0, 0]) / 19 - 1, 2 * (ys + flow[0, 1]) / 19 - 1], -1)[None]
    expected = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(FieldWarp(official=True)(img, flow), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(FieldWarp(official=True)(img, zero), img, atol=1e-3)  # a zero field is not identity


def test_token_shift_option_changes_only_registration_tokens(small_net):
    fixed = BSAFusion(**SMALL, token_shift=False).eval()
    fixed.load_state_dict(small_net.state_dict())
    x = _pair(1, 32, 32)
    with torch.no_grad():
        a, b = small_net(x, mode="full"), fixed(x, mode="full")
    torch.testing.assert_close(a["logits_fixed"], b["logits_fixed"])  # classifier unaffected
    assert not torch.allclose(a["ddf"], b["ddf"])


def test_bad_inputs_and_arguments_raise(small_net):
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        small_net(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="mode"):
        small_net(torch.rand(1, 2, 32, 32), mode="nope")
    with pytest.raises(ValueError, match="spatial_dims"):
        BSAFusion(spatial_dims=4)
    with pytest.raises(ValueError, match="patch_size"):
        BSAFusion(patch_size=8)
    with pytest.raises(ValueError, match="fusion_channels"):
        BSAFusion(fusion_channels=(16, 8, 4))
    with pytest.raises(ValueError, match=r"\(B, 2, D, H, W\)"):
        BSAFusion(spatial_dims=3, **SMALL3)(torch.rand(1, 2, 8, 8))


def test_default_parameter_count_matches_official_minus_dead_tensors():
    net = BSAFusion()
    total = sum(p.numel() for p in net.parameters())
    # official 10,028,296 minus never-used tensors: 8 ViT blocks' norm_layer1 (8 x 512), the classifier's and
    # discriminator's final norms (2 x 512) and the discriminator's image embedding (196,864 + 65,536)
    assert total == 10_028_296 - 8 * 512 - 2 * 512 - 196_864 - 65_536
    frozen = sum(p.numel() for p in net.discriminator.parameters())
    assert all(not p.requires_grad for p in net.discriminator.parameters()) and frozen > 0


def test_epoch_completed_copies_classifier_into_discriminator(small_net):
    net = BSAFusion(**SMALL)
    net.classifier.head[2].weight.data.fill_(0.5)
    assert not torch.equal(net.discriminator.head[2].weight, net.classifier.head[2].weight)
    net.epoch_completed()
    for k, v in net.discriminator.state_dict().items():
        torch.testing.assert_close(v, net.classifier.state_dict()[k])


# ------------------------------------------------------------------------------------------------ converter
def test_converter_accepts_official_nested_checkpoint_and_rejects_bad_ones(tmp_path):
    flat = torch.load(require_path(PARITY_DIR / "bsafusion" / "state_dict.pt"), weights_only=True)
    parts = ("encoder", "transfer", "reg_net", "fusion_net")
    nested = {f"{p}_state_dict": {k[len(p) + 1:]: v for k, v in flat.items() if k.startswith(p + ".")} for p in parts}
    nested["epoch"] = torch.tensor(3000)
    path = tmp_path / "BSAFusion_CT.pkl"
    torch.save(nested, path)
    converted = convert_state_dict("bsafusion", load_official_checkpoint(path))
    assert converted.keys() == convert_state_dict("bsafusion", flat).keys()
    BSAFusion().load_state_dict(converted, strict=True)
    with pytest.raises(CheckpointConversionError, match="unexpected keys"):
        convert_state_dict("bsafusion", {**flat, "fusion_net.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointConversionError, match="missing keys"):
        convert_state_dict("bsafusion", {k: v for k, v in flat.items() if "reg_net.f1_FR3" not in k})
    with pytest.raises(CheckpointConversionError, match="already has the converted"):
        convert_state_dict("bsafusion", converted)


# ------------------------------------------------------------------------------------------------ loss
def _train_out(net, x):
    return net(x, mode="train")


def test_loss_terms_gradients_and_adaptive_lambda(small_net):
    net = BSAFusion(**SMALL).train()
    loss = BSAFusionLoss()
    x = _pair(2, 32, 32)
    out = _train_out(net, x)
    terms = loss.terms(out, x)
    assert set(terms) == {"ce", "confusion", "smooth", "fusion", "reg"}
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["confusion"] >= 2 * math.log(2) - 1e-4  # CE against (1/2, 1/2) is minimal at equal logits
    total = loss(out, x)
    total.backward()
    for name in ("registration.moving_steps.4.flow.weight", "fusion.reconstruct.1.proj.weight",
                 "classifier.head.2.weight", "encoder_shallow.proj.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in net.discriminator.parameters())
    # adaptive lambda: ratio of the epoch's SSIM-loss sums (moving / fixed); 1 before the first epoch
    assert float(loss.fusion_lambda) == 1.0
    with torch.no_grad():
        t = loss.terms(_train_out(net, x), x)
    loss.epoch_completed()
    assert float(loss.fusion_lambda) != 1.0 and 0 < float(loss.fusion_lambda) < 10
    assert float(loss._sums.abs().sum()) == 0


def test_loss_field_term_is_end_point_error_of_appended_true_field(small_net):
    torch.manual_seed(0)
    x = _pair(2, 32, 32)
    out = _train_out(small_net, x)
    truth = torch.randn(2, 2, 32, 32)
    target = torch.cat([x, truth], 1)  # [fixed, aligned moving, true field (row, column)]
    terms = BSAFusionLoss().terms(out, target)
    expected = (out["ddf"] - truth).pow(2).sum(1).sqrt().mean()
    torch.testing.assert_close(terms["field"], expected)
    off, on = BSAFusionLoss(), BSAFusionLoss(field_weight=0.5)
    with torch.no_grad():
        torch.testing.assert_close(on(out, target) - off(out, target), 0.5 * expected)
        torch.testing.assert_close(off(out, target), off(out, x))  # weight 0: the field is carried, not scored
    with pytest.raises(ValueError, match="field_weight > 0 needs the true field"):
        on(out, x)
    with pytest.raises(ValueError, match=r"target must be \(B, 2, \*S\)"):
        off(out, torch.cat([x, truth[:, :1]], 1))


def test_smoothness_schedules_official_ignores_fine_levels():
    official, intended = BSAFusionLoss(smooth_schedule="official"), BSAFusionLoss()
    assert official.level_weights[6:] == (0, 0, 0, 0) and all(w > 0 for w in intended.level_weights)
    torch.manual_seed(0)
    phis = [torch.zeros(1, 2, s, s) for s in (4, 4, 8, 8, 16, 16, 32, 32, 64, 64)]
    rough = [p.clone() for p in phis]
    rough[8] = torch.randn_like(rough[8])  # a rough finest fixed-chain field

    def smooth(loss, fields):
        total = 0
        for w, phi in zip(loss.level_weights, fields):
            total = total + w * loss.smoothness(phi)
        return float(total)

    assert smooth(official, rough) == smooth(official, phis) == 0.0
    assert smooth(intended, rough) > 0.1
    with pytest.raises(ValueError, match="smooth_schedule"):
        BSAFusionLoss(smooth_schedule="x")


def test_loss_rejects_tensor_prediction():
    with pytest.raises(ValueError, match="mode='train'"):
        BSAFusionLoss()(torch.rand(1, 1, 32, 32), torch.rand(1, 2, 32, 32))


# ------------------------------------------------------------------------------------------------ misalignment
def _real_image(aanlib_dir, rel="CT-MRI/001/ct_aligned.png"):
    return torch.from_numpy(np.asarray(Image.open(aanlib_dir / rel), dtype=np.float32) / 255.0)[None]


def test_misalignment_magnitude_matches_official_recipe_and_is_invertible(aanlib_dir):
    img = _real_image(aanlib_dir)
    t = RandMisalignd()
    t.set_random_state(3)
    d = t({"image": torch.cat([img, img]), "label": torch.cat([img, img])})
    u = t.field((256, 256))
    norm = u.norm(dim=0)
    assert 2.0 < float(u.std()) < 3.5  # official: ~3 px per axis
    assert 2.5 < float(norm.median()) < 5.0 and 5.0 < float(norm.quantile(0.95)) < 9.5  # official 3.6 / 6.9 px
    assert torch.equal(d["image"][0], img[0]) and torch.equal(d["label"], torch.cat([img, img]))
    before = float((d["image"][1] - img[0]).abs().mean())
    back = warp(d["image"][1:], d["ddf_gt"])
    after = float((back - img).abs().mean())
    assert before > 0.01 and after < before / 4
    assert folding_fraction(d["ddf_gt"]) == 0.0


def test_misalignment_is_reproducible_and_optional():
    x = torch.rand(2, 40, 40)
    a, b = RandMisalignd(), RandMisalignd()
    a.set_random_state(7), b.set_random_state(7)
    torch.testing.assert_close(a({"image": x})["image"], b({"image": x})["image"])
    off = RandMisalignd(prob=0.0)({"image": x})
    assert torch.equal(off["image"], x) and float(off["ddf_gt"].abs().max()) == 0.0
    with pytest.raises(ValueError, match="2D"):
        RandMisalignd()({"image": torch.rand(2, 4, 4, 4, 4)})


def test_misalignment_affine_rotation_about_centre():
    t = RandMisalignd(magnitude=0.0, translate=0.0, rotate=10.0)
    t.set_random_state(0)
    t.randomize((41, 41))
    u = t.field((41, 41))
    angle = math.radians(t._affine[0])
    assert abs(float(u[:, 20, 20].abs().max())) < 1e-5  # the centre stays
    # the corner (0, 0) is 20*sqrt(2) px from the centre: it moves by 2 r sin(angle / 2)
    expected = 2 * 20 * math.sqrt(2) * abs(math.sin(angle / 2))
    assert abs(float(u[:, 0, 0].norm()) - expected) < 1e-3


# ------------------------------------------------------------------------------------------------ field tools
def test_jacobian_and_folding_of_known_fields():
    grid = torch.stack(torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij"))
    translation = torch.full((2, 16, 16), 3.0)
    torch.testing.assert_close(jacobian_determinant(translation), torch.ones(16, 16))
    assert folding_fraction(translation) == 0.0
    flip = -2 * (grid - 7.5)  # p + u = -(p - c) + c: a point reflection, det = (-1)(-1) = 1, no folding
    torch.testing.assert_close(jacobian_determinant(flip), torch.ones(16, 16))
    mirror = torch.stack([-2 * (grid[0] - 7.5), torch.zeros(16, 16)])  # mirror one axis: det = -1 everywhere
    assert folding_fraction(mirror) == 1.0
    inv = invert_ddf(translation)
    torch.testing.assert_close(inv, -translation)


def test_registration_scores_before_and_after():
    truth = torch.rand(1, 32, 32)
    moving = torch.roll(truth, 2, dims=1)
    s = registration_scores(truth.clone(), truth, moving, ddf=torch.zeros(2, 32, 32), ddf_truth=torch.ones(2, 32, 32))
    assert s["MAE"] == 0.0 and s["NCC"] == pytest.approx(1.0) and s["SSIM"] == pytest.approx(1.0, abs=1e-4)
    assert s["MAE_before"] > 0.1 and s["NCC_before"] < 0.9
    assert s["folding"] == 0.0 and s["EPE"] == pytest.approx(math.sqrt(2))


def test_split_and_save_registration_outputs(tmp_path):
    import nibabel as nib

    ddf = torch.randn(2, 24, 20)
    d = {"pred": {"fused": torch.rand(1, 24, 20), "aligned": torch.rand(1, 24, 20), "ddf": ddf},
         "source_b_chroma": torch.full((2, 24, 20), 128.0), "name": "../evil/pair 1"}
    d = SplitRegistrationd()(d)
    assert d["pred"].shape == (1, 24, 20) and torch.equal(d["ddf"], ddf)
    torch.testing.assert_close(d["source_b_chroma"], torch.full((2, 24, 20), 128.0))  # constant chroma stays
    out = SaveRegistrationd(output_dir=tmp_path)(d)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["_evil_pair 1_aligned.png", "_evil_pair 1_ddf.nii.gz", "_evil_pair 1_ddf.pt",
                     "_evil_pair 1_grid.png"]
    assert len(out["registration_files"]) == 4
    torch.testing.assert_close(torch.load(tmp_path / "_evil_pair 1_ddf.pt", weights_only=True)["ddf"], ddf)
    nii = nib.load(tmp_path / "_evil_pair 1_ddf.nii.gz")
    assert nii.shape == (24, 20, 1, 1, 2) and nii.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(np.asarray(nii.dataobj)[:, :, 0, 0, 1], ddf[1].numpy(), atol=1e-6)
    grid = np.asarray(Image.open(tmp_path / "_evil_pair 1_grid.png"))
    assert grid.shape == (20, 24, 3)
    # a non-registering method's output has no registration keys: nothing written
    assert "registration_files" not in SaveRegistrationd(output_dir=tmp_path / "x")({"pred": torch.rand(1, 4, 4)})


# ------------------------------------------------------------------------------------------------ workflows
def test_workflows_train_infer_evaluate_registration(tmp_path, aanlib_dir):
    from test_workflows import CONFIGS, _tiny_dataset, _workflow

    data = _tiny_dataset(tmp_path / "data", n=4, size=32)
    run = tmp_path / "run"
    small = {**SMALL, "reg_channels": list(SMALL["reg_channels"]), "fusion_channels": list(SMALL["fusion_channels"])}
    wf = _workflow("train", str(CONFIGS / "train.json"), method="bsafusion", dataset_dir=str(data),
                   output_dir=str(run), epochs=1, batch_size=2, patch_size=[32, 32], network_overrides=small)
    wf.initialize()
    # the moving channel is misaligned on the fly, and the label carries the true field (for field_weight)
    assert isinstance(wf.parser.get_parsed_content("train#preprocessing").transforms[-2], RandMisalignd)
    sample = wf.parser.get_parsed_content("train#dataset")[0]
    assert sample["label"].shape == (4, 32, 32) and torch.equal(sample["label"][2:], sample["ddf_gt"])
    wf.run()
    wf.finalize()
    ckpt = run / "model_final.pt"
    state = torch.load(ckpt, weights_only=True)["model"] if "model" in torch.load(ckpt, weights_only=True) \
        else torch.load(ckpt, weights_only=True)
    net = BSAFusion(**SMALL)
    net.load_state_dict(state)
    # the per-epoch hook copied the trained classifier into the frozen discriminator
    torch.testing.assert_close(net.discriminator.head[2].weight, net.classifier.head[2].weight)

    fused = tmp_path / "fused"
    wf = _workflow("infer", str(CONFIGS / "inference.json"), method="bsafusion", dataset_dir=str(data),
                   output_dir=str(fused), ckpt_path=str(ckpt), network_overrides=small)
    wf.initialize()
    wf.run()
    wf.finalize()
    names = {p.name for p in fused.iterdir()}
    for stem in ("MRI_CT_00", "MRI_PET_00"):
        for suffix in ("_fused.png", "_fused_rgb.png", "_aligned.png", "_ddf.pt", "_ddf.nii.gz", "_grid.png"):
            assert any(n.endswith(suffix) and "00" in n and stem.split("_")[1] in n for n in names), (stem, suffix)
    pet_rgb = next(p for p in fused.iterdir() if "PET" in p.name and p.name.endswith("_fused_rgb.png"))
    rgb = np.asarray(Image.open(pet_rgb)).astype(int)
    assert rgb.shape == (32, 32, 3) and np.abs(rgb[..., 0] - rgb[..., 2]).max() > 20  # chroma put back

    out = tmp_path / "eval"
    wf = _workflow("infer", str(CONFIGS / "evaluate.json"), method="bsafusion", dataset_dir=str(aanlib_dir),
                   pairs=["CT-MRI"], output_dir=str(out), ckpt_path=str(ckpt), network_overrides=small,
                   figures=False)
    wf.initialize()
    wf.run()
    wf.finalize()
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(r["method"] == "bsafusion" for r in rows)
    for key in ("reg_MAE", "reg_NCC", "reg_SSIM", "reg_folding", "Qabf", "SSIM"):
        values = [float(r[key]) for r in rows]
        assert all(np.isfinite(values)), key
    assert all(0.0 <= float(r["reg_folding"]) <= 1.0 for r in rows)
    # fusion is scored against the aligned ground truth, and the moving image was what got fused
    assert all(r["aligned_b"].endswith("ct_aligned.png") and r["source_b"].endswith("ct_moving.png") for r in rows)


def _overfit_alignment(net, mri, moving, truth, steps: int) -> dict:
    """Adam (1e-3) on the supervised alignment + smoothness terms only, for one (mri, moving) pair whose aligned
    moving image is ``truth``; starts from the identity field (zero-initialised heads); returns the full output."""
    loss = BSAFusionLoss(ce_weight=0, confusion_weight=0, fusion_weight=0)
    x, target = torch.cat([mri, moving])[None], torch.cat([mri, truth])[None]
    with torch.no_grad():
        assert float(net(x, mode="full")["ddf"].abs().max()) == 0.0  # zero-initialised heads: identity
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-3)
    for _ in range(steps):
        out = net(x, mode="train")
        opt.zero_grad()
        loss(out, target).backward()
        opt.step()
    with torch.no_grad():
        return net(x, mode="full")


def test_registration_path_learns_a_known_translation():
    """The supervised alignment loss reaches the field through MONAI Warp: overfitting one pair whose moving
    image is shifted by 1.5 px recovers the inverse shift."""
    torch.manual_seed(0)
    net = BSAFusion(**SMALL, zero_init_fields=True)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    truth = (torch.sin(9 * xx) * torch.cos(7 * yy) * 0.5 + 0.5)[None]
    mri = (torch.cos(5 * xx + 1) * torch.sin(8 * yy) * 0.5 + 0.5)[None]
    moving = warp(truth, torch.full((2, 32, 32), 1.5))
    out = _overfit_alignment(net, mri, moving, truth, steps=60)
    inner = (..., slice(4, -4), slice(4, -4))
    before = float((moving - truth).abs()[inner].mean())
    after = float((out["aligned"][0] - truth).abs()[inner].mean())
    assert after < 0.25 * before
    torch.testing.assert_close(out["ddf"][0][inner].mean((1, 2)), torch.tensor([-1.5, -1.5]), atol=0.4, rtol=0)


# ------------------------------------------------------------------------------------------------ 3D
def _smooth_volume(shape, a=(5.0, 7.0, 3.0), phase=0.0):
    zz, yy, xx = torch.meshgrid(*(torch.linspace(0, 1, s) for s in shape), indexing="ij")
    return (torch.sin(a[0] * xx + phase) * torch.cos(a[1] * yy) * torch.sin(a[2] * zz + 1) * 0.5 + 0.5)[None]


def test_3d_network_every_mode_shapes_and_monai_order_ddf():
    torch.manual_seed(0)
    net = BSAFusion(spatial_dims=3, **SMALL3, zero_init_fields=False).eval()
    assert net.spatial_dims == 3 and net.patch_size == 4
    assert tuple(net.classifier.pos_table.shape) == (1, 16, 4, 4, 4)  # the learned 3D token table
    x = torch.rand(2, 2, 10, 13, 9)  # not multiples of the patch: padded and cropped back (shapes below)
    with torch.no_grad():
        fused = net(x)
        full = net(x, mode="full")
        train = net(x, mode="train")
    assert fused.shape == (2, 1, 10, 13, 9) and torch.isfinite(fused).all() and 0 < fused.min() < fused.max() < 1
    assert torch.equal(full["fused"], fused)
    assert full["ddf"].shape == (2, 3, 10, 13, 9) and full["aligned"].shape == (2, 1, 10, 13, 9)
    assert full["logits_fixed"].shape == (2, 2) and "aligned_official" in full
    assert all(torch.isfinite(v).all() for v in full.values())
    assert float(full["ddf"].abs().max()) > 0.1
    # the public ddf is MONAI order: Warp(moving, ddf) is the aligned output; flow is its (W, H, D) flip
    from monai.networks.blocks import Warp

    x8 = torch.rand(1, 2, 8, 12, 8)  # multiples of the patch: no padding, so the warp sees the same border
    with torch.no_grad():
        f8 = net(x8, mode="full")
    torch.testing.assert_close(f8["aligned"], Warp("bilinear", "border")(x8[:, 1:], f8["ddf"]), atol=1e-5, rtol=0)
    assert torch.equal(train["ddf"], train["flow"].flip(1))
    assert [tuple(p.shape[1:]) for p in train["phis"][::2]] == [(3, 3, 4, 3), (3, 6, 8, 6), (3, 12, 16, 12)]
    assert train["logits_disc_fixed"].shape == (2, 2)
    # 3D defaults: CPU-sized widths, zero-initialised field heads (identity)
    dflt = BSAFusion(spatial_dims=3).eval()
    assert dflt.patch_size == 8 and dflt.classifier.pos_table.shape == (1, 64, 4, 4, 4)
    with torch.no_grad():
        out = dflt(torch.rand(1, 2, 16, 16, 16), mode="full")
    assert out["ddf"].shape == (1, 3, 16, 16, 16) and float(out["ddf"].abs().max()) == 0.0


def test_3d_field_warp_official_quirk_and_identity():
    img = torch.rand(1, 2, 6, 7, 8)
    zero = torch.zeros(1, 3, 6, 7, 8)
    torch.testing.assert_close(FieldWarp(official=False)(img, zero), img, atol=1e-6, rtol=0)
    flow = torch.randn(1, 3, 6, 7, 8)  # (W, H, D) order, grid_sample's
    zs, ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), torch.arange(8.0), indexing="ij")
    grid = torch.stack([2 * (xs + flow[0, 0]) / 7 - 1, 2 * (ys + flow[0, 1]) / 6 - 1,
                        2 * (zs + flow[0, 2]) / 5 - 1], -1)[None]
    expected = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(FieldWarp(official=True)(img, flow), expected, atol=1e-5, rtol=0)


def test_3d_loss_terms_and_backward():
    torch.manual_seed(0)
    net = BSAFusion(spatial_dims=3, **SMALL3, zero_init_fields=False).train()
    loss = BSAFusionLoss()
    x = torch.cat([_smooth_volume((16, 16, 16)), _smooth_volume((16, 16, 16), phase=1.0)])[None]
    out = net(x, mode="train")
    terms = loss.terms(out, x)
    assert set(terms) == {"ce", "confusion", "smooth", "fusion", "reg"}
    assert all(torch.isfinite(v) for v in terms.values()) and float(terms["smooth"]) > 0
    loss(out, x).backward()
    params = dict(net.named_parameters())
    for name in ("registration.moving_steps.2.flow.weight", "registration.fixed_steps.0.flow.weight",
                 "fusion.reconstruct.1.proj.weight", "classifier.pos_table", "encoder_shallow.proj.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="target"):
        loss.terms(out, x[..., 0])  # a 2D target for a 3D prediction


def test_3d_misalignment_round_trip_and_statistics():
    truth = _smooth_volume((24, 28, 20))
    t = RandMisalignd(sigma=4.0, magnitude=32.0, translate=1.5)  # per-axis std ~1.3 + translation
    t.set_random_state(5)
    d = t({"image": torch.cat([truth, truth])})
    u = t.field((24, 28, 20))
    assert d["ddf_gt"].shape == (3, 24, 28, 20) and torch.equal(d["image"][0], truth[0])
    torch.testing.assert_close(d["image"][1:], warp(truth, u))  # the stored draw is the applied one
    # the stored ground truth undoes the warp: warping the deformed volume by it gives back the original
    before = float((d["image"][1:] - truth).abs()[:, 3:-3, 3:-3, 3:-3].mean())
    after = float((warp(d["image"][1:], d["ddf_gt"]) - truth).abs()[:, 3:-3, 3:-3, 3:-3].mean())
    assert before > 0.02 and after < before / 4
    assert folding_fraction(d["ddf_gt"]) == 0.0
    # the 3D gain keeps the 2D recipe's per-axis std of the elastic part (same sigma and magnitude)
    t2, t3 = RandMisalignd(sigma=4.0, translate=0.0), RandMisalignd(sigma=4.0, translate=0.0)
    t2.set_random_state(0), t3.set_random_state(0)
    t2.randomize((96, 96)), t3.randomize((40, 40, 40))
    ratio = float(t3.field((40, 40, 40)).std() / t2.field((96, 96)).std())
    assert 0.75 < ratio < 1.33, ratio
    # rotations about the centre: the centre stays, the mapping is volume-preserving
    r = RandMisalignd(magnitude=0.0, translate=0.0, rotate=10.0)
    r.set_random_state(1)
    r.randomize((21, 21, 21))
    v = r.field((21, 21, 21))
    assert float(v[:, 10, 10, 10].abs().max()) < 1e-5 and float(v.abs().max()) > 1.0
    torch.testing.assert_close(jacobian_determinant(v)[2:-2, 2:-2, 2:-2], torch.ones(17, 17, 17), atol=1e-4, rtol=0)
    off = RandMisalignd(prob=0.0)({"image": torch.rand(2, 4, 5, 6)})
    assert off["ddf_gt"].shape == (3, 4, 5, 6) and float(off["ddf_gt"].abs().max()) == 0.0


def test_3d_jacobian_folding_and_scores():
    shape = (10, 12, 8)
    grid = torch.stack(torch.meshgrid(*(torch.arange(float(s)) for s in shape), indexing="ij"))
    centre = torch.tensor([(s - 1) / 2 for s in shape]).view(3, 1, 1, 1)
    shift = torch.full((3, *shape), 2.0)
    torch.testing.assert_close(jacobian_determinant(shift), torch.ones(shape))
    torch.testing.assert_close(jacobian_determinant(shift[None])[0], torch.ones(shape))  # batched
    torch.testing.assert_close(jacobian_determinant(0.1 * (grid - centre)), torch.full(shape, 1.1 ** 3))
    mirror = torch.zeros(3, *shape)
    mirror[1] = -2 * (grid[1] - centre[1])  # mirror axis 1: det = -1
    assert folding_fraction(mirror) == 1.0 and folding_fraction(shift) == 0.0
    torch.testing.assert_close(invert_ddf(shift), -shift)
    truth = _smooth_volume((16, 16, 16))
    moving = warp(truth, torch.full((3, 16, 16, 16), 1.0))
    s = registration_scores(truth.clone(), truth, moving, ddf=torch.zeros(3, 16, 16, 16),
                            ddf_truth=torch.ones(3, 16, 16, 16))
    assert s["MAE"] == 0.0 and s["SSIM"] == pytest.approx(1.0, abs=1e-4) and s["MAE_before"] > 0.01
    assert s["EPE"] == pytest.approx(math.sqrt(3)) and s["EPE_before"] == pytest.approx(math.sqrt(3))
    assert s["folding"] == 0.0


def test_3d_registration_path_learns_a_known_translation():
    """The 3D gradient path: overfitting one volume pair whose moving volume is shifted by a different amount along
    each axis recovers the inverse shift, component by component in MONAI order, through MONAI Warp in 3D."""
    torch.manual_seed(0)
    net = BSAFusion(spatial_dims=3, **SMALL3, dropout=0.0)  # 3D default: zero-initialised field heads
    shape = (16, 16, 16)
    truth, mri = _smooth_volume(shape), _smooth_volume(shape, a=(4.0, 6.0, 5.0), phase=2.0)
    shift = torch.tensor([1.5, -1.0, 0.5])  # axis 0, 1, 2
    moving = warp(truth, shift.view(3, 1, 1, 1).expand(3, *shape))
    out = _overfit_alignment(net, mri, moving, truth, steps=25)
    inner = (..., slice(3, -3), slice(3, -3), slice(3, -3))
    before = float((moving - truth).abs()[inner].mean())
    after = float((out["aligned"][0] - truth).abs()[inner].mean())
    assert after < 0.25 * before, (before, after)
    torch.testing.assert_close(out["ddf"][0][inner].mean((1, 2, 3)), -shift, atol=0.4, rtol=0)


def test_3d_registration_check_reports_before_and_after(tmp_path):
    """scripts.registration.evaluate_misaligned_volumes on tiny synthetic volumes: the identity network's 'after'
    equals 'before'; the JSON holds per-pair and mean scores."""
    import json

    import nibabel as nib

    from scripts.registration import evaluate_misaligned_volumes

    items = []
    for i in range(2):
        mr, ct = _smooth_volume((20, 24, 16), phase=i), _smooth_volume((20, 24, 16), a=(3.0, 4.0, 6.0), phase=i)
        for name, vol in (("mr", mr), ("ct", ct)):
            nib.save(nib.Nifti1Image(vol[0].numpy(), np.eye(4)), tmp_path / f"{name}{i}.nii.gz")
        items.append({"name": f"p{i}", "pair": "CT-MRI", "source_a": f"mr{i}.nii.gz", "source_b": f"ct{i}.nii.gz",
                      "modality_a": "MRI", "modality_b": "CT"})
    (tmp_path / "datalist_3d.json").write_text(json.dumps({"testing": items}))
    torch.manual_seed(0)
    net = BSAFusion(spatial_dims=3, **SMALL3)  # zero-initialised fields: the identity
    res = evaluate_misaligned_volumes(network=net, bundle_root=BUNDLE_ROOT, dataset_dir=tmp_path, seed=3,
                                      misalign={"sigma": 4.0, "magnitude": 32.0}, output_json=tmp_path / "r.json",
                                      log=lambda *_: None)
    assert len(res["pairs"]) == 2 and json.loads((tmp_path / "r.json").read_text())["mean"] == res["mean"]
    for r in res["pairs"]:
        assert r["MAE_before"] > 0.005 and r["MAE"] == pytest.approx(r["MAE_before"], abs=1e-6)
        assert r["EPE"] == pytest.approx(r["EPE_before"], abs=1e-6) and r["folding"] == 0.0
    assert res["settings"]["misalign"]["translate"] == 2.56 and res["settings"]["misalign"]["sigma"] == 4.0


def test_3d_registration_outputs_are_saved(tmp_path):
    """A native 3D run's outputs (MetaTensors from the inferer): aligned NIfTI, 3-component vector NIfTI on the MRI
    affine, and a ddf.pt that loads with weights_only=True; no grid picture for volumes."""
    import nibabel as nib
    from monai.data import MetaTensor

    aff = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    src = tmp_path / "mr.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(6, 7, 5).astype(np.float32), aff.numpy()), src)
    ref = MetaTensor(torch.rand(1, 6, 7, 5), affine=aff, meta={"filename_or_obj": str(src)})
    ddf = MetaTensor(torch.randn(3, 6, 7, 5), affine=aff)
    d = SaveRegistrationd(output_dir=tmp_path / "out")({"aligned": MetaTensor(torch.rand(1, 6, 7, 5), affine=aff),
                                                        "ddf": ddf, "source_a": ref, "name": "v"})
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["v_aligned.nii.gz", "v_ddf.nii.gz", "v_ddf.pt"] and len(d["registration_files"]) == 3
    loaded = torch.load(tmp_path / "out" / "v_ddf.pt", weights_only=True)["ddf"]
    assert type(loaded) is torch.Tensor and torch.equal(loaded, ddf.as_tensor())
    nii = nib.load(tmp_path / "out" / "v_ddf.nii.gz")
    assert nii.shape == (6, 7, 5, 1, 3) and np.allclose(nii.affine, aff.numpy())


# ------------------------------------------------------------------------------ test-time MI refinement (opt-in)
def _shift(img, ddf_value):
    """Pull-warp ``img`` (1, *S) by a constant field (MONAI order) through MONAI Warp."""
    ddf = torch.tensor(ddf_value, dtype=torch.float32).view(-1, *[1] * (img.ndim - 1)).expand(-1, *img.shape[1:])
    return warp(img, ddf.contiguous())


@pytest.mark.parametrize("dims", [2, 3])
def test_refine_field_mi_recovers_a_cross_modal_translation(dims):
    """Moving = the fixed image with inverted contrast (no intensity match possible, MI still peaks at alignment),
    shifted by a known translation: the refined field undoes it and the warped image gets closer to the truth."""
    from scripts.registration import refine_field_mi

    if dims == 2:
        fixed = _smooth_volume((1, 64, 64))[:, 0]
        shift = [2.0, -1.5]
    else:
        fixed = _smooth_volume((32, 32, 32))
        shift = [1.5, -1.0, 1.0]
    truth = 1 - fixed  # the moving modality, aligned
    moving = _shift(truth, [-s for s in shift])  # misaligned by -shift: pulling by +shift re-aligns it
    ddf = refine_field_mi(fixed[None], moving[None], iterations=150, downsample=2, grid=4, lr=0.3)
    assert ddf.shape == (1, dims, *fixed.shape[1:]) and not ddf.requires_grad
    centre = (slice(None),) + (slice(8, -8),) * dims  # borders: clamped samples carry no information
    mean = ddf[0][centre].flatten(1).mean(1)
    assert torch.allclose(mean, torch.tensor(shift), atol=0.5), mean
    before = (moving - truth)[centre].abs().mean()
    after = (warp(moving, ddf[0]) - truth)[centre].abs().mean()
    assert after < 0.5 * before


def test_refine_field_mi_lowers_mae_on_real_ct_mri_pairs(aanlib_dir):
    """AANLIB CT-MRI: the deformed CT registered onto the MRI by MI (defaults, from the identity) is closer to its
    aligned ground truth than the deformed input (MAE and NCC), pair by pair."""
    from scripts.registration import refine_field_mi

    for pid in ("003", "009"):
        mri, moving, truth = (_real_image(aanlib_dir, f"CT-MRI/{pid}/{n}.png")[None]
                              for n in ("mri", "ct_moving", "ct_aligned"))
        ddf = refine_field_mi(mri, moving)
        s = registration_scores(warp(moving[0], ddf[0]), truth[0], moving[0], ddf=ddf[0])
        assert s["MAE"] < 0.97 * s["MAE_before"] and s["NCC"] > s["NCC_before"], (pid, s)
        assert s["folding"] == 0.0


def test_bsafusion_refine_option_eval_only_and_validated(small_net):
    x = _pair(h=32, w=32)
    torch.manual_seed(0)
    net = BSAFusion(**SMALL, refine_iters=5, refine_init="identity").eval()
    net.load_state_dict(small_net.state_dict())
    with torch.inference_mode():  # autograd for the refinement works inside inference mode
        plain = small_net(x, mode="full")
        refined = net(x, mode="full")
    assert refined["ddf"].shape == plain["ddf"].shape and not torch.allclose(refined["ddf"], plain["ddf"])
    assert torch.allclose(refined["aligned"], warp(x[:, 1:], refined["ddf"]), atol=1e-5)
    assert torch.equal(refined["logits_fixed"], plain["logits_fixed"])
    net.refine_init = "network"  # from the predicted (inference-mode) field
    with torch.inference_mode():
        from_net = net(x, mode="full")["ddf"]
    assert torch.isfinite(from_net).all() and not torch.allclose(from_net, plain["ddf"])
    net.refine_init = "identity"
    net.train()
    small_net.train()
    torch.manual_seed(1)
    a = net(x, mode="train")["flow"]
    torch.manual_seed(1)
    b = small_net(x, mode="train")["flow"]
    small_net.eval()
    assert torch.equal(a, b)  # training never refines
    with pytest.raises(ValueError, match="refine_init"):
        BSAFusion(**SMALL, refine_init="affine")
    with pytest.raises(ValueError, match="refine_iters"):
        BSAFusion(**SMALL, refine_iters=-1)
