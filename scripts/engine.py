"""Plumbing between the fusion networks and MONAI's Ignite workflows: inferer, validation metric, progress bar."""

from __future__ import annotations

import functools
import logging
import os
import pickle
import random
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint
from monai.handlers import CheckpointLoader, CheckpointSaver, LrScheduleHandler, ValidationHandler, from_engine
from monai.inferers import Inferer
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction

from scripts.networks.blocks import LOW_PRECISION
from scripts.transforms import FusionDataError

__all__ = [
    "FusionInferer", "SourceMeanMetric", "ProgressBar", "EpochHooks", "TrainingState", "WeightsLoader",
    "CheckpointError", "SkipBadPairs", "GuardedTransform", "capture_rng", "restore_rng", "as_bool",
    "raise_if_interrupted", "training_state_of", "lr_scheduler",
]


def float32_outputs(out):
    """Network outputs with float16 / bfloat16 tensors (AMP, the default on CUDA) as float32, in dicts, lists and
    tuples too: what follows (window stitching, colour merging, metrics, NIfTI / PNG writers) runs in float32."""
    if torch.is_tensor(out):
        return out.float() if out.dtype in LOW_PRECISION else out
    if isinstance(out, dict):
        return {k: float32_outputs(v) for k, v in out.items()}
    if isinstance(out, list | tuple):
        return type(out)(float32_outputs(v) for v in out)
    return out


class FusionInferer(Inferer):
    """Calls ``network(inputs, mode=mode)``.

    Every fusion network fuses with ``mode="fuse"`` (the default forward, one tensor out, as MONAI Label and
    export expect) and returns what its loss needs with ``mode="train"`` (e.g. DRAN's per-source reconstructions).
    Going through ``forward`` keeps DistributedDataParallel's gradient hooks in play.
    """

    def __init__(self, mode: str = "fuse") -> None:
        super().__init__()
        self.mode = mode

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        # networks get plain tensors: slicing a collated MetaTensor inside a network trips over its batch metadata
        if hasattr(inputs, "as_tensor"):
            inputs = inputs.as_tensor()
        out = network(inputs, *args, mode=self.mode, **kwargs)
        return out if self.mode == "train" else float32_outputs(out)  # the losses cast for themselves


class SourceMeanMetric(CumulativeIterationMetric):
    """Mean over the sources of a MONAI regression metric between the fused image and each source.

    ``y_pred`` is the fused (B, 1, *S) image, ``y`` the stacked sources (B, N, *S); e.g.
    ``SourceMeanMetric(SSIMMetric(spatial_dims=2, data_range=1.0))`` is the mean SSIM of the fusion to its inputs.
    """

    def __init__(self, metric: CumulativeIterationMetric, reduction: str = "mean") -> None:
        super().__init__()
        self.metric = metric
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        y_pred = y_pred.float().clamp(0, 1)
        scores = [self.metric._compute_tensor(y_pred, y[:, i : i + 1].float()) for i in range(y.shape[1])]
        return torch.stack([s.reshape(s.shape[0], -1).mean(1) for s in scores], 0).mean(0, keepdim=False)[:, None]

    def aggregate(self, reduction: str | None = None):
        f, _ = do_metric_reduction(self.get_buffer(), reduction or self.reduction)
        return f


class ProgressBar:
    """tqdm progress bar (via Ignite) showing the running loss; attach like any MONAI handler."""

    def __init__(self, output_transform=None, persist: bool = True, desc: str = "train") -> None:
        self.output_transform = output_transform or from_engine(["loss"], first=True)
        self.persist = persist
        self.desc = desc

    def attach(self, engine) -> None:
        from ignite.handlers import ProgressBar as IgniteProgressBar

        def loss(output):
            value = self.output_transform(output)
            value = value[0] if isinstance(value, list | tuple) else value
            return {"loss": float(value)}

        IgniteProgressBar(persist=self.persist, desc=self.desc).attach(engine, output_transform=loss)


class EpochHooks:
    """After every training epoch, call ``epoch_completed()`` on each object that defines it.

    Used by methods whose training changes state once per epoch (BSAFusion: copy the classifier into the frozen
    discriminator; update the loss's adaptive weight). DDP/DataParallel wrappers are looked through.
    """

    def __init__(self, objects) -> None:
        self.objects = list(objects) if isinstance(objects, (list, tuple)) else [objects]

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine=None) -> None:
        for obj in self.objects:
            obj = getattr(obj, "module", obj)
            hook = getattr(obj, "epoch_completed", None)
            if callable(hook):
                hook()


