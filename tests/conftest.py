"""Shared test fixtures.

Tests read real data and parity fixtures from ``../shared`` (or ``$FUSION_SHARED_DIR``); nothing from there is
copied into the bundle. Locally a missing folder skips the test; under CI (``CI=true``) it fails loudly.
"""

import os
import sys
from pathlib import Path

import pytest

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

SHARED_DIR = Path(os.environ.get("FUSION_SHARED_DIR", BUNDLE_ROOT.parent / "shared")).resolve()
PARITY_DIR = Path(os.environ.get("FUSION_PARITY_DIR", SHARED_DIR / "parity")).resolve()
AANLIB_DIR = SHARED_DIR / "data" / "aanlib"


def require_path(path: Path) -> Path:
    """Return ``path`` if it exists; otherwise skip locally, fail under CI."""
    path = Path(path)
    if not path.exists():
        msg = f"required test data is missing: {path}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return BUNDLE_ROOT


@pytest.fixture(scope="session")
def aanlib_dir() -> Path:
    return require_path(AANLIB_DIR / "pairs.csv").parent


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return require_path(PARITY_DIR)
