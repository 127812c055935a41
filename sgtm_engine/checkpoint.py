"""Checkpoints that resume exactly: weights, every optimizer state, RNG states, data position and the resolved spec.

Layout of `<workdir>/checkpoints/step-0000120/`:
- `config.json` + `model.safetensors`: the weights in Hugging Face layout (loadable by stock `transformers`);
- `state.pt`: optimizer state, sampler state, RNG states, step, format version, resolved spec, metric history;
- `manifest.json`: sha256 of each file (the service references checkpoints by URI + sha256, never copies them).
A checkpoint is written to a temporary folder and renamed into place, and `latest` is replaced atomically, so a
process killed mid-write leaves the previous checkpoint intact. Only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sgtm_engine.model.gpt_neo import GPTNeoLM
from sgtm_engine.model.hf import load_hf, save_hf

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]

    def load_model(self, device: str | torch.device = "cpu") -> GPTNeoLM:
        return load_hf(self.path, device=device)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(root: Path, step: int, model: GPTNeoLM, state: dict[str, Any], keep: int = 2,
                    eos_token_id: int | None = None, pad_token_id: int | None = None) -> Path:
    """Write checkpoint `step` under `root/checkpoints/` atomically; returns its folder."""
    ckpts = root / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"step-{step:07d}"
    tmp = ckpts / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, tmp, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    torch.save({"format_version": FORMAT_VERSION, "step": step, **state}, tmp / "state.pt")
    manifest = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = ckpts / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, ckpts / "latest")
    others = sorted(p for p in ckpts.glob("step-*") if p != final)
    for old in others[: max(0, len(others) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest complete checkpoint under `root/checkpoints/`, or None. Called as a stage starts, it first removes
    what a killed writer left half-written: a partial checkpoint can be gigabytes, and on a full disk it would make
    every later attempt fail at once."""
    remove_partial_checkpoints(root)
    pointer = root / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = root / "checkpoints" / pointer.read_text().strip()
    if not (path / "state.pt").exists():
        return None
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    state = _upgrade(state)
    return Checkpoint(path, int(state["step"]), state)


def remove_partial_checkpoints(root: Path) -> None:
    """Delete `.tmp-step-*` folders and a stray `.latest.tmp` (only the workdir's one engine process writes here)."""
    ckpts = root / "checkpoints"
    for partial in ckpts.glob(".tmp-step-*"):
        shutil.rmtree(partial, ignore_errors=True)
    (ckpts / ".latest.tmp").unlink(missing_ok=True)


def _upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """Patch older checkpoint formats forward (none yet: version 1 is the first)."""
    version = state.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise ValueError(f"checkpoint format {version} is newer than this code ({FORMAT_VERSION}); upgrade sgtm")
    return state


#: Spec blocks that say where and how a run executes, not what it computes: a run may resume under other values.
NOT_IDENTITY = ("runtime",)


def spec_differences(saved: Any, current: Any, field: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, saved value, current value) for every field where two specs (as plain data) differ, ignoring
    the top-level blocks in NOT_IDENTITY. Resuming is refused when this is non-empty."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else [(field or "<spec>", saved, current)]
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(saved) | set(current)):
        if not field and key in NOT_IDENTITY:
            continue
        out += spec_differences(saved.get(key), current.get(key), f"{field}.{key}" if field else key)
    return out


def describe_differences(differences: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    shown = ", ".join(f"{field}: {old!r} -> {new!r}" for field, old, new in differences[:limit])
    more = len(differences) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def checkpoint_digest(path: Path) -> str:
    """One sha256 for a checkpoint folder: the hash of its manifest."""
    return sha256_file(path / "manifest.json")