# ======================================================================================================================
# Reliability: resumable training (full state, atomic, on an interval and on SIGTERM/SIGINT) and batch inference that
# survives bad pairs. See README "What happens when".
# ======================================================================================================================

_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off", "none", "null", "")
STATE_FORMAT = "fusion-training-state/1"
ERROR_KEY = "fusion_error"


def as_bool(value) -> bool:
    """A command-line flag as a bool: ``python -m monai.bundle run ... --strict true`` passes the *string* 'true'."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {value!r}.")
    return bool(value)


def lr_scheduler(optimizer, schedule: str = "constant", epochs: int = 1, final_ratio: float = 0.01):
    """The epoch-level learning-rate schedule of ``configs/train.json`` (``--lr_schedule``), stepped by MONAI's
    ``LrScheduleHandler`` and saved / restored with the training state.

    ``"constant"`` (default: the shipped recipes); ``"cosine"``: cosine annealing from the optimizer's rate to
    ``final_ratio`` x that rate over ``epochs`` (the official BSAFusion schedule is cosine 5e-5 -> 5e-7). On a resume
    the schedule continues with the length it was started with.
    """
    if schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if schedule == "cosine":
        lr = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(epochs), 1), eta_min=lr * final_ratio)
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}.")


def _unwrap(module):
    return getattr(module, "module", module)  # DistributedDataParallel / DataParallel


def _attached(engine, cls) -> list:
    """Handler objects of type ``cls`` attached to an Ignite ``engine`` (bound methods, callables, filtered events)."""
    found: list = []
    for handlers in getattr(engine, "_event_handlers", {}).values():
        for entry in handlers:
            h = entry[0]
            for cand in (h, getattr(h, "__self__", None), getattr(h, "__wrapped__", None),
                         getattr(getattr(h, "__wrapped__", None), "__self__", None)):
                if isinstance(cand, cls) and not any(cand is f for f in found):
                    found.append(cand)
    return found


# ------------------------------------------------------------------------------------------------------ RNG state
def _random_generators(roots) -> list:
    """Every ``numpy.random.RandomState`` / ``torch.Generator`` held by the transforms of ``roots`` (data loaders,
    datasets, transforms), in a deterministic order. MONAI's random transforms each own one (``self.R``), seeded by
    :class:`monai.data.DataLoader`; they are what makes crops and flips reproducible."""
    found, seen = [], set()

    def visit(obj, depth=0):
        if obj is None or depth > 12 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, torch.Tensor)):
            return
        seen.add(id(obj))
        if isinstance(obj, (np.random.RandomState, torch.Generator)):
            found.append(obj)
            return
        if isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o, depth + 1)
            return
        if isinstance(obj, dict):
            for o in obj.values():
                visit(o, depth + 1)
            return
        if isinstance(obj, torch.utils.data.DataLoader):
            visit(obj.dataset, depth + 1)
            visit(getattr(obj, "generator", None), depth + 1)  # a loader/sampler's own shuffle generator, if any
            visit(getattr(getattr(obj, "sampler", None), "generator", None), depth + 1)
            return
        if isinstance(obj, torch.utils.data.Dataset):  # only its transforms: never walk the (cached) data
            visit(getattr(obj, "transform", None), depth + 1)
            visit(getattr(obj, "dataset", None), depth + 1)  # Subset and friends
            return
        module = type(obj).__module__ or ""
        if module.startswith(("monai.transforms", "scripts", "__main__")) or hasattr(obj, "set_random_state"):
            for key, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
                if not key.startswith("__"):
                    visit(value, depth + 1)

    for root in roots:
        visit(root)
    return found


def _np_state(rs) -> dict:
    name, keys, pos, has_gauss, gauss = rs.get_state(legacy=True)
    return {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_np_state(rs, s: dict) -> None:
    keys = s["keys"].cpu().numpy().astype(np.uint32)
    rs.set_state(("MT19937", keys, int(s["pos"]), int(s["has_gauss"]), float(s["gauss"])))


def capture_rng(roots=()) -> dict:
    """Every random state a training step draws from, as tensors and numbers (``torch.load(weights_only=True)``):
    torch (CPU and each CUDA device), numpy and Python global generators, and each transform's own generator."""
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": _np_state(np.random.mtrand._rand),
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
        "transforms": [],
    }
    for g in _random_generators(roots):
        if isinstance(g, torch.Generator):
            state["transforms"].append({"torch": g.get_state()})
        else:
            state["transforms"].append(_np_state(g))
    return state


