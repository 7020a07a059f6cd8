"""Files of tensors plus JSON metadata, in a format that cannot carry code.

Saved models (distillation teachers) and trial checkpoints are read back from places a user
or another node can write to (a shared bucket, NFS). `torch.load` of a pickle would run any
code planted in such a file, so ufw writes them as safetensors (a JSON header and raw tensor
bytes, nothing executable) and keeps everything that is not a tensor as JSON in the header.

A file holds one value of a `kind` (`MODEL`, `CHECKPOINT`): nested dicts and lists of JSON
values and tensors. Tensors are stored by number (`t0`, `t1`, ...), marked in the tree by
`{"__tensor__": "t0"}`, and put back in place on loading. A file that is not a ufw file of
that kind is refused with a `ConfigError` naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ufw.config import ConfigError

MODEL = "ufw-model"  # Population.save_member: one member's parameters, config and vocabulary
CHECKPOINT = "ufw-trial-checkpoint"  # a sweep trial's populations and epoch rows
FORMAT_VERSION = "1"
_TENSOR = "__tensor__"  # marks a tensor's place in the JSON tree


def save(path: str | os.PathLike, value: Any, kind: str) -> None:
    """Write `value` (dicts, lists, JSON values, tensors) as a `kind` file at `path`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _split(value, tensors, set())
    metadata = {"format": kind, "version": FORMAT_VERSION, "tree": json.dumps(tree)}
    save_file(tensors, str(path), metadata=metadata)


def load(path: str | os.PathLike, kind: str, device: str | torch.device = "cpu",
         what: str = "file") -> Any:
    """Read a file written by `save` with the same `kind`; ConfigError for anything else."""
    from safetensors import safe_open

    described = f"{what} {path}"
    if not Path(path).is_file():
        raise ConfigError(f"{described}: no such file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != kind:
                raise ConfigError(f"{described}: not a {kind} file (format "
                                  f"{metadata.get('format')!r})")
            if metadata.get("version") != FORMAT_VERSION:
                raise ConfigError(f"{described}: {kind} version {metadata.get('version')!r}; "
                                  f"this ufw reads version {FORMAT_VERSION}")
            tree = json.loads(metadata["tree"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except ConfigError:
        raise
    except Exception as e:  # a pickle, a truncated file, any other bytes: refuse them all
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{described}: not a {kind} file (a safetensors file written by "
                          f"ufw); {detail}") from None
    try:
        return _join(tree, tensors)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{described}: damaged {kind} file (missing tensor {e})") from None


def kind_of(path: str | os.PathLike) -> str | None:
    """The kind of a file written by `save` (None: not one), from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # any other bytes
        return None


def _split(value: Any, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    """The JSON tree of `value`, its tensors moved into `tensors` (`storages`: seen memory)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().contiguous()
        # safetensors refuses tensors that share memory: copy only those (a copy of a large
        # population's state would double the checkpoint's memory).
        if tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        name = f"t{len(tensors)}"
        tensors[name] = tensor
        return {_TENSOR: name}
    if isinstance(value, dict):
        return {str(k): _split(v, tensors, storages) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, tensors, storages) for v in value]
    return value


def _join(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        return {k: _join(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, tensors) for v in tree]
    return tree
