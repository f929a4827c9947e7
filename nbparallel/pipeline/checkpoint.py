"""Checkpoints of a pipeline's stages: every stage's arrays (each tensor rank's), on disk.

``%pipeline train ... --checkpoint-every K DIR`` saves one after every K steps (and one before
the first), so that a run whose engine died resumes, once the engine is replaced, from the last
one instead of from the cell's initial values. A checkpoint is a folder
``DIR/step-000012-<run>`` (``<run>`` tells one ``train`` call's from another's) of
``<stage>.tp<rank>.npz`` files, one per stage and tensor rank, and ``meta.json``; it is written
under another name and renamed when complete, so a crash mid-save leaves the previous one. The
last :data:`KEEP` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import UsageError

__all__ = ["KEEP", "State", "Load", "check", "save", "latest", "load"]

KEEP = 2

#: ``state(engine, stage)`` -> that engine's arrays of the stage (engine/stages.py's ``state``);
#: ``load(engine, stage, arrays)`` puts them back.
State = Callable[[int, str], list[tuple[tuple[Any, ...], Any]]]
Load = Callable[[int, str, list[tuple[tuple[Any, ...], Any]]], Any]


def check(every: int | None, directory: str | os.PathLike | None) -> Path | None:
    """The checkpoint folder (made if missing), or None when checkpointing is off."""
    if every is None and directory is None:
        return None
    if every is None or directory is None:
        raise UsageError("--checkpoint-every takes a number of steps and a folder, e.g. "
                         "--checkpoint-every 5 ckpt/.")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise UsageError(f"--checkpoint-every must be 1 or more steps, not {every!r}.")
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--checkpoint-every: cannot make the folder {path}: {exc}.") from None
    return path


def save(directory: Path, step: int, stages: dict[str, tuple[int, ...]], state: State,
         token: str = "") -> Path:
    """Every stage's arrays at ``step`` (``stages``: name -> its engines, tensor rank order);
    ``token`` names the training run it belongs to."""
    final = directory / f"step-{step:06d}-{token or 'run'}"
    tmp = directory / f".step-{step:06d}-{token or 'run'}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, engines in stages.items():
        for rank, engine in enumerate(engines):
            arrays = state(engine, name)
            np.savez(tmp / f"{name}.tp{rank}.npz", *[a for _, a in arrays])
            (tmp / f"{name}.tp{rank}.json").write_text(json.dumps([list(p) for p, _ in arrays]))
    (tmp / "meta.json").write_text(json.dumps(
        {"step": step, "token": token, "stages": {n: len(e) for n, e in stages.items()}}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    ours = sorted(p for p in directory.glob("step-*") if _token(p) == token)
    for old in ours[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(directory: Path, token: str = "") -> tuple[int, Path]:
    """The newest complete checkpoint of run ``token``: (its step, its folder)."""
    done = []
    for folder in directory.glob("step-*"):
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or not complete
        if meta.get("token") == token:
            done.append((meta["step"], folder))
    if not done:
        raise UsageError(f"no checkpoint of this run in {directory}: was the folder emptied "
                         f"while it trained?")
    return max(done)


def _token(folder: Path) -> str | None:
    try:
        return json.loads((folder / "meta.json").read_text()).get("token")
    except (OSError, ValueError):
        return None


def load(folder: Path, stages: dict[str, tuple[int, ...]], put: Load) -> None:
    """Put a checkpoint's arrays back into the stages, which must be the ones it was made of."""
    meta = json.loads((folder / "meta.json").read_text())
    want = {n: len(e) for n, e in stages.items()}
    if meta["stages"] != want:
        raise UsageError(f"the checkpoint {folder} holds stages {meta['stages']} (name: tensor "
                         f"ranks), but the pipeline has {want}; use another folder for another "
                         f"model.")
    for name, engines in stages.items():
        for rank, engine in enumerate(engines):
            paths = json.loads((folder / f"{name}.tp{rank}.json").read_text())
            with np.load(folder / f"{name}.tp{rank}.npz") as saved:
                arrays = [(tuple(p), saved[f"arr_{i}"]) for i, p in enumerate(paths)]
            put(engine, name, arrays)
