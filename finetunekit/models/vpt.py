"""Visual prompt tuning (`--peft prompt` on a timm ViT; Jia et al. 2022, "VPT-shallow"): N trainable tokens
inserted into the patch sequence after the position embeddings, behind the class (and register) tokens, so
every block attends to them; the pretrained weights stay frozen and the new head trains.

timm's VisionTransformer runs `patch_embed -> _pos_embed -> patch_drop -> norm_pre -> blocks -> norm -> head`.
The glue replaces `patch_drop` with `VisualPrompts`, which calls the original module and then inserts its
tokens, and a forward pre-hook on `norm` takes them out again after the last block, so the final norm, the
pooling (class token or average of the patches), `num_prefix_tokens` and position-embedding resampling
(dynamic_img_size) all see the sequence they were built for. The tokens live in an nn.Embedding (as peft's
own prompt encoder keeps them): the optimizer gives embedding tables no weight decay. State-dict name:
`patch_drop.embedding.weight`; no other name changes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UserError

ARCH_MODULES = ("timm.models.vision_transformer", "timm.models.deit")  # VisionTransformer and its subclasses


def supports(name: str) -> bool:
    """Whether timm's `name` is a VisionTransformer (cheap: its entry point's module, no model built)."""
    from timm.models import get_arch_name, model_entrypoint

    try:
        return model_entrypoint(get_arch_name(name)).__module__ in ARCH_MODULES
    except Exception:  # noqa: BLE001 - an unknown name: check_name reports it
        return False


class VisualPrompts(nn.Module):
    """The module that ran before (`inner`), then `n` learned tokens inserted after the first `prefix` ones."""

    def __init__(self, inner: nn.Module, n: int, dim: int, prefix: int, patch_size: int):
        super().__init__()
        self.inner, self.prefix = inner, prefix
        self.embedding = nn.Embedding(n, dim)
        bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))  # VPT's initialization (xavier-uniform)
        nn.init.uniform_(self.embedding.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inner(x)
        prompts = self.embedding.weight.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :self.prefix], prompts, x[:, self.prefix:]], dim=1)


class _StripPrompts:
    """A forward pre-hook on the final norm: the sequence without the `n` prompt tokens after `prefix`."""

    def __init__(self, prefix: int, n: int):
        self.prefix, self.n = prefix, n

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (torch.cat([x[:, :self.prefix], x[:, self.prefix + self.n:]], dim=1), *args[1:])


def apply(module: nn.Module, n: int, architecture: str) -> list[str]:
    """Insert `n` visual prompt tokens into timm ViT `module`, in place; returns the new parameters' names."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(module, VisionTransformer):
        raise UserError(f"--peft prompt: timm's {architecture} is not a VisionTransformer; visual prompt tuning "
                        f"inserts tokens into a ViT's patch sequence (use --peft lora for other models)")
    patch = module.patch_embed.patch_size
    prefix = module.num_prefix_tokens
    module.patch_drop = VisualPrompts(module.patch_drop, n, module.embed_dim, prefix,
                                      int(patch[0] if isinstance(patch, (tuple, list)) else patch))
    module.norm.register_forward_pre_hook(_StripPrompts(prefix, n))
    return [f"patch_drop.{name}" for name, _ in module.patch_drop.named_parameters()]
