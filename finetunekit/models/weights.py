"""Reading weight files safely (safetensors, or a weights-only torch state dict; never arbitrary pickle)
and loading them into a backbone whose head may differ."""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch

from ..errors import UserError, first_line
from .base import Backbone

log = logging.getLogger("finetunekit")


def weights_sha256(module: torch.nn.Module, skip=lambda name: False) -> str:
    """SHA-256 of a module's tensors (each name, dtype, shape and bytes, in state-dict order), those whose name
    `skip` accepts left out: the identity of weights for caches, fingerprints and adapter folders."""
    import hashlib

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if not skip(name):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_safetensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; damage (empty, truncated, not safetensors) is one line starting `where`."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors reports damage as several exception types
        raise UserError(f"{where}: not a readable safetensors file ({first_line(e)})") from None


def read_state_dict(path: Path, option: str = "--weights") -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{option} {path}: no such file")
    if path.suffix == ".safetensors":
        return load_safetensors(path, f"{option} {path}")
    if path.stat().st_size == 0:
        raise UserError(f"{option} {path}: empty file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, AttributeError, ImportError, TypeError) as e:
        raise UserError(f"{option} {path}: refused: not a weights-only state dict (torch.load with "
                        f"weights_only=True: {_unpickler_reason(e)}); convert it to .safetensors") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise UserError(f"{option} {path}: not a readable torch state dict, damaged or truncated "
                        f"({first_line(e)})") from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{option} {path}: expected a state dict of tensors")
    return obj


def _unpickler_reason(e: BaseException) -> str:
    """The one informative line of torch's weights_only message ("Unsupported global: GLOBAL x.Y ...")."""
    match = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
    return match.group(1).strip()[:200] if match else first_line(e)


def _strip_prefixes(sd: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "model.", "_orig_mod."):
        if not (set(sd) & own) and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(backbone: Backbone, sd: dict[str, torch.Tensor], origin: str) -> None:
    """Load every non-head tensor (all must be there); load the head too where its shape matches."""
    own = backbone.module.state_dict()
    sd = _strip_prefixes(sd, set(own))
    head = backbone.is_head
    body_missing = [k for k in own if k not in sd and not head(k)]
    mismatched = [k for k in own if k in sd and not head(k) and sd[k].shape != own[k].shape]
    if body_missing or mismatched:
        bad = (body_missing or mismatched)[:3]
        what = "missing" if body_missing else "of another shape"
        raise UserError(f"{origin}: does not fit {backbone.source}:{backbone.architecture}: "
                        f"{len(body_missing) or len(mismatched)} tensors {what} (e.g. {', '.join(bad)})")
    head_fits = all(k in sd and sd[k].shape == v.shape for k, v in own.items() if head(k))
    keep = {k: v for k, v in sd.items() if k in own and (head_fits or not head(k))}
    backbone.module.load_state_dict(keep, strict=False)
    unused = len(sd) - len(keep)
    log.info("loaded %s (%d tensors; head %s%s)", origin, len(keep),
             "loaded" if head_fits else "newly initialized",
             f"; {unused} unused tensors" if unused else "")
