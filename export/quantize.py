"""int8 (static, QDQ, calibrated on real frames) and fp16 versions of an exported detector.

    >>> from export import quantize_onnx
    >>> report = quantize_onnx("kitchen.onnx", "kitchen.int8.onnx", calibration="data.yaml", dataset="data.yaml")
    >>> report.size_bytes, report.latency_ms, report.map50_95_change
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from models.errors import ConfigError, DataError, ExportError
from models.io import atomic_write_bytes
from models.processing import preprocess

from export.runtime import Detector, load_image

MODES = ("int8-static", "fp16")
#: Calibration methods of onnxruntime's quantize_static (MinMax: the default; the others cost more and,
#: on the benchmark set, moved mAP50-95 by < 1 point and not the speed: docs/benchmarks/export.md).
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: Activation types: uint8 activations x int8 weights (U8S8) run on the fast x86 int8 kernels; int8
#: activations (S8S8, symmetric) measured 2-3x *slower* than fp32 on the benchmark machine.
ACTIVATION_TYPES = ("uint8", "int8")


@dataclass
class QuantizeReport:
    """Size, speed and accuracy of a quantized file next to the float one it came from."""

    mode: str
    path: str
    size_bytes: int
    base_size_bytes: int
    latency_ms: float | None = None
    base_latency_ms: float | None = None
    threads: int = 1
    calibration_images: int = 0
    excluded_nodes: int = 0
    metrics: dict[str, Any] | None = None
    base_metrics: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size_ratio(self) -> float:
        return self.size_bytes / self.base_size_bytes

    @property
    def latency_ratio(self) -> float | None:
        return self.latency_ms / self.base_latency_ms if self.latency_ms and self.base_latency_ms else None

    @property
    def map50_95_change(self) -> float | None:
        """mAP50-95 of the quantized file minus the float file's, in points (x100)."""
        if not self.metrics or not self.base_metrics:
            return None
        return 100.0 * (self.metrics["map50_95"] - self.base_metrics["map50_95"])

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("metrics", "base_metrics"):
            if out[key]:
                out[key] = {k: v for k, v in out[key].items() if k != "per_class"}
        return {**out, "size_ratio": self.size_ratio, "latency_ratio": self.latency_ratio,
                "map50_95_change": self.map50_95_change}


