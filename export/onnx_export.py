"""Export a detector to ONNX: merge adapters, fuse Conv+BN, trace, clean the graph, embed metadata, verify.

    >>> from export import export_onnx
    >>> result = export_onnx("runs/kitchen", "kitchen.onnx")      # run dir -> its merged/ model
    >>> result.verification.passed, result.size_bytes
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from ultralytics.nn.modules.block import DFL

from models.errors import ConfigError, ExportError, GlassesVisionError
from models.io import atomic_write_bytes

from export.metadata import INPUT_NAME, OUTPUT_NAME, build_metadata
from export.source import load_source
from export.verify import verify_onnx
from service.layers.peft import has_peft_layers, merged_copy

#: Opset 17 runs on every onnxruntime since 1.11 and on the quantization / fp16 tooling.
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 13, 20


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how it checked out."""

    path: str
    size_bytes: int
    sha256: str
    source: str
    source_sha256: str
    imgsz: tuple[int, int]
    opset: int
    precision: str
    dynamic_batch: bool
    num_nodes: int
    op_counts: dict[str, int]
    merged_adapters: bool
    export_seconds: float
    metadata: dict[str, str] = field(default_factory=dict)
    verification: Any = None  # export.verify.VerifyReport

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["verification"] = self.verification.to_dict() if self.verification is not None else None
        return out


class BinsAxisDFL(nn.Module):
    """ultralytics' DFL decoder with its softmax taken before the transpose, over the bins' own axis.

    The same function as ``DFL.forward`` (``softmax(transpose(x))`` = ``transpose(softmax(x))`` over the
    matching axis), but onnxruntime runs ultralytics' order - a softmax over axis 1 of (B, 16, 4, A) - about
    6 % of a 128 px frame slower (docs/benchmarks/export.md); only the exported graph uses this.
    """

    def __init__(self, dfl: DFL):
        super().__init__()
        self.conv: nn.Conv2d = dfl.conv
        self.c1: int = dfl.c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).softmax(2).transpose(2, 1)).view(b, 4, a)


def _state_sha256(model: nn.Module) -> str:
    """sha256 of the model's weights serialised as DetectionModel.save would write them."""
    from safetensors.torch import save as st_save

    from models.detection import CONFIG_FORMAT

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return hashlib.sha256(st_save(tensors, metadata={"format": CONFIG_FORMAT})).hexdigest()


def _check_imgsz(imgsz: Any, stride: int) -> tuple[int, int]:
    if isinstance(imgsz, (int, float)) and not isinstance(imgsz, bool):
        size = (int(imgsz), int(imgsz))
    elif isinstance(imgsz, Sequence) and len(imgsz) == 2:
        size = (int(imgsz[0]), int(imgsz[1]))
    else:
        raise ConfigError(f"imgsz must be an int or (height, width), got {imgsz!r}")
    if min(size) <= 0 or size[0] % stride or size[1] % stride:
        raise ConfigError(
            f"imgsz={imgsz} is not a positive multiple of the model stride {stride}; "
            f"use e.g. {max(stride, round(size[0] / stride) * stride)}"
        )
    return size


def _trace_to_onnx(model: nn.Module, dummy: torch.Tensor, opset: int, dynamic_batch: bool) -> bytes:
    buf = io.BytesIO()
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # torch annotates ``f`` as a path; the TorchScript exporter (dynamo=False) writes to a file object too
        torch.onnx.export(
            model, (dummy,), buf,  # type: ignore[arg-type]
            dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
        )
    return buf.getvalue()


def _clean_graph(raw: bytes, out_shape: Sequence[Any]):
    """Constant folding and redundant-node removal with onnxruntime's *basic* (provider-independent) optimizer.

    It plays the part of onnxslim (not a dependency here): it removes the tracer's
    Identity / Constant chains. Only standard ONNX operators remain.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "raw.onnx", Path(tmp) / "clean.onnx"
        src.write_bytes(raw)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(dst)
        options.log_severity_level = 3
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
        proto = onnx.load(str(dst))
    used = {n.domain or "" for n in proto.graph.node}
    keep = [o for o in proto.opset_import if (o.domain or "") in used or (o.domain or "") == ""]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, out_shape):
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = int(value)
    proto.producer_name, proto.producer_version = "glasses-vision", ""
    return proto


def to_fp16(proto):
    """float16 weights and compute with float32 inputs / outputs (onnxruntime's converter)."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:  # pragma: no cover - ships with onnxruntime
        raise ExportError(f"fp16 conversion needs onnxruntime.transformers.float16 ({exc})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    return topological_sort(proto)  # the converter appends its input casts at the end of the node list


def topological_sort(proto):
    """Reorder the graph's nodes so every input is produced before it is used (the ONNX checker requires it)."""
    graph = proto.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            raise ExportError(f"the graph has a cycle or a dangling input near node {rest[0].name!r}")
        for n in done:
            ready.update(n.output)
        ordered += done
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return proto


def op_counts(proto) -> dict[str, int]:
    """Operator type -> number of nodes in the graph."""
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))


