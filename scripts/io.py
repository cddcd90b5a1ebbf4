"""Output writing: atomic (temp file + rename), never onto an input, never outside the output folder."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

__all__ = ["safe_name", "output_extension", "atomic_save", "file_lock", "write_image", "save_state_dict",
           "ensure_writable_dir"]

PNG_LIKE = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def safe_name(name, max_bytes: int = 200) -> str:
    """A file-name stem that cannot leave its folder: path separators, '..' and control characters are replaced.

    Letters of any script (non-ASCII) and spaces are kept, since users' data has them. The result is at most
    ``max_bytes`` bytes in UTF-8 (file systems limit a name to 255 bytes; ``_fused_rgb.png`` is appended).
    """
    s = re.sub(r"[\\/\x00-\x1f\x7f]+", "_", str(name)).strip()
    s = re.sub(r"^\.+", "", s)  # no hidden files, no '..'
    s = s.encode("utf-8", "replace")[:max_bytes].decode("utf-8", "ignore").strip()  # never split a character
    return s or "pair"


def output_extension(source) -> str:
    """``.png`` for 2D raster inputs (and in-memory inputs), ``.nii.gz`` for NIfTI, DICOM and everything else."""
    src = str(source).lower()
    if not src or src.endswith(PNG_LIKE):
        return ".png"
    return ".nii.gz"


def _same_file(a: Path, b) -> bool:
    try:
        return b is not None and Path(b).exists() and a.exists() and os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """Exclusive inter-process lock on ``path`` (POSIX ``flock``; released by the OS if the holder dies).
    Without ``fcntl`` (non-POSIX) it does nothing: callers rely on atomic renames alone there."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(path: str | os.PathLike, write_fn, protect: Iterable = ()) -> Path:
    """Call ``write_fn(tmp_path)`` on a temporary file in the target folder, then rename it onto ``path``.

    A crash leaves either the old file or the new one, never a truncated file. Refuses to replace any file in
    ``protect`` (the inputs).
    """
    path = Path(path)
    for p in protect:
        if p is not None and (_same_file(path, p) or path.resolve() == Path(str(p)).resolve()):
            raise FileExistsError(f"refusing to overwrite input file {p}; choose another output folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:50]}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


def write_image(img: torch.Tensor, path: str | os.PathLike, affine=None, protect: Iterable = (),
                nifti_codes: tuple[int, int] | None = None) -> Path:
    """Write a channel-first image in [0, 1].

    PNG: (1, W, H) grey or (3, W, H) RGB in MONAI's (x, y) order, stored 8-bit. NIfTI: (1, *spatial) float32 with
    ``affine`` (4x4, RAS world) as both its sform and qform, so the output overlays its source in any viewer (ITK
    prefers the qform, nibabel the sform). ``nifti_codes``: their (qform, sform) codes, e.g. the source's
    (default: 1, 1 'scanner' with an affine, 0, 0 without).
    """
    img = torch.as_tensor(img).detach().float().cpu()
    path = Path(path)
    if path.suffix.lower() == ".png":
        from PIL import Image

        if img.ndim != 3 or img.shape[0] not in (1, 3):
            raise ValueError(f"{path}: PNG output needs a (1 or 3, W, H) image, got {tuple(img.shape)}.")
        arr = _to_uint8(img.permute(2, 1, 0))  # (x, y, c) -> (rows, cols, c)
        pil = Image.fromarray(arr[..., 0] if img.shape[0] == 1 else arr, mode="L" if img.shape[0] == 1 else "RGB")
        return atomic_save(path, lambda tmp: pil.save(tmp, format="PNG"), protect)

    import nibabel as nib

    arr = img.numpy()
    arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    aff = np.eye(4) if affine is None else np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)
    if aff.shape == (3, 3):  # 2D affine (MONAI keeps spatial_dims+1) -> 4x4 for NIfTI
        aff = np.block([[aff[:2, :2], np.zeros((2, 1)), aff[:2, 2:]], [np.array([[0, 0, 1, 0], [0, 0, 0, 1.0]])]])
    nii = nib.Nifti1Image(arr.astype(np.float32), aff)
    q_code, s_code = nifti_codes if nifti_codes is not None else ((1, 1) if affine is not None else (0, 0))
    nii.set_sform(aff, code=int(s_code))
    nii.set_qform(aff, code=int(q_code))
    nii.header.set_xyzt_units("mm")
    return atomic_save(path, lambda tmp: nib.save(nii, tmp), protect)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be written there (a real write, so read-only mounts,
    permissions and full disks are all caught); raise ``PermissionError`` naming the folder otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(
            f"{path}: output folder is not writable ({e.strerror or e}); choose another --output_dir."
        ) from e
    return path


def save_state_dict(state_dict: dict, path: str | os.PathLike) -> Path:
    """Save a weights-only state dict atomically (loadable with ``torch.load(..., weights_only=True)``)."""
    return atomic_save(path, lambda tmp: torch.save(state_dict, tmp))