def calibration_frames(calibration: Any, limit: int) -> list[Any]:
    """Frames from a data.yaml / COCO json (its train split, else val) or a list of images / a folder of them."""
    if calibration is None or (isinstance(calibration, (list, tuple)) and not calibration):
        raise ConfigError("int8-static quantization needs calibration frames from the target domain: "
                          "pass a data.yaml (--calib data.yaml) or a list of images")
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        if not path.exists():
            raise ConfigError(f"calibration set {path} does not exist; pass a data.yaml, a COCO json or a folder of images")
        if path.is_dir() and not (path / "data.yaml").is_file():
            frames = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"))
        else:
            from training.data import build_dataset

            frames = []
            for split in ("train", "val"):
                try:
                    frames = [r.im_file for r in build_dataset(path, split=split, check_images=False).records]
                except DataError:
                    continue
                if frames:
                    break
        if not frames:
            raise ConfigError(f"no calibration images found in {path}")
        calibration = frames
    frames = list(calibration)
    step = max(1, len(frames) // limit)  # spread the calibration subset over the whole set
    return frames[::step][:limit]


class _FrameReader:
    """onnxruntime's CalibrationDataReader over preprocessed frames."""

    def __init__(self, frames: Sequence[Any], imgsz: tuple[int, int], input_name: str):
        self.frames, self.imgsz, self.input_name = frames, imgsz, input_name
        self._it: Iterator[Any] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = iter(self.frames)
        frame = next(self._it, None)
        if frame is None:
            return None
        return {self.input_name: preprocess(load_image(frame), self.imgsz)[0]}

    def rewind(self) -> None:
        self._it = None


def float_nodes(proto, head_layer: str, keep_head_float: bool, keep_decode_float: bool) -> list[str]:
    """Node names to leave in float: the whole Detect head, or only its decode tail.

    The decode tail (DFL softmax, box arithmetic, the final concat of pixel boxes with
    0..1 scores) shares one quantization scale across values of very different ranges;
    quantizing it wipes out the scores.
    """
    if not head_layer:
        return []
    prefix = f"/model.{head_layer}/"
    branches = (f"{prefix}cv2.", f"{prefix}cv3.")
    out = []
    for node in proto.graph.node:
        if not node.name.startswith(prefix):
            continue
        in_branch = node.name.startswith(branches)
        if keep_head_float or (keep_decode_float and not in_branch):
            out.append(node.name)
    return out


def stem_nodes(proto) -> list[str]:
    """Node names of the stem: each convolution that reads a graph input, with its SiLU (Sigmoid, Mul).

    Left in float, the stem runs as onnxruntime's float Conv with a fused SiLU, and the frame is
    quantized once, after it, instead of the raw input; a 3-channel int8 convolution is slow.
    """
    inputs = {i.name for i in proto.graph.input}
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = []
    for conv in proto.graph.node:
        if conv.op_type != "Conv" or conv.input[0] not in inputs:
            continue
        out.append(conv.name)
        y = conv.output[0]
        for sigmoid in (n for n in consumers.get(y, []) if n.op_type == "Sigmoid"):
            muls = [m.name for m in consumers.get(sigmoid.output[0], []) if m.op_type == "Mul" and y in m.input]
            if muls:  # x * sigmoid(x)
                out += [sigmoid.name, *muls]
    return out


def first_block_output(proto) -> str | None:
    """The output convolution of the network's first block (``/model.N/cv2/conv/Conv`` of the lowest N: YOLO11's
    first C3k2, YOLOv8's first C2f), or None if the graph has none.

    What comes before it (the stem, the first downsampling conv, the block's own cv1 and bottlenecks) has few
    channels at high resolution: little arithmetic per element for int8 convolutions to win back the int8 SiLU
    (two kernels where float has one fused); ``quantize_onnx(float_until="auto")`` leaves it float.
    """
    pattern = re.compile(r"^/model\.(\d+)/cv2/conv/Conv$")
    found = [(int(m.group(1)), node.name) for node in proto.graph.node if (m := pattern.match(node.name))]
    return min(found)[1] if found else None


def ancestor_nodes(proto, node_name: str) -> list[str]:
    """Names of every node that ``node_name`` depends on (the producers of its inputs, recursively), in graph order.

    Left in float with ``quantize_onnx(float_until=node_name)``: the front of the network up to that node runs as
    onnxruntime's float convolutions with fused SiLU, and the tensors entering the node are quantized once.
    """
    producer = {out: node for node in proto.graph.node for out in node.output}
    by_name = {node.name: node for node in proto.graph.node}
    if node_name not in by_name:
        raise ConfigError(f"float_until: no node named {node_name!r} in the graph; pass 'auto' (the first block's "
                          "output conv) or a name from [n.name for n in onnx.load(path).graph.node]")
    seen: set[str] = set()
    todo = [by_name[node_name]]
    while todo:
        for name in todo.pop().input:
            node = producer.get(name)
            if node is not None and node.name not in seen:
                seen.add(node.name)
                todo.append(node)
    return [node.name for node in proto.graph.node if node.name in seen]


def _int8_static(src: Path, dst: Path, frames: list[Any], det: Detector, keep_head_float: bool, per_channel: bool,
                 keep_decode_float: bool = True, calibration_method: str = "minmax", activation_type: str = "uint8",
                 op_types: Sequence[str] | None = None, keep_stem_float: bool = True,
                 ort_options: dict[str, Any] | None = None, float_until: str | None = None) -> tuple[int, str | None]:
    """Quantize ``src`` into ``dst``; returns the number of nodes left float and the node ``float_until`` named."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    proto = onnx.load(str(src))
    exclude = float_nodes(proto, det.metadata.get("head_layer", ""), keep_head_float, keep_decode_float)
    if keep_stem_float:
        exclude += stem_nodes(proto)
    if float_until == "auto":
        float_until = first_block_output(proto)
    if float_until:
        exclude += [name for name in ancestor_nodes(proto, float_until) if name not in exclude]
    overrides = dict(ort_options or {})
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        try:
            quant_pre_process(str(src), str(prepped), skip_symbolic_shape=True)
        except Exception:  # pre-processing is an optimisation; quantize the file as it is if it fails
            prepped = src
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[calibration_method]
        symmetric = activation_type == "int8"
        extra = {"CalibMovingAverage": False, "ActivationSymmetric": symmetric, **overrides.pop("extra_options", {})}
        settings = dict(
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8, per_channel=per_channel, calibrate_method=method, nodes_to_exclude=exclude,
            op_types_to_quantize=list(op_types) if op_types else None,
        )
        quantize_static(str(prepped), str(dst), _FrameReader(frames, det.imgsz, det.input_name),
                        **{**settings, **overrides}, extra_options=extra)
    return len(exclude), float_until


def quantize_onnx(
    onnx_path: str | Path,
    out: str | Path,
    calibration: Any = None,
    mode: str = "int8-static",
    keep_head_float: bool = False,
    keep_decode_float: bool = True,
    per_channel: bool = True,
    max_calibration: int = 64,
    dataset: Any = None,
    split: str = "val",
    threads: int = 1,
    measure: bool = True,
    calibration_method: str = "minmax",
    activation_type: str = "uint8",
    op_types: Sequence[str] | None = None,
    keep_stem_float: bool = True,
    ort_options: dict[str, Any] | None = None,
    float_until: str | None = None,
) -> QuantizeReport:
    """Write a quantized copy of ``onnx_path`` to ``out`` and report size, latency and (given ``dataset``) mAP change.

    Args:
        calibration: for ``int8-static``: a data.yaml / COCO json / image folder, or a list of frames of the
            target domain (up to ``max_calibration`` are used, spread over the set).
        mode: ``int8-static`` (QDQ, uint8 activations, int8 per-channel weights, MinMax calibration) or ``fp16``.
        keep_stem_float: leave the first convolution (the one reading the frame) and its SiLU in float; on by
            default: faster than its int8 form and no less accurate (docs/benchmarks/export.md). With
            ``float_until`` it is float anyway, being in the front.
        keep_head_float: leave the whole Detect head (box / class branches and box decoding) in float.
        keep_decode_float: leave the head's decode tail (DFL, box arithmetic, final concat) in float; on by
            default, since quantizing it erases the class scores (docs/benchmarks/export.md: mAP 0).
        dataset: a data.yaml / COCO json to measure mAP of both files on ``split``.
        calibration_method: ``minmax`` (default), ``entropy`` or ``percentile`` (onnxruntime's calibrators).
        activation_type: ``uint8`` (default; U8S8 kernels) or ``int8`` (symmetric; slower on x86).
        op_types: quantize only these operator types (default: every type onnxruntime can quantize;
            ``["Conv"]`` leaves SiLU / Concat / Add in float, which is slower: more Q/DQ transitions).
        float_until: a node name: every node it depends on (the front of the network) stays float, the rest is
            quantized; ``"auto"``: the output convolution of the first block (``first_block_output``:
            ``/model.2/cv2/conv/Conv`` in YOLO11 / YOLOv8). Measured: 2-4 % faster than the default at 320 px, level
            with it at 128 px (within +-2 %), the same mAP (docs/benchmarks/export.md); so not the default.
        ort_options: keyword arguments for onnxruntime's ``quantize_static`` that override ours (``quant_format``,
            ``weight_type``, ``reduce_range``, ...; ``extra_options`` entries are merged), for measuring knobs.
    """
    import onnx

    if mode not in MODES:
        raise ConfigError(f"unknown quantization mode {mode!r}; use one of {', '.join(MODES)}")
    if calibration_method not in CALIBRATION_METHODS:
        raise ConfigError(f"unknown calibration method {calibration_method!r}; use one of {', '.join(CALIBRATION_METHODS)}")
    if activation_type not in ACTIVATION_TYPES:
        raise ConfigError(f"unknown activation type {activation_type!r}; use one of {', '.join(ACTIVATION_TYPES)}")
    src, out = Path(onnx_path), Path(out)
    det = Detector(src)
    if det.metadata.get("precision", "fp32") != "fp32":
        raise ConfigError(f"{src} is already {det.metadata.get('precision')}; quantize the fp32 export")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_out = Path(tmp) / "quantized.onnx"
        excluded, n_frames, front = 0, 0, None
        if mode == "int8-static":
            frames = calibration_frames(calibration, max_calibration)
            n_frames = len(frames)
            try:
                excluded, front = _int8_static(
                    src, tmp_out, frames, det, keep_head_float, per_channel, keep_decode_float, calibration_method,
                    activation_type, op_types, keep_stem_float, ort_options, float_until)
            except (ConfigError, DataError):
                raise
            except Exception as exc:
                raise ExportError(f"int8 quantization of {src} failed: {type(exc).__name__}: {exc}") from exc
            proto = onnx.load(str(tmp_out))
        else:
            from export.onnx_export import to_fp16

            proto = to_fp16(onnx.load(str(src)))
        precision = "int8" if mode == "int8-static" else "fp16"
        props = dict(det.session.get_modelmeta().custom_metadata_map)  # the float file's metadata travels along
        head = "float" if keep_head_float else ("int8, decode float" if keep_decode_float else "int8")
        props.update({"precision": precision, "quantization": mode, "head": head,
                      "calibration_images": str(n_frames)})
        if mode == "int8-static":
            props.update({"calibration_method": calibration_method, "activation_type": activation_type,
                          "weights": "int8 per-channel" if per_channel else "int8 per-tensor",
                          "stem": "float" if keep_stem_float or front else "int8",
                          "float_until": front or "none"})
            if ort_options:
                props["quantize_static_overrides"] = repr(ort_options)
        del proto.metadata_props[:]
        for k, v in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        data = proto.SerializeToString()
    atomic_write_bytes(out, data)
    report = QuantizeReport(mode=mode, path=str(out), size_bytes=len(data), base_size_bytes=src.stat().st_size,
                            threads=threads, calibration_images=n_frames, excluded_nodes=excluded)
    if measure:
        from export.evaluate import measure_latency

        report.base_latency_ms = measure_latency(src, threads=threads)["median_ms"]
        report.latency_ms = measure_latency(out, threads=threads)["median_ms"]
    if dataset is not None:
        from export.evaluate import evaluate_onnx

        report.base_metrics = evaluate_onnx(src, dataset, split=split, threads=threads)
        report.metrics = evaluate_onnx(out, dataset, split=split, threads=threads)
    return report
