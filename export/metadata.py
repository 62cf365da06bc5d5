"""The metadata an exported ONNX file carries, so the runtime needs nothing else.

Stored as ONNX ``metadata_props`` (string key -> string value; structured values
are JSON). Standard library only: the torch-free runtime reads it too.
"""

from __future__ import annotations

import ast
import json
from typing import Any, Mapping

from models.errors import CheckpointError
from models.processing import LETTERBOX_COLOR

FORMAT = "glasses-vision/onnx-detector"
FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAME = "output0"

#: How a frame becomes the network input (models.processing.preprocess).
PREPROCESSING = {
    "resize": "letterbox",
    "interpolation": "bilinear",
    "letterbox_color": LETTERBOX_COLOR,
    "scale": "1/255",
    "channel_order": "RGB",
    "layout": "NCHW",
    "dtype": "float32",
}


def project_version() -> str:
    """The installed glasses-vision version (``0+unknown`` when running from a bare checkout)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("glasses-vision")
    except PackageNotFoundError:
        return "0+unknown"


def build_metadata(
    names: list[str],
    stride: list[int],
    imgsz: tuple[int, int],
    anchors: int,
    source: str,
    source_sha256: str,
    opset: int,
    precision: str = "fp32",
    dynamic_batch: bool = True,
    head_layer: int | None = None,
) -> dict[str, str]:
    """Everything the runtime and the registry read from an exported file, as ONNX string properties."""
    nc = len(names)
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "project_version": project_version(),
        "task": "detect",
        "names": json.dumps(list(names)),
        "nc": str(nc),
        "stride": json.dumps([int(s) for s in stride]),
        "imgsz": json.dumps([int(imgsz[0]), int(imgsz[1])]),
        "preprocessing": json.dumps(PREPROCESSING),
        "output_layout": json.dumps({
            "name": OUTPUT_NAME,
            "shape": ["batch" if dynamic_batch else 1, 4 + nc, anchors],
            "rows": "cx, cy, w, h in input pixels, then one sigmoid score per class",
            "nms": "not in the graph: run models.processing.postprocess",
        }),
        "input_name": INPUT_NAME,
        "dynamic_batch": json.dumps(bool(dynamic_batch)),
        "precision": precision,
        "opset": str(int(opset)),
        "head_layer": "" if head_layer is None else str(int(head_layer)),
        "source": source,
        "source_sha256": source_sha256,
    }


def parse_metadata(props: Mapping[str, str], where: str = "the ONNX file") -> dict[str, Any]:
    """Class names and input size (plus everything else) from an exported file's properties.

    Files from ultralytics' own exporter (``names`` as a Python dict literal,
    ``imgsz`` as ``[h, w]``) are read as well, since their output layout is ours.
    """
    props = dict(props)
    if "names" not in props or "imgsz" not in props:
        raise CheckpointError(
            f"{where} has no class names / input size in its metadata; export it with glasses-vision "
            "(export.export_onnx) so the runtime knows how to preprocess frames"
        )
    try:
        names = _literal(props["names"])
        imgsz = _literal(props["imgsz"])
    except (ValueError, SyntaxError) as exc:
        raise CheckpointError(f"{where} has unreadable names / imgsz metadata ({exc}); export it again") from None
    if isinstance(names, dict):
        names = [str(names[k]) for k in sorted(names, key=int)]
    imgsz = [int(imgsz), int(imgsz)] if isinstance(imgsz, (int, float)) else [int(v) for v in imgsz]
    out: dict[str, Any] = {k: v for k, v in props.items()}
    for key in ("stride", "preprocessing", "output_layout", "dynamic_batch"):
        if key in props:
            try:
                out[key] = _literal(props[key])
            except (ValueError, SyntaxError):
                pass
    out["names"] = [str(n) for n in names]
    out["nc"] = len(out["names"])
    out["imgsz"] = (imgsz[0], imgsz[1])
    return out


def _literal(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return ast.literal_eval(text)
