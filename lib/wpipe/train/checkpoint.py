"""Checkpoints of a training run: write, find, verify, load, prune.

A checkpoint is one folder `<checkpoint_dir>/period_<P>` (P = updates done, 6 digits):

    rank00000.pt ...   every rank's state (torch.save, tensors and plain values only):
                       its Pipeline.state_dict, its RNG states and what the runner hands
                       in (data position, losses and history so far)
    manifest.json      written last by rank 0: period, epoch, position, world size, the
                       resolved config, and each rank file's name, size and sha256

Each rank writes a temporary file, fsyncs it and renames it into place; after every rank
is done (a collective), rank 0 writes the manifest the same way. A folder without a
manifest is not a checkpoint (a crash while writing leaves one: pruning removes it).
`checkpoint_dir` must be one folder that every rank sees (shared storage across nodes).

Checks of a checkpoint to resume from (`find`) need no process group: they run before
any process starts talking, so a bad checkpoint fails as bad input (CheckpointError).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import CheckpointError
from ..files import write_atomic

FORMAT = 1
MANIFEST = "manifest.json"
FOLDER = re.compile(r"^period_(\d+)$")
# Fields a resumed run may change: where things go, how often to save or log, waits.
# Every other field must equal the checkpoint's (method, layout, model, data, optimizer...).
FREE_ON_RESUME = {"output_dir", "checkpoint_dir", "resume", "checkpoint_every", "keep_checkpoints",
                  "log_every", "timeout_s", "num_workers", "backend", "verify_data", "max_eval_batches",
                  "on_nonfinite", "communicators"}


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def folder_name(period: int) -> str:
    return f"period_{period:06d}"


# ---------------------------------------------------------------- writing (collective)

def save(root: Path, period: int, state: dict, info: dict, cfg, keep: int) -> Path:
    """Write this rank's `state` into `root/period_<period>`; rank 0 then writes the
    manifest (with `info`: epoch, position, ...) and prunes to the newest `keep` (0: keep
    all). Called on every rank at the same point. Returns the folder."""
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = Path(root) / folder_name(period)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)  # an older attempt at this period: no longer complete
    dist.barrier()
    name = rank_file(rank)
    size, digest = _write_atomic(folder / name, lambda f: torch.save({"format": FORMAT, "rank": rank,
                                                                     **state, "rng": rng_state()}, f))
    entries = [None] * world
    dist.all_gather_object(entries, {"name": name, "rank": rank, "size": size, "sha256": digest})
    if rank == 0:
        manifest = {"format": FORMAT, "period": period, "world_size": world, **info,
                    "config": dataclasses.asdict(cfg), "files": entries}
        _write_atomic(folder / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        prune(Path(root), keep)
    dist.barrier()  # nobody goes on (or exits) before the checkpoint is complete
    return folder


def prune(root: Path, keep: int) -> None:
    """Keep the `keep` complete checkpoints written last (0: all); remove the others, and
    incomplete folders of fewer periods than the one written last. Written last, not most
    periods: a run started afresh, or resumed from an older checkpoint, into a folder that
    holds checkpoints of more periods replaces them as it goes."""
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := FOLDER.match(p.name)))
    complete = sorted(((n, p) for n, p in found if (p / MANIFEST).is_file()), key=_written)
    if not complete:
        return
    newest = complete[-1][0]
    old = complete[:-keep] if keep else []
    partial = [(n, p) for n, p in found if not (p / MANIFEST).is_file() and n < newest]
    for _, p in old + partial:
        shutil.rmtree(p, ignore_errors=True)


def _write_atomic(path: Path, write) -> tuple[int, str]:
    """write(file) into `path`, durably and atomically (files.write_atomic); (size, sha256)."""
    hashing = None

    def hashed(f):
        nonlocal hashing
        hashing = _Hashing(f)
        write(hashing)
    write_atomic(path, hashed, durable=True)
    return hashing.size, hashing.sha256.hexdigest()


class _Hashing:
    """A write-only file that hashes and counts what passes through."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


# ---------------------------------------------------------------- finding and checking (no process group)

def latest(root: Path) -> Path | None:
    """The complete checkpoint under `root` written last (see `prune`), or None."""
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := FOLDER.match(p.name)) and (p / MANIFEST).is_file()]
    return max(found, key=_written)[1] if found else None


