# SPDX-License-Identifier: Apache-2.0
"""Atomic folder saves and safe reads of adapter / checkpoint folders.

A save writes everything into ``<path>.tmp``, then swaps it in with two renames: ``<path>`` -> ``<path>.old`` and
``<path>.tmp`` -> ``<path>``; ``<path>.old`` is removed last. Whatever point a save is interrupted at, one of
``<path>`` or ``<path>.old`` is a complete folder, and ``resolve_folder`` finds it. Files that were in ``<path>``
and are not rewritten (a README, a config written by someone else) are carried over into the new folder.

Reads accept safetensors only (no pickle), and JSON configs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["atomic_folder_save", "resolve_folder", "read_json", "read_safetensors", "write_safetensors",
           "copy_checked_tensors"]


def _fsync_tree(folder: Path) -> None:
    for entry in folder.rglob("*"):
        if entry.is_file():
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_folder_save(
    path: str | os.PathLike, write: Callable[[Path], None], superseded: Callable[[str], bool] | None = None
) -> Path:
    """Calls ``write(tmp_folder)`` and atomically makes ``tmp_folder`` the new ``path``.

    ``superseded(name)``: true for names of the previous folder's entries that this save replaces even when it does
    not rewrite them (a checkpoint's old shards), so they are not carried over."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path {str(path)!r} exists and is not a folder")
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)  # left behind by an interrupted save: never complete, never read
    if not path.exists() and old.is_dir():
        old.rename(path)  # an interrupted swap: restore the complete previous folder first
    tmp.mkdir(parents=True)
    write(tmp)
    if path.is_dir():
        for entry in path.iterdir():  # keep what this save does not rewrite
            target = tmp / entry.name
            if not target.exists() and not (superseded is not None and superseded(entry.name)):
                if entry.is_dir():
                    shutil.copytree(entry, target)
                else:
                    shutil.copy2(entry, target)
    _fsync_tree(tmp)
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)
    return path


def resolve_folder(path: str | os.PathLike, required: str) -> Path:
    """The folder to read ``path`` from: ``path`` itself, or ``<path>.old`` when a save was interrupted mid-swap."""
    path = Path(path)
    if (path / required).is_file():
        return path
    old = path.with_name(path.name + ".old")
    if (old / required).is_file():
        return old
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        hint = " (a pickle checkpoint: fourbit loads safetensors only)" if any(n.endswith((".bin", ".pt", ".pth")) for n in names) else ""
        raise FileNotFoundError(f"{str(path)!r} has no {required}; it contains {names}{hint}")
    raise FileNotFoundError(f"no such folder: {str(path)!r}")


def read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(file)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(file)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(file: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(file)!r} is not a readable safetensors file: {e}") from None


def write_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


def copy_checked_tensors(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Copies ``tensors`` (read from ``folder``) into the parameters ``expected`` (file key -> parameter) after
    checking all of them: the same names, the same shapes, floating point, finite. Nothing is copied if one fails."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter {str(folder)!r} does not match its config on this model: "
            f"missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, param in expected.items():
        value = tensors[key]
        if value.shape != param.shape:
            raise ValueError(f"adapter tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"adapter tensor {key} has dtype {value.dtype}; expected a floating-point tensor")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"adapter tensor {key} contains NaN or inf")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