def export_onnx(
    source: Any,
    out: str | Path,
    imgsz: int | Sequence[int] | None = None,
    opset: int | None = None,
    dynamic_batch: bool = False,
    half: bool = False,
    nms: bool = False,
    verify: bool = True,
    best: bool = False,
    images: Sequence[Any] | None = None,
) -> ExportResult:
    """Export ``source`` to ``out`` (written atomically) and, by default, verify it against PyTorch.

    Args:
        source: a DetectionModel (adapters are merged on a copy), a model dir, a run dir (its ``merged/``,
            or ``best/`` with ``best=True``) or a registry name.
        imgsz: input size, an int or ``(h, w)`` multiple of the stride (default: the model's ``imgsz``).
        opset: ONNX opset (default 17).
        dynamic_batch: a symbolic batch dimension (for a server that batches frames); the default, a static
            batch of 1, is what the glasses run and the fastest file (docs/benchmarks/export.md).
        half: float16 weights and compute (inputs / outputs stay float32).
        nms: NMS inside the graph is not offered; boxes go through ``models.processing`` in the runtime.
        verify: run :func:`export.verify.verify_onnx` on the result and raise ``ExportError`` beyond tolerance.
        images: frames for the verification (default: the photos shipped with ultralytics + generated frames).
    """
    import onnx

    if nms:
        raise ConfigError(
            "nms=True is not supported: the exported graph ends at decoded boxes + class scores and "
            "export.runtime runs NMS with models.processing (the same code as evaluation); export with nms=False"
        )
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"opset {opset} is outside the supported range {MIN_OPSET}..{MAX_OPSET}; the default is {DEFAULT_OPSET}")
    out = Path(out)
    if out.suffix != ".onnx":
        raise ConfigError(f"the output file should end in .onnx, got {out}")
    start = time.perf_counter()
    model, description, source_sha = load_source(source, best=best)
    merged = has_peft_layers(model)
    plain = merged_copy(model).float().cpu().eval()
    if not source_sha:
        source_sha = _state_sha256(plain)
    size = _check_imgsz(imgsz if imgsz is not None else getattr(plain, "imgsz", 640), int(plain.stride.max()))
    for p in plain.parameters():
        p.requires_grad_(False)
    plain.fuse(verbose=False)
    head = plain.model[-1]
    head.export, head.format, head.dynamic = True, "onnx", False
    if isinstance(head.dfl, DFL):
        head.dfl = BinsAxisDFL(head.dfl)
    dummy = torch.zeros(1, 3, *size)
    try:
        with torch.no_grad():
            ref = plain(dummy)  # caches anchors for this size, so they trace as constants
        raw = _trace_to_onnx(plain, dummy, opset, dynamic_batch)
        anchors = int(ref.shape[-1])
        proto = _clean_graph(raw, ["batch" if dynamic_batch else 1, 4 + plain.nc, anchors])
    except GlassesVisionError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export of {description} failed: {type(exc).__name__}: {exc}") from exc
    precision = "fp16" if half else "fp32"
    if half:
        proto = to_fp16(proto)
    meta = build_metadata(
        names=[plain.names[i] for i in range(plain.nc)], stride=[int(s) for s in plain.stride.tolist()],
        imgsz=size, anchors=anchors, source=description, source_sha256=source_sha, opset=opset,
        precision=precision, dynamic_batch=dynamic_batch, head_layer=len(plain.model) - 1,
    )
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph does not pass the ONNX checker: {exc}") from exc
    data = proto.SerializeToString()
    # Written next to ``out`` and verified there: ``out`` only ever holds a complete, verified file.
    staging = out.with_name(f".{out.name}.{os.getpid()}.staging.onnx")
    atomic_write_bytes(staging, data)
    try:
        result = ExportResult(
            path=str(out), size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), source=description,
            source_sha256=source_sha, imgsz=size, opset=opset, precision=precision, dynamic_batch=dynamic_batch,
            num_nodes=len(proto.graph.node), op_counts=op_counts(proto), merged_adapters=merged,
            export_seconds=0.0, metadata=meta,
        )
        if verify:

            report = verify_onnx(staging, model, images=images)
            result.verification = report
            if not report.passed:
                raise ExportError(
                    f"the ONNX graph does not match the PyTorch model ({report.summary()}); {out} was not written. "
                    "Export with verify=False (--no-verify) to inspect it"
                )
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)
    result.export_seconds = time.perf_counter() - start
    return result