def _written(entry: tuple[int, Path]) -> tuple[int, int]:
    """Order of writing: the manifest's modification time (rank 0 writes every manifest,
    so one clock), then periods."""
    periods, folder = entry
    return (folder / MANIFEST).stat().st_mtime_ns, periods


def find(cfg, rank: int) -> tuple[Path, dict] | None:
    """The checkpoint `cfg.resume` names, checked: (folder, manifest), or None for a fresh
    start (resume unset, or `auto` with no complete checkpoint yet). Rank 0 checks that
    every rank's file is there with its size; each rank reads its own file for the sha256
    (in parallel: rank 0 alone would read the whole model)."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        folder = latest(cfg.checkpoint_root)
        if folder is None:
            return None
    else:
        folder = Path(cfg.resume)
        if not (folder / MANIFEST).is_file():
            folder = latest(folder) if folder.is_dir() else None
            if folder is None:
                raise CheckpointError(f"resume: {cfg.resume} is not a checkpoint (no {MANIFEST} in it or in a "
                                      f"period_* folder under it): give a checkpoint folder, a checkpoint_dir, "
                                      f"or auto")
    manifest = read_manifest(folder)
    check_config(folder, manifest, cfg)
    for entry in manifest["files"]:
        if rank == 0 or entry["rank"] == rank:
            try:
                verify_file(folder, entry, digest=entry["rank"] == rank)
            except CheckpointError as error:
                error.rank_only = rank != 0
                raise
    return folder, manifest


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: unreadable ({error}); resume from another checkpoint") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            not {"period", "world_size", "config", "files"} <= manifest.keys():
        raise CheckpointError(f"checkpoint {path}: not a manifest of format {FORMAT} (expected keys period, "
                              f"world_size, config, files)")
    return manifest


def check_config(folder: Path, manifest: dict, cfg) -> None:
    """Refuse a checkpoint of another run, naming the first field that differs."""
    saved, current = manifest["config"], dataclasses.asdict(cfg)
    for name in [*current, *(k for k in saved if k not in current)]:
        if name in FREE_ON_RESUME:
            continue
        if name not in saved or name not in current:
            raise CheckpointError(f"checkpoint {folder} was written by another program: config field {name!r} "
                                  f"exists only in {'this run' if name in current else 'the checkpoint'}")
        if saved[name] != current[name]:
            raise CheckpointError(f"checkpoint {folder} was written with {name}={saved[name]!r} but this run has "
                                  f"{name}={current[name]!r}: resume with the same {name}, or start afresh "
                                  f"with another checkpoint_dir")
    world = cfg.pipeline_depth * cfg.data_parallel
    if manifest["world_size"] != world or sorted(e["rank"] for e in manifest["files"]) != list(range(world)):
        raise CheckpointError(f"checkpoint {folder} holds {len(manifest['files'])} rank files of world size "
                              f"{manifest['world_size']}, this run has {world} ranks")


def verify_file(folder: Path, entry: dict, digest: bool = True) -> None:
    """The file of a manifest entry is there with its size (and, if `digest`, its sha256)."""
    path = folder / entry["name"]
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing (listed in {folder / MANIFEST})")
    size = path.stat().st_size
    if size != entry["size"]:
        raise CheckpointError(f"checkpoint file {path} is corrupt: {size} bytes, the manifest says {entry['size']}")
    if not digest:
        return
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha256.update(block)
    if sha256.hexdigest() != entry["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is corrupt: its sha256 differs from the manifest's")


def load(folder: Path, rank: int, device: torch.device) -> dict:
    """This rank's saved state (tensors on `device`); restores its RNG states."""
    state = torch.load(folder / rank_file(rank), map_location=device, weights_only=True)
    if state.get("rank") != rank:
        raise CheckpointError(f"checkpoint file {folder / rank_file(rank)} holds rank {state.get('rank')}'s state")
    set_rng_state(state["rng"])
    return state


# ---------------------------------------------------------------- RNG

def rng_state() -> dict:
    """Every random generator a run draws from: torch (CPU, this CUDA device), numpy, Python."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
            "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu())
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy(), *rest))
    random.setstate(state["python"])
