"""Fusion-metric suite: parity with the published CDDFuse evaluator on real AANLIB pairs, plus behaviour tests."""

import csv
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_DIR, require_path
from scripts import metrics as M

REF_JSON = SHARED_DIR / "data" / "metric_reference_values.json"
RTOL = 1e-3


def _read_grey(path) -> np.ndarray:
    # the reference PNGs are 8-bit mode 'L': cv2 BGR2GRAY + round == the raw values
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32)


@pytest.fixture(scope="module")
def reference(aanlib_dir):
    ref = json.loads(require_path(REF_JSON).read_text())
    a, b, f = [], [], []
    for p in ref["pairs"]:
        mri, aligned = _read_grey(aanlib_dir / p["mri"]), _read_grey(aanlib_dir / p["aligned"])
        fused = np.round((aligned + mri) / 2)  # float32, numpy rounds .5 ties to even
        u8 = fused.astype(np.uint8)
        assert int(u8.sum()) == p["fused"]["sum"], f"fused sum mismatch for {p['pair']}/{p['id']}"
        assert hashlib.sha256(u8.tobytes()).hexdigest() == p["fused"]["sha256_uint8_rowmajor"]
        a.append(aligned), b.append(mri), f.append(fused)
    t = [torch.from_numpy(np.stack(x))[:, None] for x in (a, b, f)]
    return ref, t[0], t[1], t[2]


@pytest.fixture(scope="module")
def suite(reference):
    _, a, b, f = reference
    return M.compute_metrics(a, b, f)


def _rel(x, y):
    return abs(x - y) / max(abs(y), 1e-12)


def test_reference_metrics_match_evaluator(reference, suite):
    ref = reference[0]
    assert set(ref["metric_order"]) <= set(M.METRICS)
    worst = {}
    for name in ref["metric_order"]:
        for i, p in enumerate(ref["pairs"]):
            worst[name] = max(worst.get(name, 0.0), _rel(suite[name][i].item(), p["metrics"][name]))
    bad = {k: v for k, v in worst.items() if not v < RTOL}
    assert not bad, f"relative errors above {RTOL}: {bad} (all: {worst})"


def test_reference_components_and_variants(reference):
    ref, a, b, f = reference
    comp = torch.cat([M.mi(a, b, f, reduction="none"), M.vif(a, b, f, reduction="none"),
                      M.ssim(a, b, f, reduction="none")], 1)
    keys = ["MI(F,A)", "MI(F,B)", "VIF(A->F)", "VIF(B->F)", "SSIM(F,A)", "SSIM(F,B)"]
    mi_bits = M.mi(a, b, f, base=2)
    ssim255 = M.ssim(a, b, f, data_range=255)  # skimage 7x7 window with data_range=255 (diagnostic, not CDD)
    for i, p in enumerate(ref["pairs"]):
        for j, k in enumerate(keys):
            assert _rel(comp[i, j].item(), p["components"][k]) < RTOL, k
        assert _rel(mi_bits[i].item(), p["diagnostics"]["MI_bits_equiv"]) < RTOL
        assert _rel(ssim255[i].item(), p["diagnostics"]["SSIM_sum_skimage_data_range_255_NOT_CDD"]) < RTOL


def test_reference_half_up_rounding_variant(reference):
    """The JSON also lists the metrics of F rounded half-up: a second, independent parity point."""
    ref, a, b, _ = reference
    f_up = torch.floor((a + b) / 2 + 0.5)
    res = M.compute_metrics(a, b, f_up, names=ref["metric_order"])
    for i, p in enumerate(ref["pairs"]):
        for name, v in p["diagnostics"]["metrics_if_F_rounded_half_up_NOT_REFERENCE"].items():
            assert _rel(res[name][i].item(), v) < RTOL, (name, i)


def test_suite_outputs(reference, suite):
    n = reference[1].shape[0]
    assert list(suite) == list(M.METRICS)
    for name, v in suite.items():
        assert v.shape == (n,) and v.dtype == torch.float64 and torch.isfinite(v).all(), name
    assert ((suite["FMI"] > 0) & (suite["FMI"] <= 1)).all()
    assert ((suite["Qabf"] > 0) & (suite["Qabf"] <= 1)).all()
    for k in ("Q_Y", "Q_S", "Q_W", "Q_E"):
        assert ((suite[k] > 0) & (suite[k] <= 1)).all(), k
    assert (suite["Q_CV"] > 0).all()
    assert M.METRICS["Q_CV"][1] is False
    assert all(h for k, (_, h) in M.METRICS.items() if k != "Q_CV")
    assert M.REGISTRATION_METRICS["MAE"][1] is False and M.REGISTRATION_METRICS["NCC"][1] is True


def test_batched_equals_per_sample(reference, suite):
    _, a, b, f = reference
    idx = [0, 2, 4]  # one pair per modality
    for i in idx:
        one = M.compute_metrics(a[i:i + 1], b[i:i + 1], f[i:i + 1])
        for name, v in one.items():
            torch.testing.assert_close(v[0], suite[name][i], rtol=1e-9, atol=1e-12, msg=name)


