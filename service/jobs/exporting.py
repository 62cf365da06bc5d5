"""Export a model directory (or a run) to a verified ONNX file, for the registry.

Used by the job runner after training, and as a child process by the API on
first start (``python -m service.jobs.exporting --source DIR --out FILE``) so
that the API process never has to import torch. Files exported for the service
have a dynamic batch axis, so that the server can run the frames of concurrent
requests as one batch (``service.core.inference.MicroBatcher``); the glasses'
own export stays static batch 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def export_for_registry(
    source: str | Path,
    out: str | Path,
    imgsz: int | None = None,
    opset: int | None = None,
    half: bool = False,
    verify: bool = True,
    int8_calibration: Any = None,
    dynamic_batch: bool = True,
) -> dict[str, Any]:
    """Export ``source`` to ``out`` (verified against PyTorch); returns what the registry records.

    With ``int8_calibration`` (a data.yaml, an image folder or a list of frames of the target
    domain) the file is then quantized to static int8 and its mAP change measured on that set.
    ``dynamic_batch`` (the default here) gives the file a symbolic batch axis for the server's micro-batching.
    """
    from export import export_onnx

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = export_onnx(source, out, imgsz=imgsz, opset=opset, half=half, verify=verify, dynamic_batch=dynamic_batch)
    info: dict[str, Any] = {"export": {"imgsz": imgsz, "opset": result.opset, "half": half, "verify": verify,
                                       "int8": False, "dynamic_batch": dynamic_batch}}
    info["verification"] = _plain(result.verification.to_dict()) if result.verification is not None else None
    if int8_calibration:
        from export import quantize_onnx

        q_out = out.with_name(out.stem + ".int8.onnx")
        dataset = int8_calibration if isinstance(int8_calibration, (str, Path)) else None
        report = quantize_onnx(out, q_out, int8_calibration, mode="int8-static", dataset=dataset, measure=False)
        q_out.replace(out)
        info["export"]["int8"] = True
        info["quantization"] = _plain(report.to_dict())
    # what the file itself says (its metadata is what the runtime and the registry read back)
    info["classes"] = json.loads(result.metadata["names"])
    info["imgsz"] = result.imgsz[0]  # jobs export square inputs (one imgsz)
    return info


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """A report's ``to_dict()`` as plain JSON (numpy scalars and paths become numbers and strings)."""
    return json.loads(json.dumps(data, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.jobs.exporting", description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="model dir or run dir")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--imgsz", type=int, default=None)
    parser.add_argument("--static-batch", action="store_true", help="a fixed batch of 1 (no server micro-batching)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from models.errors import GlassesVisionError

    try:
        info = export_for_registry(args.source, args.out, imgsz=args.imgsz, dynamic_batch=not args.static_batch)
    except GlassesVisionError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        return 2
    print(json.dumps(info, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
