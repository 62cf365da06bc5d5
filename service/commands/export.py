"""``glasses-vision export``: a run or model to a verified ONNX file for the glasses runtime, or back to ultralytics.

    glasses-vision export --from runs/kitchen --out kitchen.onnx                       # fp32, batch 1, verified
    glasses-vision export --from runs/kitchen --out kitchen.onnx --int8 --calib data.yaml
    glasses-vision export --from runs/kitchen --out server.onnx --dynamic-batch        # for the server's micro-batching
    glasses-vision export --from runs/kitchen --out tuned.pt --format ultralytics      # ultralytics.YOLO("tuned.pt")

The ONNX file has a static batch of 1 (the glasses run one frame at a time; it is the fastest file);
--dynamic-batch gives it a symbolic batch axis. With --int8 the verified fp32 file is kept next to the
output as <name>.fp32.onnx. Prints the file size, the parity with PyTorch and the batch-1 latency.

--format ultralytics writes a checkpoint ultralytics' YOLO() loads (predict, val, track): a pickle, as
every ultralytics .pt is; the project's own formats stay safetensors / ONNX. Adapters are merged.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="run dir (its merged/), model dir or model name")
    parser.add_argument("--out", required=True, help="the file to write (.onnx, or .pt with --format ultralytics)")
    parser.add_argument("--format", choices=("onnx", "ultralytics"), default="onnx",
                        help="onnx (default): the glasses runtime's file; ultralytics: a .pt checkpoint for "
                        "ultralytics.YOLO (a pickle)")
    parser.add_argument("--best", action="store_true", help="export a run's best/ instead of merged/")
    parser.add_argument("--imgsz", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="a symbolic batch axis (for the server's micro-batching); default: a static batch of 1")
    parser.add_argument("--static-batch", action="store_true", help=argparse.SUPPRESS)  # the default since issue 14
    parser.add_argument("--half", action="store_true",
                        help="float16 weights and compute (with --format ultralytics: float16 weights, as its trainer saves)")
    parser.add_argument("--int8", action="store_true", help="static int8 quantization (QDQ), needs --calib")
    parser.add_argument("--calib", default=None, help="calibration frames: data.yaml, COCO json or image folder")
    parser.add_argument("--calib-frames", type=int, default=64, help="with --int8: calibration frames to use (default 64)")
    parser.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                        help="with --int8: how activation ranges are calibrated (default minmax)")
    parser.add_argument("--per-tensor", action="store_true",
                        help="with --int8: one scale per weight tensor instead of per output channel")
    parser.add_argument("--float-head", action="store_true",
                        help="with --int8: keep the whole Detect head in float (its decode tail always stays float)")
    parser.add_argument("--data", default=None, help="with --int8 / --half: measure the mAP change on this dataset's val split")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip the check against PyTorch")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the latency figure (default 1)")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the report as JSON here")
    parser.set_defaults(func=run)
    return parser


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.errors import ConfigError
    from models.io import atomic_write_json

    from export import export_onnx, quantize_onnx
    from export.evaluate import measure_latency

    if args.dynamic_batch and args.static_batch:
        raise ConfigError("choose one of --dynamic-batch and --static-batch (the default)")
    if args.format == "ultralytics":
        return _run_ultralytics(args)
    if args.int8 and args.half:
        raise ConfigError("choose one of --int8 and --half")
    if args.int8 and not args.calib:
        raise ConfigError("--int8 needs calibration frames of the target domain: add --calib data.yaml")
    out = Path(args.out)
    float_out = out.with_name(out.stem + ".fp32.onnx") if args.int8 else out
    result = export_onnx(args.source, float_out, imgsz=args.imgsz, opset=args.opset, dynamic_batch=args.dynamic_batch,
                         half=args.half, verify=args.verify, best=args.best)
    report = {"export": result.to_dict()}
    print(f"exported {result.source} -> {float_out} ({_mb(result.size_bytes)}, {result.precision}, "
          f"opset {result.opset}, input {result.imgsz[0]}x{result.imgsz[1]}, "
          f"batch {'dynamic' if result.dynamic_batch else 1}, {result.num_nodes} nodes"
          f"{', adapters merged' if result.merged_adapters else ''})")
    if result.verification is not None:
        print(f"parity with PyTorch: {'ok' if result.verification.passed else 'FAILED'} - {result.verification.summary()}")
    if args.int8:
        q = quantize_onnx(float_out, out, calibration=args.calib, keep_head_float=args.float_head,
                          max_calibration=args.calib_frames, dataset=args.data, threads=args.threads,
                          calibration_method=args.calib_method, per_channel=not args.per_tensor)
        report["quantize"] = q.to_dict()
        print(f"int8 -> {out} ({_mb(q.size_bytes)}, {q.size_ratio:.2f}x the fp32 size, "
              f"{q.calibration_images} calibration frames, head {'float' if args.float_head else 'int8, decode float'})")
        print(f"latency (batch 1, {q.threads} thread): fp32 {q.base_latency_ms:.1f} ms, int8 {q.latency_ms:.1f} ms "
              f"({q.latency_ratio:.2f}x)")
        if q.map50_95_change is not None:
            print(f"mAP50-95: fp32 {q.base_metrics['map50_95']:.4f}, int8 {q.metrics['map50_95']:.4f} "
                  f"({q.map50_95_change:+.2f} points)")
    else:
        lat = measure_latency(out, threads=args.threads)
        report["latency"] = lat
        print(f"latency (batch 1, {args.threads} thread): {lat['median_ms']:.1f} ms median of {lat['runs']} runs")
        if args.data:
            from export.evaluate import evaluate_onnx

            report["metrics"] = {k: v for k, v in evaluate_onnx(out, args.data).items() if k != "per_class"}
            print(f"mAP50 {report['metrics']['map50']:.4f}, mAP50-95 {report['metrics']['map50_95']:.4f}")
    if args.json_out:
        atomic_write_json(args.json_out, report)
    return 0


def _run_ultralytics(args: argparse.Namespace) -> int:
    from models.errors import ConfigError
    from models.io import atomic_write_json

    from export.ultralytics_export import export_ultralytics

    onnx_only = [flag for flag, used in (("--int8", args.int8), ("--calib", args.calib), ("--opset", args.opset),
                                         ("--dynamic-batch", args.dynamic_batch), ("--float-head", args.float_head),
                                         ("--data", args.data)) if used]
    if onnx_only:
        raise ConfigError(f"{', '.join(onnx_only)} only apply to --format onnx")
    result = export_ultralytics(args.source, args.out, imgsz=args.imgsz, half=args.half, best=args.best,
                                verify=args.verify)
    print(f"exported {result.source} -> {result.path} ({_mb(result.size_bytes)}, ultralytics {result.ultralytics_version} "
          f"checkpoint, {result.precision} weights, imgsz {result.imgsz}{', adapters merged' if result.merged_adapters else ''})")
    if result.max_abs_diff is not None:
        print(f"reloaded with ultralytics: max |diff| {result.max_abs_diff:.2e} vs PyTorch over {result.frames_checked} frames")
    print(f"this file is a pickle (as every ultralytics checkpoint): load it only if you trust it - "
          f"from ultralytics import YOLO; YOLO({str(result.path)!r}).predict(..., iou=0.45, rect=False)")
    if args.json_out:
        atomic_write_json(args.json_out, {"ultralytics": result.to_dict()})
    return 0