def restore_rng(state: dict, roots=()) -> None:
    """Inverse of :func:`capture_rng` (the transform generators are matched by position; a count mismatch, i.e. a
    different transform chain, raises)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    _set_np_state(np.random.mtrand._rand, state["numpy"])
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    gens = _random_generators(roots)
    saved = state.get("transforms", [])
    if len(gens) != len(saved):
        raise ValueError(
            f"the checkpoint holds {len(saved)} transform random states but this pipeline has {len(gens)}; "
            "resume with the same transforms (same config and overrides) as the interrupted run."
        )
    for g, s in zip(gens, saved):
        if isinstance(g, torch.Generator):
            g.set_state(s["torch"].cpu())
        else:
            _set_np_state(g, s)


class _Stateful:
    """Adapter giving Ignite's ``Checkpoint.load_objects`` a ``load_state_dict`` for plain state."""

    def __init__(self, get, put) -> None:
        self.get, self.put = get, put

    def state_dict(self):
        return self.get()

    def load_state_dict(self, state) -> None:
        self.put(state)


class _ResumeLoader:
    """Data loader for the epoch a mid-epoch resume lands in: replays the epoch's start (same shuffle, same worker
    seeds), skips the ``skip`` batches already trained on, then puts every random generator back where the
    interrupted run left it. Later epochs iterate the wrapped loader as usual."""

    def __init__(self, loader, skip: int, epoch_start_rng: dict, rng: dict, roots) -> None:
        self.loader, self.skip, self.epoch_start_rng, self.rng, self.roots = loader, skip, epoch_start_rng, rng, roots
        self._replayed = False

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        if self._replayed:
            return iter(self.loader)
        self._replayed = True
        restore_rng(self.epoch_start_rng, self.roots)
        it = iter(self.loader)
        for _ in range(self.skip):
            next(it)
        restore_rng(self.rng, self.roots)
        return it


