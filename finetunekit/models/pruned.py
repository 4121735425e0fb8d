"""The shapes of a pruned network: recorded when `--prune` removes channels (finetunekit/pruning.py), saved in
the model folder as `finetunekit.pruned_layers`, and applied to a freshly built architecture before its
weights load.

A pruned layer is only its new sizes: a convolution's in/out channels and groups (a depthwise convolution
keeps groups == channels), a BatchNorm's features, a Linear's in/out features. Nothing else about a layer
changes when torch-pruning removes channels, so resizing those layers of the library's own architecture
rebuilds the pruned network exactly (no pickle of modules, as torch-pruning's own `tp.save` would need).
Other layer kinds are refused when pruning (pruning.prune) rather than saved half-described.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..errors import UserError

FIELD = "finetunekit.pruned_layers"
# the layer kinds whose sizes are recorded, and their size attributes
SIZES: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (_ConvNd, ("in_channels", "out_channels", "groups")),
    (_BatchNorm, ("num_features",)),
    (nn.Linear, ("in_features", "out_features")),
)


def _attrs(m: nn.Module) -> tuple[str, ...] | None:
    return next((attrs for kind, attrs in SIZES if isinstance(m, kind)), None)


def layer_sizes(module: nn.Module) -> dict[str, dict[str, int]]:
    """{layer name: {size attribute: value}} for every layer of a recorded kind."""
    out = {}
    for name, m in module.named_modules():
        attrs = _attrs(m)
        if attrs is not None:
            out[name] = {a: int(getattr(m, a)) for a in attrs}
    return out


def tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in (*module.named_parameters(), *module.named_buffers())}


def changed(before_sizes: dict, before_tensors: dict, module: nn.Module) -> tuple[dict, list[str]]:
    """What pruning changed: the recorded layers whose sizes differ from `before_sizes`, and the tensors whose
    shapes changed in a layer of another kind (which a saved folder could not rebuild)."""
    after = layer_sizes(module)
    layers = {n: a for n, a in after.items() if before_sizes.get(n) != a}
    others = [n for n, shape in tensor_shapes(module).items()
              if before_tensors.get(n) != shape and n.rpartition(".")[0] not in layers]
    return layers, others


def resize(m: nn.Module, sizes: dict[str, int]) -> None:
    """Give layer `m` the recorded sizes, with uninitialized tensors of the matching shapes (the saved weights
    load into them next)."""
    for a, v in sizes.items():
        setattr(m, a, v)
    if isinstance(m, _ConvNd):
        cin, cout, g = sizes["in_channels"], sizes["out_channels"], sizes["groups"]
        # [out, in/groups, *kernel]; transposed: [in, out/groups, *kernel]
        shape = (cin, cout // g, *m.kernel_size) if m.transposed else (cout, cin // g, *m.kernel_size)
        m.weight = nn.Parameter(torch.empty(shape))
        if m.bias is not None:
            m.bias = nn.Parameter(torch.empty(cout))
    elif isinstance(m, _BatchNorm):
        n = sizes["num_features"]
        if m.affine:
            m.weight, m.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))
        if m.track_running_stats:
            m.running_mean, m.running_var = torch.zeros(n), torch.ones(n)
    elif isinstance(m, nn.Linear):
        m.weight = nn.Parameter(torch.empty(sizes["out_features"], sizes["in_features"]))
        if m.bias is not None:
            m.bias = nn.Parameter(torch.empty(sizes["out_features"]))


def apply(module: nn.Module, layers: object, folder: Path, architecture: str) -> None:
    """Resize the layers of a freshly built `module` as a folder's pruned_layers says; a field that does not
    fit the architecture is one UserError naming it."""
    where = f"{folder / 'config.json'}: field {FIELD}"
    if not isinstance(layers, dict):
        raise UserError(f"{where}: expected an object of layer names")
    for name, sizes in layers.items():
        try:
            m = module.get_submodule(name)
        except AttributeError:
            raise UserError(f"{where}: {architecture} has no layer {name!r}") from None
        attrs = _attrs(m)
        if attrs is None:
            raise UserError(f"{where}: {name} is a {type(m).__name__}, not a convolution, BatchNorm or Linear layer")
        ok = isinstance(sizes, dict) and set(sizes) == set(attrs) and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1_000_000 for v in sizes.values())
        if ok and "groups" in sizes:
            ok = sizes["in_channels"] % sizes["groups"] == 0 and sizes["out_channels"] % sizes["groups"] == 0
        if not ok:
            raise UserError(f"{where}.{name}: expected positive integers {', '.join(attrs)}, got {sizes!r}"[:300])
        resize(m, sizes)