def test_identities_on_real_images(reference):
    _, a, b, _ = reference
    x, y = a[:2], b[:2]
    # SSIM / MS-SSIM of an image with itself: 1 per source
    torch.testing.assert_close(M.ssim(x, y, x, reduction="none")[:, 0], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(M.ssim(x, y, x, convention="wang", reduction="none")[:, 0],
                               torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(M.ms_ssim(x, y, x, reduction="none")[:, 0], torch.ones(2, dtype=torch.float64))
    # MI symmetric, and MI(X;X) = H(X)
    mi_xf = M.mi(x, y, y, reduction="none")[:, 0]  # MI(F=y; A=x)
    mi_fx = M.mi(y, x, x, reduction="none")[:, 0]  # MI(F=x; A=y)
    torch.testing.assert_close(mi_xf, mi_fx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(M.mi(x, y, x, reduction="none")[:, 0], M.en(x, y, x) * math.log(2))
    # F = A = B
    assert (M.qabf(x, x, x) > 0.97).all() and (M.qabf(x, x, x) < 1).all()
    torch.testing.assert_close(M.q_cv(x, x, x), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(M.fmi(x, x, x), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(M.fmi(x, x, x, feature="none"), torch.ones(2, dtype=torch.float64))
    for fn in (M.q_y, M.piella_qs, M.piella_qw, M.piella_qe):
        torch.testing.assert_close(fn(x, x, x), torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(M.cc(x, y, x, reduction="none")[:, 0], torch.ones(2, dtype=torch.float64))
    assert torch.isinf(M.psnr(x, x, x)).all()
    torch.testing.assert_close(M.mae(x, x), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(M.ncc(x, x), torch.ones(2, dtype=torch.float64))
    # SCD of F = A + B (as deviations): r(A, A) + r(B, B) = 2
    torch.testing.assert_close(M.scd(x, y, x + y), torch.full((2,), 2.0, dtype=torch.float64))
    # MS-SSIM default backend equals MONAI's implementation
    torch.testing.assert_close(M.ms_ssim(x, y, (x + y) / 2), M.ms_ssim(x, y, (x + y) / 2, backend="monai"),
                               atol=1e-4, rtol=0)


def test_fmi_table_equals_dense_copula():
    """The binary-window lookup table and the dense per-window copula give the same FMI."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 256, (2, 1, 24, 20), generator=g).double() for _ in range(2))
    f = torch.round((a + b) / 2)
    fast = M.fmi(a, b, f, reduction="none")
    ea, eb, ef = (M._sobel_edges_matlab(v) for v in (a, b, f))
    wa, wb, wf = (torch.nn.functional.unfold(e.transpose(-1, -2), 3).transpose(1, 2).reshape(-1, 9)
                  for e in (ea, eb, ef))
    dense = torch.stack([M._fmi_windows(wa, wf).view(2, -1).mean(1), M._fmi_windows(wb, wf).view(2, -1).mean(1)], 1)
    torch.testing.assert_close(fast, dense, rtol=1e-12, atol=1e-12)
    for feat in ("none", "gradient"):
        v = M.fmi(a, b, f, feature=feat)
        assert ((v > 0) & (v <= 1)).all(), feat


def test_simple_values():
    two = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    two[..., :4] = 200.0
    assert M.en(two, two, two).item() == pytest.approx(1.0)
    assert M.sd(two, two, two).item() == pytest.approx(100.0)
    ramp = torch.arange(16.0).repeat(16, 1)[None, None]
    assert M.sf(ramp, ramp, ramp).item() == pytest.approx(1.0)  # unit row differences, no column ones
    assert M.ag(ramp, ramp, ramp).item() == pytest.approx(math.sqrt(0.5))
    assert M.ag(ramp, ramp, ramp, normalization="interior").item() == pytest.approx(math.sqrt(0.5) * 256 / 225)
    assert M.sf(ramp, ramp, ramp, normalization="total").item() == pytest.approx(math.sqrt(15 / 16))
    f = torch.full_like(ramp, 100.0)
    assert M.psnr(ramp, ramp, f, peak=255).item() == pytest.approx(
        10 * math.log10(255 ** 2 / ((ramp - 100) ** 2).mean().item()))
    assert M.mi(ramp, ramp, ramp, base=2).item() == pytest.approx(2 * 4.0)  # 16 equiprobable levels, 2 sources


def test_constant_images_documented_values_or_errors():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 1, 64, 64), generator=g).double()
    c = torch.full_like(x, 7.0)
    # documented values, never NaN
    assert M.sd(x, x, c).eq(0).all() and M.en(x, x, c).eq(0).all()
    assert M.scd(c, c, x).eq(0).all() and M.cc(c, c, x).eq(0).all() and M.ncc(c, x).eq(0).all()
    assert M.mi(c, c, x).abs().max() < 1e-12
    for fn in (M.ssim, M.q_y, M.piella_qs, M.piella_qw, M.piella_qe, M.fmi):
        assert torch.isfinite(fn(c, c, x)).all(), fn.__name__
        assert torch.isfinite(fn(c, c, c)).all(), fn.__name__
    assert torch.isfinite(M.vif(x, x, c)).all()  # constant F is fine, only the reference matters
    assert torch.isfinite(M.qabf(x, c, c)).all()
    # undefined: clear errors naming the problem
    with pytest.raises(ValueError, match="VIF undefined"):
        M.vif(c, x, x)
    with pytest.raises(ValueError, match="Qabf undefined"):
        M.qabf(c * 0, c * 0, x)  # a non-zero constant has border edges (zero-padded Sobel, as the reference)
    with pytest.raises(ValueError, match="Q_CV undefined"):
        M.q_cv(c, c, x)


def test_bad_inputs():
    x = torch.zeros(2, 1, 64, 64)
    with pytest.raises(ValueError, match="size mismatch"):
        M.ssim(x, x, torch.zeros(2, 1, 64, 63))
    with pytest.raises(ValueError, match="size mismatch"):
        M.compute_metrics(x, torch.zeros(1, 1, 64, 64), x)
    with pytest.raises(ValueError, match="grey images"):
        M.en(x, x, torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="grey images"):
        M.mi(x[0], x[0], x[0])
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        M.sd(x, x, nan)
    with pytest.raises(ValueError, match="unknown metric"):
        M.compute_metrics(x, x, x, names=["NOPE"])
    with pytest.raises(ValueError, match="2D images only"):
        M.qabf(*(torch.zeros(1, 1, 8, 8, 8),) * 3)
    with pytest.raises(ValueError, match="176"):
        M.ms_ssim(x, x, x)
    with pytest.raises(ValueError, match="reduction"):
        M.mi(x, x, x, reduction="max")
    with pytest.raises(ValueError, match="size mismatch"):
        M.mae(x, torch.zeros(2, 1, 32, 64))


def test_3d_volumes():
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randint(0, 256, (2, 1, 44, 42, 41), generator=g).double() for _ in range(2))
    a[..., :10, :, :] = 0  # some flat background
    f = torch.round((a + b) / 2)
    res = M.compute_metrics(a, b, f)
    expected = [n for n in M.METRICS if n not in ("FMI", "Qabf", "Q_CV", "MS_SSIM")]
    assert list(res) == expected
    for name, v in res.items():
        assert v.shape == (2,) and torch.isfinite(v).all(), name
    one = M.compute_metrics(a[1:], b[1:], f[1:])
    for name in res:
        torch.testing.assert_close(one[name][0], res[name][1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(M.ssim(a, b, a, reduction="none")[:, 0], torch.ones(2, dtype=torch.float64))
    for name in ("FMI", "Qabf", "Q_CV"):
        with pytest.raises(ValueError):
            M.compute_metrics(a, b, f, names=[name])
    reg = M.compute_registration_metrics(f, f)
    assert reg["MAE"].eq(0).all() and torch.allclose(reg["NCC"], torch.ones(2, dtype=torch.float64))


def test_to_grey255():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1, 2.0 / 255]).view(1, 1, 1, 6)
    torch.testing.assert_close(M.to_grey255(x), torch.tensor([0.0, 128.0, 255.0, 255.0, 0.0, 2.0]).view(1, 1, 1, 6))
    rgb = torch.tensor([100.0, 150.0, 200.0]).view(1, 3, 1, 1)
    y = M.to_grey255(rgb, input_range=255)
    assert y.shape == (1, 1, 1, 1) and y.item() == round(0.299 * 100 + 0.587 * 150 + 0.114 * 200)
    s = M.to_grey255(torch.tensor([2.0, 3.0, 4.0]).view(1, 1, 1, 3), minmax=True)
    torch.testing.assert_close(s.flatten(), torch.tensor([0.0, 128.0, 255.0]))  # 127.5 -> half-to-even 128
    with pytest.raises(ValueError):
        M.to_grey255(torch.zeros(1, 2, 4, 4))


def test_options_and_registration():
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(0, 256, (1, 1, 64, 64), generator=g).double() for _ in range(2))
    f = torch.round((a + b) / 2)
    out = M.compute_metrics(a, b, f, names=["MI", "SSIM"], options={"MI": {"base": 2}, "SSIM": {"reduction": "mean"}})
    torch.testing.assert_close(out["MI"], M.mi(a, b, f) / math.log(2))
    torch.testing.assert_close(out["SSIM"], M.ssim(a, b, f) / 2)
    shifted = torch.roll(a, 3, -1)
    assert M.mae(shifted, a).item() > 0 and M.ncc(shifted, a).item() < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(reference, suite):
    _, a, b, f = reference
    res = M.compute_metrics(a[:2].cuda(), b[:2].cuda(), f[:2].cuda())
    for name, v in res.items():
        assert v.device.type == "cuda"
        torch.testing.assert_close(v.cpu(), suite[name][:2], rtol=1e-6, atol=1e-8, msg=name)
