"""Opening image files with Pillow's own ``Image.open``.

Importing ultralytics replaces ``PIL.Image.open`` with a wrapper that, for a file
Pillow cannot identify, calls ``check_requirements("pi-heif")`` - a pip install
when online, a ``ModuleNotFoundError`` offline. A corrupt upload or dataset file
must become one of our clear errors, never an install, so every place that opens
images goes through :func:`pil_open`. Pillow is imported lazily: the exported
runtime works without it when given arrays.
"""

from __future__ import annotations

import sys
from typing import Any


def pil_open(fp: Any, formats: tuple[str, ...] | None = None):
    """``PIL.Image.open(fp, formats=formats)``, bypassing ultralytics' wrapper if it is installed."""
    from PIL import Image

    opener = Image.open
    if getattr(opener, "__module__", "PIL.Image") != "PIL.Image":
        opener = getattr(sys.modules.get("ultralytics.utils.patches"), "_image_open", opener)
    return opener(fp, formats=formats) if formats is not None else opener(fp)