class TrainingState:
    """Save the whole training state atomically and resume from it, also after SIGTERM / SIGINT.

    Attach to a MONAI trainer (anywhere in ``train_handlers``). It writes ``<save_dir>/<filename>`` (write to a
    temporary file in the same folder, then rename: a crash or a second signal never leaves a truncated file):

    - every ``epoch_interval`` epochs (after validation) and every ``iteration_interval`` iterations (0: off), and
      when training completes;
    - on SIGTERM or SIGINT: at the end of the current iteration (or, for the last iteration of an epoch, after that
      epoch's validation) the state is saved and the trainer stops; :func:`raise_if_interrupted` (last step of the
      ``run`` list of ``configs/train.json``) then exits with status 128 + signal number. A second signal stops at
      once. Signal handlers are installed only while ``trainer.run()`` runs (main thread) and restored afterwards.

    The state holds (all tensors/numbers, loadable with ``torch.load(weights_only=True)``): the trainer's epoch and
    iteration, network (``.module`` of a DDP wrapper), optimizer, loss (if it has state), AMP grad scaler, every
    ``LrScheduleHandler`` scheduler, the objects of ``save_dict`` (anything with ``state_dict``), the torch / CUDA /
    numpy / Python / per-transform random states, those at the start of the current epoch (to replay its shuffle
    on a mid-epoch resume) and the validation's best metric, its epoch and the best-model saver's record.

    ``resume``: ``False``; ``True`` (continue from ``<save_dir>/<filename>``, which must exist); ``"auto"`` (continue
    if it exists, else start fresh). ``resume_from``: a file to continue from (implies resuming). ``--epochs`` may be
    raised when resuming. On one process and the same machine, an interrupted and resumed run ends with the same
    weights, bit for bit, as an uninterrupted one (``tests/test_reliability.py``).
    """

    def __init__(
        self,
        save_dir,
        filename: str = "checkpoint.pt",
        epoch_interval: int = 1,
        iteration_interval: int = 0,
        resume=False,
        resume_from=None,
        save_dict: dict | None = None,
        handle_signals=True,
    ) -> None:
        self.path = Path(save_dir) / filename
        self.epoch_interval = int(epoch_interval or 0)
        self.iteration_interval = int(iteration_interval or 0)
        self.resume = "auto" if str(resume).strip().lower() == "auto" else as_bool(resume)
        self.resume_from = str(resume_from) if resume_from not in (None, "", "None", "null") else None
        self.extra = dict(save_dict or {})
        self.handle_signals = as_bool(handle_signals)
        self.signal_received: int | None = None
        self.interrupted: int | None = None
        self.saved_path: Path | None = None
        self.logger = logging.getLogger(__name__)
        self._engine = None
        self._previous_handlers: dict = {}
        self._registered = False
        self._epoch_start_rng: dict | None = None
        self._pending: tuple | None = None
        self._original_loader = None
        self._save_at_epoch_end = False
        self._last_saved_iteration = -1
        self._stop_logged = False
        self._loading_from: Path | None = None

    # ------------------------------------------------------------------------------------------- wiring
    def attach(self, engine) -> None:
        self._engine = engine
        self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self._started)
        run = engine.run

        @functools.wraps(run)
        def run_with_signal_handlers(*args, **kwargs):
            self._install_signal_handlers()
            try:
                return run(*args, **kwargs)
            finally:
                self._restore_signal_handlers()

        engine.run = run_with_signal_handlers

    def _started(self, engine) -> None:
        if not self._registered:  # registered now, i.e. after every other handler: runs after validation/hooks
            engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
            engine.add_event_handler(Events.COMPLETED, self._completed)
            self._registered = True
        path = self._resume_path()
        if path is not None:
            self.load(engine, path)

    def _resume_path(self) -> Path | None:
        if self.resume_from:
            path = Path(self.resume_from)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: training state to resume from not found (--resume_from).")
            return path
        if self.resume == "auto":
            if self.path.is_file():
                return self.path
            self.logger.info(f"no training state at {self.path}; starting a new training run (--resume auto).")
            return None
        if self.resume:
            if not self.path.is_file():
                raise FileNotFoundError(
                    f"{self.path}: no training state to resume from (--resume true); it is written by an earlier run "
                    "with the same --output_dir. Use --resume_from FILE for another file, --resume auto to start "
                    "fresh when there is none."
                )
            return self.path
        return None

    def _roots(self, engine) -> list:
        roots = [getattr(engine, "data_loader", None)]
        roots += [getattr(v.validator, "data_loader", None) for v in _attached(engine, ValidationHandler)]
        return roots

    def _evaluators(self, engine) -> list:
        return [v.validator for v in _attached(engine, ValidationHandler)]

    # ------------------------------------------------------------------------------------------- state
    def _objects(self, engine) -> dict:
        objs = {"trainer": engine, "network": _unwrap(engine.network), "optimizer": engine.optimizer}
        loss = getattr(engine, "loss_function", None)
        if isinstance(loss, torch.nn.Module):
            objs["loss"] = loss
        if getattr(engine, "scaler", None) is not None:
            objs["scaler"] = engine.scaler
        for i, h in enumerate(_attached(engine, LrScheduleHandler)):
            objs[f"lr_scheduler_{i}"] = h.lr_scheduler
        for k, v in self.extra.items():
            objs[f"extra_{k}"] = v
        roots = self._roots(engine)
        objs["rng"] = _Stateful(lambda: capture_rng(roots), lambda s: restore_rng(s, roots))
        objs["rng_epoch_start"] = _Stateful(lambda: self._epoch_start_rng, self._set_epoch_start_rng)
        objs["progress"] = _Stateful(lambda: self._progress(engine), lambda s: self._set_progress(engine, s))
        return objs

    def _set_epoch_start_rng(self, state) -> None:
        self._epoch_start_rng = state

    def _progress(self, engine) -> dict:
        out = []
        for ev in self._evaluators(engine):
            savers = [s._key_metric_checkpoint.state_dict() for s in _attached(ev, CheckpointSaver)
                      if getattr(s, "_key_metric_checkpoint", None) is not None]
            best = ev.state.best_metric
            out.append({"best_metric": float(best) if best is not None else None,
                        "best_metric_epoch": int(ev.state.best_metric_epoch), "key_metric_savers": savers})
        return {"evaluators": out}

    def _set_progress(self, engine, state) -> None:
        for ev, saved in zip(self._evaluators(engine), state.get("evaluators", [])):
            ev.state.best_metric = saved["best_metric"]
            ev.state.best_metric_epoch = saved["best_metric_epoch"]
            savers = [s for s in _attached(ev, CheckpointSaver) if getattr(s, "_key_metric_checkpoint", None)]
            for saver, s in zip(savers, saved["key_metric_savers"]):
                s = {**s, "_saved": [item for item in s.get("_saved", []) if self._best_file_in(saver, item[1])]}
                saver.load_state_dict(s)

    def _best_file_in(self, saver, filename: str) -> bool:
        """The best model of the resumed run must be in this run's folder (the saver replaces it when beaten):
        resuming from another folder copies it from beside the state file; if it is nowhere, the next
        validation writes a new one."""
        import shutil

        target = Path(saver.save_dir) / filename
        if target.is_file():
            return True
        source = Path(self._loading_from).parent / filename if self._loading_from else None
        if source is not None and source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            return True
        self.logger.warning(f"best model {filename} of the resumed run not found; the next validation writes one.")
        return False

    def state_dict(self, engine=None) -> dict:
        engine = engine or self._engine
        state = {"format": STATE_FORMAT}
        for k, obj in self._objects(engine).items():
            state[k] = obj.state_dict()
        return state

    def save(self, engine=None) -> Path | None:
        """Write the state now (rank 0 only), atomically."""
        from scripts import io as fio

        engine = engine or self._engine
        if getattr(engine.state, "rank", 0) != 0:
            return None
        state = self.state_dict(engine)
        fio.atomic_save(self.path, lambda tmp: torch.save(state, tmp))
        self.saved_path = self.path
        self._last_saved_iteration = engine.state.iteration
        self.logger.info(
            f"saved training state (epoch {engine.state.epoch}, iteration {engine.state.iteration}) to {self.path}"
        )
        return self.path

    def load(self, engine, path) -> None:
        """Restore everything :meth:`state_dict` saved (Ignite ``Checkpoint.load_objects``, weights only)."""
        path = Path(path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refusing to load a training state that contains pickled Python objects "
                f"(only tensors and plain values are accepted): {e}"
            ) from e
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read the training state ({type(e).__name__}: {e}); "
                                  "the file is damaged or not a checkpoint.") from e
        if not isinstance(ckpt, dict) or ckpt.get("format") != STATE_FORMAT:
            raise CheckpointError(
                f"{path}: not a training state written by this bundle (no '{STATE_FORMAT}' marker); model weights "
                "such as model.pt load with --ckpt_path for inference, training resumes from checkpoint.pt."
            )
        self._loading_from = path
        objs = self._objects(engine)
        missing = [k for k in objs if k not in ckpt]
        if missing:
            raise CheckpointError(
                f"{path}: this training run has {missing} that the saved state lacks; resume with the same method, "
                "options (e.g. --amp) and save_dict as the interrupted run."
            )
        saved_length, length = ckpt["trainer"].get("epoch_length"), engine.state.epoch_length
        if saved_length is not None and length is not None and saved_length != length:
            raise CheckpointError(
                f"{path}: saved with {saved_length} iterations per epoch but this run has {length}; resume with the "
                "same data, --batch_size and --pairs as the interrupted run."
            )
        prior_max_epochs = engine.state.max_epochs
        try:
            Checkpoint.load_objects(to_load=objs, checkpoint=ckpt, strict=True)
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: does not match this training run ({e}).") from e
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise CheckpointError(
                f"{path}: saved at epoch {engine.state.epoch}, beyond --epochs {prior_max_epochs}; "
                "raise --epochs to train further."
            )
        engine.state.max_epochs = prior_max_epochs
        skip = engine.state.iteration % engine.state.epoch_length if engine.state.epoch_length else 0
        if skip:
            if self._epoch_start_rng is None:
                raise CheckpointError(f"{path}: mid-epoch state without the epoch's start random state.")
            self._pending = (skip, self._epoch_start_rng, ckpt["rng"])
        self.logger.info(
            f"resumed from {path}: epoch {engine.state.epoch}, iteration {engine.state.iteration}"
            + (f" ({skip} batches into epoch {engine.state.epoch + 1})" if skip else "")
        )

    # ------------------------------------------------------------------------------------------- events
    def _epoch_started(self, engine) -> None:
        if self._pending is not None:
            skip, start_rng, rng = self._pending
            self._pending = None
            self._epoch_start_rng = start_rng
            self._original_loader = engine.state.dataloader
            engine.state.dataloader = _ResumeLoader(engine.state.dataloader, skip, start_rng, rng, self._roots(engine))
        else:
            self._epoch_start_rng = capture_rng(self._roots(engine))

    def _should_stop(self, engine) -> bool:
        sig = self.signal_received or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:  # every rank stops at the same iteration
                dev = engine.state.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
                t = torch.tensor([sig], device=dev)
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
                sig = int(t.item())
        if sig and not self._stop_logged:
            self._stop_logged = True
            self.signal_received = sig
            self.logger.warning(
                f"received {signal.Signals(sig).name}: saving the training state and stopping "
                f"(epoch {engine.state.epoch}, iteration {engine.state.iteration})."
            )
        return bool(sig)

    def _stop(self, engine) -> None:
        self.interrupted = self.signal_received
        engine.terminate(skip_completed=True)  # not COMPLETED: model_final.pt is for finished runs

    def _iteration_completed(self, engine) -> None:
        at_epoch_end = bool(engine.state.epoch_length) and engine.state.iteration % engine.state.epoch_length == 0
        due = self.iteration_interval and engine.state.iteration % self.iteration_interval == 0
        if at_epoch_end:  # the state is saved after this epoch's validation (EPOCH_COMPLETED)
            self._save_at_epoch_end = bool(due)
            return
        if self._should_stop(engine):
            self.save(engine)
            self._stop(engine)
        elif due:
            self.save(engine)

    def _epoch_completed(self, engine) -> None:
        if self._original_loader is not None:
            engine.state.dataloader, self._original_loader = self._original_loader, None
        due = self._save_at_epoch_end or (self.epoch_interval and engine.state.epoch % self.epoch_interval == 0)
        self._save_at_epoch_end = False
        self._epoch_start_rng = None
        stop = self._should_stop(engine)
        if stop or due:
            self.save(engine)
        if stop:
            self._stop(engine)

    def _completed(self, engine) -> None:
        if self._last_saved_iteration != engine.state.iteration:
            self.save(engine)

    # ------------------------------------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> None:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        self.signal_received, self.interrupted, self._stop_logged = None, None, False
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def _on_signal(self, signum, frame) -> None:
        if self.signal_received is None:
            self.signal_received = signum  # acted upon at the next iteration / epoch boundary
            return
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)  # second signal: stop now
        self._restore_signal_handlers()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            os.kill(os.getpid(), signum)

    def raise_if_interrupted(self) -> None:
        """Exit with status 128 + signal number if a signal stopped training (the last step of ``run``)."""
        if self.interrupted is None:
            return
        name = signal.Signals(self.interrupted).name
        where = f"state saved to {self.saved_path}" if self.saved_path else "no state saved (not rank 0)"
        self.logger.warning(f"training stopped by {name}; {where}; continue with --resume true.")
        raise SystemExit(128 + int(self.interrupted))


