"""Classical, parameter-free fusion baselines: contract, exactness, reconstruction, and Qabf on real pairs."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from scripts import metrics as M
from scripts.networks import AverageFusion, GuidedFilterFusion, LaplacianPyramidFusion, MaxFusion
from scripts.networks.baselines import _expand, _reduce

ALL = [AverageFusion, MaxFusion, LaplacianPyramidFusion, GuidedFilterFusion]


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("shape", [(2, 2, 32, 32), (3, 2, 37, 45), (1, 2, 5, 7), (2, 2, 17, 20, 23)])
def test_contract_shapes_and_range(cls, shape):
    net = cls(spatial_dims=len(shape) - 2)
    x = _rand(*shape)
    y = net(x)
    assert y.shape == (shape[0], 1, *shape[2:]) and y.dtype == x.dtype
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
    assert torch.equal(net(x, mode="fuse"), y)
    # per-sample == batched
    torch.testing.assert_close(net(x[-1:]), y[-1:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", ALL)
def test_parameter_free_and_errors(cls):
    net = cls()
    assert list(net.parameters()) == [] and net.state_dict() == {}
    net.load_state_dict({})  # checkpoint code with an empty state dict works
    with pytest.raises(ValueError, match="mode"):
        net(_rand(1, 2, 8, 8), mode="register")
    with pytest.raises(ValueError, match="B,2"):
        net(_rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="B,2"):
        net(_rand(2, 8, 8))


def test_average_and_max_exact():
    x = _rand(4, 2, 19, 23, seed=1)
    assert torch.equal(AverageFusion()(x), (x[:, 0:1] + x[:, 1:2]) / 2)
    assert torch.equal(MaxFusion()(x), torch.maximum(x[:, 0:1], x[:, 1:2]))
    x3 = _rand(1, 2, 6, 7, 8, seed=2)
    assert torch.equal(MaxFusion(spatial_dims=3)(x3), x3.amax(1, keepdim=True))
    with pytest.raises(ValueError, match=r"spatial_dims=2\) got a 3D input"):
        MaxFusion()(x3)


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (1, 1, 37, 45), (1, 1, 3, 5), (1, 1, 17, 20, 23)])
@pytest.mark.parametrize("levels", [1, 4, 6])
def test_laplacian_perfect_reconstruction(shape, levels):
    img = _rand(*shape, seed=3, dtype=torch.float64)
    sd = img.dim() - 2
    net = LaplacianPyramidFusion(levels=levels, clip=False, spatial_dims=sd)
    out = net(torch.cat([img, img], 1))
    torch.testing.assert_close(out, img, rtol=0, atol=1e-12)
    f32 = LaplacianPyramidFusion(levels=levels, spatial_dims=sd)(torch.cat([img, img], 1).float())
    torch.testing.assert_close(f32, img.float(), rtol=0, atol=1e-5)


def test_pyramid_collapse_inverts_decompose():
    x = _rand(2, 1, 32, 48, seed=4, dtype=torch.float64)
    net = LaplacianPyramidFusion(levels=4)
    pyr = net.decompose(x)
    assert [p.shape[2:] for p in pyr] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    torch.testing.assert_close(net.collapse(pyr), x, rtol=0, atol=1e-12)
    assert _expand(_reduce(x)).shape == x.shape


def test_laplacian_selects_details_and_averages_base():
    flat = torch.full((1, 1, 32, 32), 0.5, dtype=torch.float64)
    edge = flat.clone()
    edge[..., 16:] = 0.9
    out = LaplacianPyramidFusion(levels=3)(torch.cat([flat, edge], 1))
    # the step of the structured source survives almost fully (max-abs detail), unlike plain averaging
    step = out[..., 8, 20] - out[..., 8, 12]
    assert step.item() > 0.3


def test_gff_identical_inputs_and_3d():
    img = _rand(2, 1, 40, 36, seed=5)
    torch.testing.assert_close(GuidedFilterFusion()(torch.cat([img, img], 1)), img, rtol=0, atol=1e-6)
    vol = _rand(1, 1, 12, 14, 16, seed=6)
    torch.testing.assert_close(GuidedFilterFusion(spatial_dims=3)(torch.cat([vol, vol], 1)), vol, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def real_pairs(aanlib_dir):
    rows = list(csv.DictReader(open(aanlib_dir / "pairs.csv")))
    sel = []
    for kind in ("CT-MRI", "PET-MRI", "SPECT-MRI"):
        sel += [r for r in rows if r["pair"] == kind][:2]

    def load(key):
        return torch.from_numpy(np.stack([np.asarray(Image.open(aanlib_dir / r[key]).convert("L"), dtype=np.float32)
                                          for r in sel]))[:, None] / 255

    return load("mri"), load("aligned"), [f"{r['pair']}/{r['id']}" for r in sel]


def test_real_pairs_qabf_above_average(real_pairs):
    """GFF and Laplacian keep more edge information than averaging (Qabf, evaluator conventions)."""
    mri, other = real_pairs[:2]
    x = torch.cat([mri, other], 1)
    a, b = M.to_grey255(other), M.to_grey255(mri)
    q = {cls.__name__: M.qabf(a, b, M.to_grey255(cls()(x))) for cls in (AverageFusion, LaplacianPyramidFusion,
                                                                         GuidedFilterFusion)}
    for name in ("LaplacianPyramidFusion", "GuidedFilterFusion"):
        worse = [real_pairs[2][i] for i in torch.nonzero(q[name] <= q["AverageFusion"]).flatten().tolist()]
        assert not worse, f"{name} Qabf not above average fusion on {worse}: {q}"
