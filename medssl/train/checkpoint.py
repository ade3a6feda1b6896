"""Training checkpoints: one plain dict per file, written atomically, restorable to the exact step.

    {"format", "model", "optimizer", "scheduler", "scaler" (or None), "step",
     "rng": {"python", "numpy", "torch_cpu", "torch_cuda" (list, one per device) or None}: plain lists, ints,
            floats and uint8 tensors only, so a file loads with torch.load(weights_only=True),

     "rng_ranks": [rng of every rank] (distributed runs only),
     "data": {"seed", "epoch", "position"}, "config": {...}}

Files are `OUT/checkpoints/step-00000100.pt`. A file is written to a temporary name and moved into place with
`os.replace`, so a crash (or SIGKILL) while saving leaves either the old set of checkpoints or the new one,
never a truncated file under the real name. A checkpoint is only written after a step with a finite loss, so
the newest one is always the last good state.

Nothing in a checkpoint can run code: files are read with `torch.load(weights_only=True)`, whose unpickler
builds only tensors and plain containers and refuses any other class (a planted file whose pickle would
call a function is rejected before anything runs; tests/test_resume.py plants one).
"""
from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medssl.errors import TrainingError
from medssl.models.encoders import clean_state_dict as strip_prefixes  # one prefix rule for both files

FORMAT = "medssl-train/1"
_NAME = re.compile(r"^step-(\d{8})\.pt$")
# wrappers add these to parameter names: DDP ("module.") and torch.compile ("_orig_mod.")


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step-{step:08d}.pt"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoint files of a run, oldest first (temporary files of an interrupted save are ignored)."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP and/or torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ----------------------------------------------------------------------------------------------- rng
def capture_rng() -> dict:
    """The global random streams as plain lists / ints / floats and uint8 tensors (weights_only-loadable)."""
    version, words, gauss = random.getstate()           # (3, 625 ints, None or float)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [int(version), list(words), gauss],
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(state: dict) -> None:
    version, words, gauss = state["python"]
    random.setstate((int(version), tuple(int(w) for w in words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    cuda = state.get("torch_cuda")
    if cuda is not None and torch.cuda.is_available():
        # a run resumed on fewer GPUs restores the devices it has
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# --------------------------------------------------------------------------------------- save / load
def refused_pickle(err: BaseException) -> bool:
    """torch.load(weights_only=True) met a pickled class or function it will not build ("Unsupported global"),
    as opposed to a damaged file ("Unsupported operand")."""
    return isinstance(err, pickle.UnpicklingError) and "global" in str(err).lower()


def save_checkpoint(path: Path, *, model: nn.Module, optimizer, scheduler, scaler, step: int, data: dict,
                    config: dict, rng_ranks: list | None = None) -> Path:
    """Write atomically: a temporary file in the same folder, then `os.replace` onto the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "model": strip_prefixes(unwrap(model).state_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": int(step),
        "rng": capture_rng(),
        "rng_ranks": rng_ranks,
        "data": dict(data),
        "config": config,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`; TrainingError if it is unreadable or not one."""
    path = Path(path)
    fix = (f"delete {path} to resume from the previous checkpoint in {path.parent}, "
           "or point the run at a new output folder")
    try:
        # weights_only=True: tensors and plain containers only; any other pickled object is refused unrun
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if refused_pickle(err):  # torch's message suggests weights_only=False: what a planted file wants
            raise TrainingError("checkpoint holds objects other than tensors and plain data; refused without "
                                "running them (an older medssl's file, or one planted to run code)",
                                where=str(path), fix=fix) from None
        raise TrainingError(f"checkpoint cannot be read (UnpicklingError: {err})", where=str(path),
                            fix=fix) from None
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise TrainingError(f"checkpoint cannot be read ({type(err).__name__}: {err})", where=str(path),
                            fix=fix) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError("file is not a medssl training checkpoint", where=str(path), fix=fix)
    state["model"] = strip_prefixes(state["model"])
    return state


def restore_training_state(state: dict, model: nn.Module, optimizer, scheduler, scaler, where: str) -> None:
    """Load weights and optimizer/scheduler/scaler state; mismatches become one clear TrainingError."""
    target = unwrap(model)
    missing, unexpected = _key_mismatch(target.state_dict().keys(), state["model"].keys())
    if missing or unexpected:
        raise TrainingError(
            f"checkpoint does not fit the model: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}",
            where=where, fix="the model settings changed since this checkpoint was written; use a new output "
                             "folder or restore the earlier encoder/ssl settings")
    try:
        target.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise TrainingError(f"checkpoint does not fit the model/optimizer: {err}", where=where,
                            fix="use a new output folder or restore the settings it was written with") from None


def _key_mismatch(have, saved) -> tuple[list, list]:
    have, saved = set(have), set(saved)
    return sorted(have - saved), sorted(saved - have)


def remove_partial_saves(out_dir: Path) -> None:
    """Temporary files left by a process killed while saving (the real checkpoints are untouched)."""
    folder = checkpoint_dir(out_dir)
    for tmp in folder.glob(".step-*.tmp") if folder.is_dir() else []:
        tmp.unlink(missing_ok=True)


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (the newest is always the last good state)."""
    for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
