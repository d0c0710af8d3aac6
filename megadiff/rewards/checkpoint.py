"""Loading reward checkpoints from local files, with one-line errors that name the file and
the format it should have. Every failure here happens at load time, before training starts."""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def bad_file(label: str, path: str | Path, expected: str, why: str) -> ValueError:
    return ValueError(f"{label}: {path} is not {expected} ({why}): point the reward's path at that file")


def require_path(label: str, path: str | Path | None, expected: str, key: str = "path",
                 directory: bool = False) -> Path:
    if path is None:
        raise ValueError(f"{label}: {key} is not set: give the local {expected}")
    p = Path(path).expanduser()
    ok = p.is_dir() if directory else p.is_file()
    if not ok:
        what = "directory" if directory else "file"
        raise ValueError(f"{label}: {key}={path} is not an existing {what}: give the local {expected}")
    return p


def load_state_dict_file(label: str, path: Path, expected: str,
                         key: str | None = None, key_required: bool = True) -> dict[str, torch.Tensor]:
    """torch.load -> a flat {name: tensor} dict, taken from `obj[key]` when `key`
    is given (HPS's {'state_dict': ...}; optional where `key_required` is False, as open_clip's
    `load_state_dict` accepts both); a leading `module.` (DDP) is stripped like open_clip's
    and HPSv2's `load_state_dict` do."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # A complete file that pickles more than tensors (e.g. a training checkpoint with its
        # argparse Namespace): HPSv2's img_score unpickles it in full; megadiff does not.
        raise ValueError(f"{label}: {path} pickles objects besides tensors ({first_line(e)[:120]}); "
                         "megadiff loads reward weights with weights_only=True only: if you trust the "
                         "file, keep just its weights with python -c \"import torch; "
                         f"torch.save({{'{key or 'state_dict'}': torch.load('{path}', weights_only=False)"
                         f"['{key or 'state_dict'}']}}, 'weights.pt')\" and point path at weights.pt") from None
    except Exception as e:  # truncated zip, not a torch file
        raise bad_file(label, path, expected, f"torch.load failed: {first_line(e)}") from None
    if key is not None and (key_required or (isinstance(obj, Mapping) and key in obj)):
        if not isinstance(obj, Mapping) or key not in obj:
            found = sorted(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
            raise bad_file(label, path, expected, f"no {key!r} entry; found {found}")
        obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise bad_file(label, path, expected, "not a non-empty mapping of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_strict(label: str, module: nn.Module, state: dict[str, torch.Tensor], path: Path,
                expected: str) -> None:
    """Every key present with the right shape, nothing extra: a wrong architecture fails here."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
        if extra:
            parts.append(f"{len(extra)} unexpected keys, e.g. {extra[0]}")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} shape mismatches, e.g. {k} {tuple(state[k].shape)} vs "
                         f"{tuple(own[k].shape)}")
        raise bad_file(label, path, expected, "wrong architecture: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
