"""Adversarial attacks on image models, L-infinity in [0, 1] pixel space: FGSM and PGD.

Each attack takes `model`, a function from pixel images [B, 3, H, W] in [0, 1] to logits (the model's own
normalization inside it: runner.Normalized), the clean images `x`, their targets `y`, `loss` (per-sample
loss of logits and targets: the task's plain `eval_loss`), the radius `eps` in pixel units of [0, 1]
(8/255 = 8 grey levels), and `seeds` (one int per sample: PGD's random start, independent of the batch
size). It returns the perturbed images: |x_adv - x| <= eps and 0 <= x_adv <= 1 everywhere. Gradients are
taken with respect to the images only (torch.autograd.grad on the input); the model stays in eval mode.

    fgsm   Goodfellow et al. 2015: one step of eps along the sign of the loss gradient
    pgd    Madry et al. 2018: a uniform random start in the eps-ball, `steps` steps of `step_size` along the
           sign of the gradient, each projected back onto the eps-ball and [0, 1]; for single-label
           classification a sample keeps the first iterate that the model gets wrong (an adversarial example;
           later steps might undo it)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Model = Callable[[torch.Tensor], torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def input_gradient(model: Model, x: torch.Tensor, y: torch.Tensor, loss: Loss) -> tuple[torch.Tensor, torch.Tensor]:
    """(d sum(loss) / d x, the logits at x): the gradient with respect to the images alone."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        (grad,) = torch.autograd.grad(loss(logits, y).sum(), x)
    return grad, logits.detach()


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """`x_adv` clipped to the eps-ball around `x` and to [0, 1]."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)


def fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, loss: Loss, eps: float, seeds: Sequence[int] = (),
         **_) -> torch.Tensor:
    grad, _ = input_gradient(model, x, y, loss)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def random_start(x: torch.Tensor, eps: float, seeds: Sequence[int]) -> torch.Tensor:
    """Uniform noise in [-eps, eps] shaped like `x`, each sample's drawn from its own seed (on the CPU: the
    same numbers whatever the device and the batch)."""
    noise = torch.stack([torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds])
    return ((noise * 2 - 1) * eps).to(x.device, x.dtype)


def pgd(model: Model, x: torch.Tensor, y: torch.Tensor, loss: Loss, eps: float, seeds: Sequence[int] = (),
        steps: int = 10, step_size: float | None = None, keep_first_success: bool = True) -> torch.Tensor:
    """`step_size`: default 2.5 * eps / steps (Madry et al.'s choice: the iterates can cross the ball)."""
    step = 2.5 * eps / steps if step_size is None else step_size
    x = x.detach()
    x_adv = project(x + random_start(x, eps, seeds), x, eps) if eps > 0 else x.clone()
    if keep_first_success and not y.is_floating_point():  # single-label: a fooled sample keeps its iterate
        active = torch.arange(len(x), device=x.device)  # the samples still scored right: only they move on
        for _ in range(steps):
            grad, logits = input_gradient(model, x_adv[active], y[active], loss)
            right = logits.argmax(-1) == y[active]
            active, grad = active[right], grad[right]
            if not len(active):
                break
            x_adv[active] = project(x_adv[active] + step * grad.sign(), x[active], eps)
        return x_adv.detach()
    for _ in range(steps):
        grad, _ = input_gradient(model, x_adv, y, loss)
        x_adv = project(x_adv + step * grad.sign(), x, eps)
    return x_adv.detach()


# --attack name -> the attack (robustness.ATTACK_NAMES lists the same names, torch-free, for the CLI)
ATTACKS: dict[str, Callable[..., torch.Tensor]] = {"fgsm": fgsm, "pgd": pgd}
