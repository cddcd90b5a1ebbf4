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
    with pytest.raises(ValueError, match="2D"):
        BSAFusion(spatial_dims=3)
    with pytest.raises(ValueError, match="patch_size"):
        BSAFusion(patch_size=8)


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
        RandMisalignd()({"image": torch.rand(2, 8, 8, 8)})


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
    assert isinstance(wf.parser.get_parsed_content("train#preprocessing").transforms[-1], RandMisalignd)
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


def test_registration_path_learns_a_known_translation():
    """The supervised alignment loss reaches the field through MONAI Warp: overfitting one pair whose moving
    image is shifted by 1.5 px recovers the inverse shift."""
    torch.manual_seed(0)
    net = BSAFusion(**SMALL, zero_init_fields=True)
    loss = BSAFusionLoss(ce_weight=0, confusion_weight=0, fusion_weight=0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    truth = (torch.sin(9 * xx) * torch.cos(7 * yy) * 0.5 + 0.5)[None]
    mri = (torch.cos(5 * xx + 1) * torch.sin(8 * yy) * 0.5 + 0.5)[None]
    moving = warp(truth, torch.full((2, 32, 32), 1.5))
    x, target = torch.cat([mri, moving])[None], torch.cat([mri, truth])[None]
    with torch.no_grad():
        assert float(net(x, mode="full")["ddf"].abs().max()) == 0.0  # zero-initialised heads: identity
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-3)
    for _ in range(60):
        out = net(x, mode="train")
        opt.zero_grad()
        loss(out, target).backward()
        opt.step()
    with torch.no_grad():
        out = net(x, mode="full")
    inner = (..., slice(4, -4), slice(4, -4))
    before = float((moving - truth).abs()[inner].mean())
    after = float((out["aligned"][0] - truth).abs()[inner].mean())
    assert after < 0.25 * before
    torch.testing.assert_close(out["ddf"][0][inner].mean((1, 2)), torch.tensor([-1.5, -1.5]), atol=0.4, rtol=0)
