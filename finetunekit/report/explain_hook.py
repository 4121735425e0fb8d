"""Where the report asks for an explanation of an image: `finetunekit.explain.explain_image(model, path)`
(a Grad-CAM overlay, PIL image), when that module exists. Any failure (no such module, a model it cannot
explain, an error) gives None and the report shows the thumbnail alone."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

log = logging.getLogger("finetunekit")


class Explainer:
    """One per report: imports finetunekit.explain and loads the run's model once, on first use."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._state: tuple | None = None  # (explain_image, model), or () when unavailable

    def _ready(self) -> tuple:
        if self._state is None:
            try:
                from ..explain import explain_image  # another module's: absent until it lands
                from ..artifacts import load

                self._state = (explain_image, load(self.run_dir))
            except ImportError:
                self._state = ()
            except Exception as e:  # noqa: BLE001 - an explanation is optional: the report goes on without
                log.debug("report: no explanations (%s: %s)", type(e).__name__, e)
                self._state = ()
        return self._state

    def __call__(self, path: Path) -> Image.Image | None:
        """The overlay for the image at `path`, or None."""
        state = self._ready()
        if not state:
            return None
        explain_image, model = state
        try:
            overlay = explain_image(model, path)
        except Exception as e:  # noqa: BLE001 - see the class docstring
            log.debug("report: no explanation for %s (%s: %s)", path, type(e).__name__, e)
            return None
        return overlay if isinstance(overlay, Image.Image) else None