def training_state_of(trainer) -> TrainingState | None:
    """The :class:`TrainingState` handler attached to ``trainer`` (None if there is none)."""
    found = _attached(trainer, TrainingState)
    return found[0] if found else None


def raise_if_interrupted(trainer) -> None:
    """Last step of ``run`` in ``configs/train.json``: exit with 128 + signal number if a signal stopped training."""
    state = training_state_of(trainer)
    if state is not None:
        state.raise_if_interrupted()


class CheckpointError(ValueError):
    """A checkpoint / training state cannot be used; the message names the file and the problem."""


class WeightsLoader(CheckpointLoader):
    """MONAI's :class:`~monai.handlers.CheckpointLoader` (``torch.load(weights_only=True)``) with errors that name the
    file and say what is wrong (missing, damaged, pickled code, does not fit the network). Also takes a training
    state (``checkpoint.pt`` of :class:`TrainingState`) and loads its network."""

    @staticmethod
    def _training_state(path: Path) -> dict | None:
        """The file memory-mapped if it is a training state (tensors read only as they are copied), else None."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            return None  # let the normal path report what is wrong with the file
        return ckpt if isinstance(ckpt, dict) and {"format", "trainer", "network"} <= ckpt.keys() else None

    def __call__(self, engine) -> None:
        path = Path(str(self.load_path))
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found (--ckpt_path).")
        try:
            state = self._training_state(path) if len(self.load_dict) == 1 else None
            if state is not None:  # a TrainingState file: its network (load_state_dict copies to the device)
                Checkpoint.load_objects(to_load=self.load_dict, checkpoint={next(iter(self.load_dict)): state["network"]},
                                        strict=self.strict)
                self.logger.info(f"Restored the network of training state {path}")
                return
            super().__call__(engine)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refusing to load a checkpoint that contains pickled Python objects (only tensors are "
                f"accepted; torch.load weights_only=True): {str(e).splitlines()[0]}"
            ) from e
        except (RuntimeError, KeyError, ValueError, EOFError, OSError) as e:
            raise CheckpointError(
                f"{path}: cannot load these weights into the network ({type(e).__name__}: {str(e)[:500]}); "
                "the file is damaged, not a checkpoint, or from another method / network_overrides."
            ) from e


# -------------------------------------------------------------------------------------- batch inference
def describe_error(e: BaseException) -> str:
    """The most useful message of an exception chain: our own data error if there is one (it names the file),
    else the innermost cause (MONAI wraps transform errors in 'applying transform ...')."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:
        if isinstance(err, FusionDataError):
            return str(err)
    inner = chain[-1]
    return f"{type(inner).__name__}: {inner}"


