"""finetunekit: fine-tune pretrained PyTorch models on your own data.

    import finetunekit
    run = finetunekit.fit({"data": {"path": "pets/"}, "model": {"name": "efficientnet_lite0"}})
    model = finetunekit.load(run.run_dir)
    model.predict(["cat.jpg"])
"""

from __future__ import annotations

__version__ = "0.1.0"

import logging
from typing import TYPE_CHECKING, Any

from .config import Recipe

# transformers imports torchao (installed for --qat) when it builds a model, and torchao's import makes torch's
# pytree logger warn about its Enum registrations on stderr: library noise in every text run, and a second line
# under our one-line errors
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
from .errors import UserError

if TYPE_CHECKING:
    from .inference import FineTunedModel
    from .run import RunResult

__all__ = ["Recipe", "UserError", "evaluate", "fit", "load", "predict"]


# torch-heavy modules load on first use, so `import finetunekit` and the CLI's validation stay fast
def fit(recipe: Any = None, **overrides: Any) -> RunResult:
    from .run import fit as _fit

    return _fit(recipe, **overrides)


def evaluate(run: Any, data: Any, **kwargs: Any) -> dict:
    from .run import evaluate as _evaluate

    return _evaluate(run, data, **kwargs)


def load(run: Any) -> FineTunedModel:
    from .artifacts import load as _load

    return _load(run)


def predict(run: Any, images: Any, **kwargs: Any) -> list[dict]:
    return load(run).predict(images, **kwargs)


fit.__doc__ = "Fine-tune as a Recipe (object, dict or YAML path) says; see finetunekit.run.fit."
