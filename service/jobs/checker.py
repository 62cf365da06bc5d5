"""The library's own checks of a job, run in a child process so that the API process never imports torch.

The API checks types and bounds itself (``training.settings``, torch-free); what
only the library knows - optimizer and PEFT names and their keyword settings,
augmentation settings, base model names, the exporter's opset range, and every
combination ``TrainConfig.validate`` refuses - is checked here, by the same code
that will train and export the job. One child is started on the first job
submission, answers one JSON line per job, and exits after ``idle_seconds``
without work (it holds torch, ~300 MB, only while jobs are being submitted).

Child protocol (``python -m service.jobs.checker``): one JSON object per line in,
``{"ok": true}`` or ``{"error": "<type>", "message": "..."}`` per line out.
"""

from __future__ import annotations

import json
import logging
import select
import subprocess
import sys
import threading
import time
from typing import Any

from models.errors import ConfigError, GlassesVisionError
from service.core.errors import NotReadyError

log = logging.getLogger("glasses_vision.service")

#: First answer includes importing torch and the library (slow on a busy 2-core machine).
START_TIMEOUT_S = 180.0
ANSWER_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------- inside the child
def check_with_library(values: dict[str, Any], export: dict[str, Any]) -> None:
    """Everything the library refuses about a job; raises its ``GlassesVisionError`` (runs where torch may load)."""
    import torch

    from export.onnx_export import MAX_OPSET, MIN_OPSET
    from models.registry import list_models
    from training.config import TrainConfig
    from training.optim import build_optimizer

    base = values.get("base")
    if base not in list_models():
        raise ConfigError(f"unknown base_model {base!r}; use one of {', '.join(list_models())}")
    opset = export.get("opset")
    if opset is not None and not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise ConfigError(f"export.opset: {opset} is outside the exporter's supported range {MIN_OPSET}..{MAX_OPSET}")
    try:
        config = TrainConfig.from_dict(values).validate()
    except (TypeError, ValueError) as exc:
        if isinstance(exc, GlassesVisionError):
            raise
        raise ConfigError(f"invalid training settings: {exc}") from None
    # validate() has checked the PEFT method and its settings exactly as the recipe applies them
    # The optimizer is built over two tiny tensors shaped like a conv weight and a bias: the library checks
    # its name, its keyword settings and their values exactly as the recipe will.
    params = [torch.nn.Parameter(torch.zeros(8, 4, 3, 3)), torch.nn.Parameter(torch.zeros(8))]
    try:
        build_optimizer(config.optimizer, params, lr=config.lr, weight_decay=config.weight_decay,
                        accumulate=config.accumulate, clip_grad_norm=config.grad_clip or None,
                        **config.optimizer_settings)
    except GlassesVisionError as exc:
        raise ConfigError(f"optimizer_settings: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer_settings: {exc}") from None


def _answer(line: str) -> dict[str, Any]:
    try:
        request = json.loads(line)
        check_with_library(request["values"], request.get("export") or {})
    except GlassesVisionError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    except Exception as exc:  # a library bug must not pass a job: refuse it, say why
        return {"error": "ConfigError", "message": f"the job cannot be checked ({type(exc).__name__}: {exc})"}
    return {"ok": True}


def main(idle_seconds: float = 300.0) -> int:
    import os

    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    import torch

    torch.set_num_threads(1)
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], idle_seconds)
        if not ready:
            return 0
        line = sys.stdin.readline()
        if not line:
            return 0
        sys.stdout.write(json.dumps(_answer(line)) + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------- in the API process
class JobChecker:
    """The API side: one child at a time, started on demand, restarted if it died or idled out."""

    def __init__(self, idle_seconds: float = 300.0):
        self.idle_seconds = idle_seconds
        self._proc: subprocess.Popen | None = None
        self._answered = False  # the current child has answered once (its imports are done)
        self._lock = threading.Lock()

    def warm(self) -> None:
        """Start the child now (it imports torch in the background), so the first submission does not wait."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc, self._answered = self._start(), False

    def _start(self) -> subprocess.Popen:
        from service.jobs.supervisor import REPO_ROOT, worker_env

        return subprocess.Popen(
            [sys.executable, "-c", f"import sys, service.jobs.checker as c; sys.exit(c.main({self.idle_seconds!r}))"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
            env=worker_env(), cwd=REPO_ROOT,
        )

    def check(self, values: dict[str, Any], export: dict[str, Any]) -> None:
        """Raise ``ConfigError`` (422) for what the library refuses; ``NotReadyError`` (503) if it cannot answer."""
        line = json.dumps({"values": values, "export": export}, default=str) + "\n"
        with self._lock:
            for attempt in range(2):
                if self._proc is None or self._proc.poll() is not None:
                    self._proc, self._answered = self._start(), False
                proc, fresh = self._proc, not self._answered
                try:
                    assert proc.stdin is not None and proc.stdout is not None
                    proc.stdin.write(line)
                    proc.stdin.flush()
                    timeout = START_TIMEOUT_S if fresh else ANSWER_TIMEOUT_S
                    deadline = time.monotonic() + timeout
                    ready: list = []
                    while not ready and time.monotonic() < deadline:
                        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                    reply = proc.stdout.readline() if ready else ""
                except (BrokenPipeError, OSError):
                    reply = ""
                if reply:
                    self._answered = True
                    answer = json.loads(reply)
                    if answer.get("ok"):
                        return
                    raise ConfigError(answer.get("message") or "invalid job")
                self.close()  # dead (it idled out just now) or stuck: start a fresh one once
            raise NotReadyError("the job could not be checked (the checker process did not answer); retry shortly")

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


_shared: JobChecker | None = None


def shared_checker() -> JobChecker:
    """One checker per API process (several apps in one process, e.g. tests, share it)."""
    global _shared
    if _shared is None:
        _shared = JobChecker()
    return _shared


if __name__ == "__main__":
    sys.exit(main())