class GuardedTransform:
    """Wraps a dataset transform so that a pair that cannot be prepared becomes ``{"name", "fusion_error"}``
    instead of an exception that would stop the data loader (works in DataLoader workers too)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, item):
        name = str(item.get("name") or item.get("source_a") or "pair") if isinstance(item, dict) else "pair"
        error = item.get(ERROR_KEY) if isinstance(item, dict) else None
        if error is None:
            try:
                return self.transform(item)
            except Exception as e:  # noqa: BLE001 - every failure becomes a per-pair error
                error = describe_error(e)
        return {"name": name, ERROR_KEY: str(error)}


class SkipBadPairs:
    """Batch inference policy: a pair that fails (unreadable, corrupt, wrong size, constant, cannot be written...)
    is logged as an error naming it and the problem, and skipped; the run goes on and :meth:`raise_if_failed`
    (last step of ``run``) ends it with a summary and a non-zero exit. ``strict=True`` stops at the first one.

    Use as the evaluator's ``iteration_update`` and wrap the dataset transform with :meth:`guard`.
    """

    def __init__(self, strict=False) -> None:
        self.strict = as_bool(strict)
        self.failures: list[tuple[str, str]] = []
        self.done = 0

    def guard(self, transform) -> GuardedTransform:
        return GuardedTransform(transform)

    @staticmethod
    def _names(batch) -> list[str]:
        names = batch.get("name") if isinstance(batch, dict) else None
        if names is None:
            return ["pair"]
        return [str(n) for n in names] if isinstance(names, (list, tuple)) else [str(names)]

    def _fail(self, engine, name: str, message: str) -> None:
        if self.strict:
            raise FusionDataError(f"pair {name}: {message}")
        self.failures.append((name, message))
        engine.logger.error(f"skipping pair {name}: {message}")

    def __call__(self, engine, batch):
        names = self._names(batch)
        errors = batch.get(ERROR_KEY) if isinstance(batch, dict) else None
        if errors is not None:
            for name, message in zip(names, errors if isinstance(errors, (list, tuple)) else [errors]):
                self._fail(engine, name, str(message))
            return None
        try:
            output = engine._iteration(engine, batch)
        except Exception as e:  # noqa: BLE001
            if self.strict:
                engine.logger.error(f"pair {', '.join(names)} failed: {describe_error(e)}")
                raise
            for name in names:
                self._fail(engine, name, describe_error(e))
            return None
        self.done += len(names)
        return output

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self._summary)

    def summary(self) -> str:
        total = self.done + len(self.failures)
        head = f"{len(self.failures)} of {total} pairs failed ({self.done} fused)"
        return head + "".join(f"\n  {n}: {m}" for n, m in self.failures)

    def _summary(self, engine) -> None:
        (engine.logger.error if self.failures else engine.logger.info)(self.summary())

    def raise_if_failed(self) -> None:
        if self.failures:
            raise FusionDataError(self.summary())
