"""The default model on first start: export the shipped base (or a configured model dir) and register it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from models.errors import ExportError, NotFoundError
from service.core.config import DEFAULT_MODEL_ID, Settings
from service.jobs.supervisor import REPO_ROOT, worker_env
from service.registry import ModelRegistry

log = logging.getLogger("glasses_vision.service")
SHIPPED_BASE_DIR = REPO_ROOT / "models" / "weights" / "base"


def default_model_source(settings: Settings) -> Path:
    if settings.default_model_source is not None:
        return Path(settings.default_model_source)
    if settings.default_model != DEFAULT_MODEL_ID:
        raise NotFoundError(
            f"the default model {settings.default_model!r} is not registered and no default_model_source is set; "
            "register it or set GLASSES_VISION_DEFAULT_MODEL_SOURCE to a model directory"
        )
    return SHIPPED_BASE_DIR


def ensure_default_model(settings: Settings, registry: ModelRegistry, timeout: float = 900.0) -> None:
    """Register the default model unless it already is (exported once, then cached under the home dir)."""
    if registry.exists(settings.default_model):
        return
    source = default_model_source(settings)
    if not (source / "config.json").is_file():
        raise NotFoundError(f"no model directory at {source} to export as the default model {settings.default_model!r}")
    log.info("exporting %s to ONNX as the default model %s (first start only)", source, settings.default_model)
    with tempfile.TemporaryDirectory(dir=settings.home) as tmp:
        out = Path(tmp) / "model.onnx"
        proc = subprocess.run(
            [sys.executable, "-m", "service.jobs.exporting", "--source", str(source), "--out", str(out)],
            capture_output=True, text=True, env=worker_env(), cwd=REPO_ROOT, timeout=timeout,
        )
        last = (proc.stdout.strip().splitlines() or ["{}"])[-1]
        try:
            info = json.loads(last)
        except json.JSONDecodeError:
            info = {}
        if proc.returncode != 0 or "error" in info or not out.is_file():
            detail = info.get("message") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ExportError(f"exporting the default model from {source} failed: {detail}")
        if registry.exists(settings.default_model):  # another process won the race
            return
        registry.register(
            settings.default_model, out, move=True, source=f"export of {source}", base_model=settings.default_model,
            classes=info.get("classes"), imgsz=info.get("imgsz"), export=info.get("export", {}),
            verification=info.get("verification"),
        )
