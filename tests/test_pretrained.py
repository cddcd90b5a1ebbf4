"""The shipped weights (models/<method>.pt): present for every trainable method, small, weights-only, and they fuse
real AANLIB validation pairs sanely through configs/inference.json's own preprocessing and weight lookup.

The SSIM floors are the lowest value measured on these three pairs with the shipped files (docs/README.md,
"Shipped weights") minus about 0.1: retrained weights must stay near that quality or update the floors knowingly.
"""

import csv

import pytest
import torch
from monai.bundle import ConfigParser
from monai.metrics import SSIMMetric

from conftest import BUNDLE_ROOT
from scripts.methods import available_methods, load_method_config

TRAINABLE = [m for m in available_methods(BUNDLE_ROOT) if load_method_config(BUNDLE_ROOT, m)["trainable"]]
# one validation pair of each type (configs/aanlib_split.json)
PAIRS = {"CT-MRI": "003", "PET-MRI": "002", "SPECT-MRI": "002"}
# minimum SSIM (MONAI SSIMMetric, data range 1) of the fused image to the MRI and to the other source
SSIM_FLOOR = {
    "dran": (0.35, 0.40),  # measured 0.453 / 0.506 (session-4 weights; 0.397 / 0.429 before)
    "mactfusion": (0.58, 0.44),  # measured 0.677 / 0.536 (session-6 weights; 0.682 / 0.541 session 5)
    "msgfusion": (0.58, 0.43),  # measured 0.681 / 0.527 (session-7 weights; 0.680 / 0.511 session 5)
    "bsafusion": (0.60, 0.50),  # measured 0.710 / 0.609 (session-7 weights; 0.709 / 0.616 session 6)
}


def test_every_trainable_method_ships_weights_under_50_mb():
    assert set(TRAINABLE) == set(SSIM_FLOOR)
    for m in TRAINABLE:
        path = BUNDLE_ROOT / "models" / f"{m}.pt"
        assert path.is_file(), f"{path}: no shipped weights for {m}"
        assert path.stat().st_size < 50 * 2**20, f"{path}: {path.stat().st_size / 2**20:.1f} MB"


def _manifest(aanlib_dir, tmp_path):
    with open(aanlib_dir / "pairs.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if PAIRS.get(r["pair"]) == r["id"]]
    assert len(rows) == len(PAIRS)
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (str(aanlib_dir / v) if k in ("mri", "moving", "aligned") else v) for k, v in r.items()})
    return path


@pytest.mark.parametrize("method", TRAINABLE)
def test_shipped_weights_fuse_real_pairs(method, aanlib_dir, tmp_path):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "method": method, "dataset_dir": str(_manifest(aanlib_dir, tmp_path)),
                   "output_dir": str(tmp_path / "out"), "device": "$torch.device('cpu')"})
    ckpt = parser.get_parsed_content("ckpt_path")
    assert ckpt == str(BUNDLE_ROOT / "models" / f"{method}.pt")  # inference picks the shipped file by itself
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    net = parser.get_parsed_content("network").eval()
    net.load_state_dict(state)  # strict: every key present, every shape right
    pre = parser.get_parsed_content("preprocessing")
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0)
    floor_a, floor_b = SSIM_FLOOR[method]
    for item in parser.get_parsed_content("datalist"):
        x = torch.as_tensor(pre(item)["image"]).float().as_subclass(torch.Tensor)[None]
        with torch.inference_mode():
            raw = torch.as_tensor(net(x)).float()
        assert raw.shape == (1, 1, 256, 256), item["name"]
        # the workflows clamp to [0, 1]; a sane network is close to that range already
        assert torch.isfinite(raw).all() and raw.min() > -1 and raw.max() < 2, (item["name"], raw.aminmax())
        fused = raw.clamp(0, 1)
        assert fused.std() > 0.05, f"{item['name']}: nearly constant output"
        s_a, s_b = (float(ssim(fused, x[:, i : i + 1])) for i in (0, 1))
        assert s_a > floor_a and s_b > floor_b, f"{method} {item['name']}: SSIM {s_a:.3f} / {s_b:.3f}"
