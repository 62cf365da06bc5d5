"""Export benchmark: batch-1 CPU latency of PyTorch eager vs onnxruntime fp32 / int8, merged-LoRA vs base
export, ours vs ultralytics' own ONNX export of the same weights; file sizes; int8 mAP change.

    python benchmarks/export.py                                   # shipped base model (else fresh yolo11n) + generated data
    python benchmarks/export.py --source runs/kitchen --data data.yaml --imgsz 320 --threads 1

All variants run interleaved in one process (one call each per round), medians reported.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402


def ultralytics_export(model, imgsz: int, out_dir: Path) -> Path:
    """ultralytics' own ONNX exporter on the same weights; it may check but never install requirements."""
    import ultralytics.engine.exporter as exporter

    def check_only(requirements=(), *args, **kwargs):
        reqs = [requirements] if isinstance(requirements, str) else list(requirements)
        for req in reqs:
            name = str(req).split(">")[0].split("<")[0].split("=")[0].strip()
            importlib.metadata.version(name)  # raises if missing: nothing gets installed
        return True

    exporter.check_requirements = check_only
    clone = copy.deepcopy(model).eval()
    clone.pt_path, clone.task = str(out_dir / "ultralytics.pt"), "detect"
    args = dict(format="onnx", imgsz=imgsz, simplify=False, dynamic=False, batch=1, device="cpu", half=False)
    return Path(exporter.Exporter(overrides=args)(model=clone))


def lora_model(model, rank: int = 8):
    """The base with a LoRA adapter whose B is non-zero (as after training)."""
    from service.layers.peft import apply_lora

    tuned = copy.deepcopy(model)
    apply_lora(tuned, rank=rank, targets=["backbone", "neck"], max_share=None)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return tuned.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=None, help="model / run dir (default: the shipped base, else a fresh yolo11n)")
    parser.add_argument("--data", default=None, help="data.yaml for calibration (train) + mAP (val); default: a generated "
                        "source-domain set (seed 1, not the base model's training seed)")
    parser.add_argument("--imgsz", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--calib", type=int, default=64, help="calibration frames")
    parser.add_argument("--out", default=None, help="folder for the exported files (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from export import export_onnx, quantize_onnx
    from export.runtime import Detector
    from models import DetectionModel
    from models.registry import BASE_MODEL_DIR

    work = Path(args.out or tempfile.mkdtemp(prefix="export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.source:
        from export.onnx_export import load_source

        model, desc, _ = load_source(args.source)
    elif (BASE_MODEL_DIR / "model.safetensors").is_file():
        model, desc = DetectionModel.load(BASE_MODEL_DIR), str(BASE_MODEL_DIR)
    else:
        from training.data.synthetic import CLASS_NAMES

        model, desc = DetectionModel("yolo11n", names=CLASS_NAMES, imgsz=args.imgsz or 320), "fresh yolo11n (untrained)"
    model = model.eval()
    args.imgsz = args.imgsz or model.imgsz
    data = args.data
    if data is None:
        from training.data.synthetic import generate_dataset

        data = str(generate_dataset(work / "data", domain="source", n=250, imgsz=args.imgsz, seed=1))

    t = time.perf_counter()
    base = export_onnx(model, work / "fp32.onnx", imgsz=args.imgsz)
    t_ours = time.perf_counter() - t
    lora = export_onnx(lora_model(model), work / "lora.onnx", imgsz=args.imgsz)
    quant = quantize_onnx(base.path, work / "int8-headfloat.onnx", calibration=data, keep_head_float=True, dataset=data,
                          max_calibration=args.calib, threads=args.threads, measure=False)
    quant_conv = quantize_onnx(base.path, work / "int8-headconv.onnx", calibration=data, keep_head_float=False,
                               dataset=data, max_calibration=args.calib, threads=args.threads, measure=False)
    quant_full = quantize_onnx(base.path, work / "int8-all.onnx", calibration=data, keep_head_float=False,
                               keep_decode_float=False, dataset=data, max_calibration=args.calib,
                               threads=args.threads, measure=False)
    static = export_onnx(model, work / "fp32-static.onnx", imgsz=args.imgsz, dynamic_batch=False, verify=False)
    t = time.perf_counter()
    ul_path = ultralytics_export(model, args.imgsz, work)
    t_ul = time.perf_counter() - t

    fused = copy.deepcopy(model).fuse(verbose=False).eval()
    x = np.random.default_rng(0).random((1, 3, args.imgsz, args.imgsz), dtype=np.float32)
    xt = torch.from_numpy(x)
    dets = {name: Detector(p, threads=args.threads) for name, p in [
        ("onnxruntime fp32 (ours)", base.path), ("onnxruntime fp32 (ours, static batch)", static.path),
        ("onnxruntime int8 (head float)", quant.path), ("onnxruntime int8 (head convs int8, decode float)", quant_conv.path),
        ("onnxruntime int8 (all)", quant_full.path), ("onnxruntime merged-LoRA", lora.path),
        ("onnxruntime fp32 (ultralytics export)", ul_path)]}
    variants = {"pytorch eager": lambda: model(xt), "pytorch eager (fused)": lambda: fused(xt)}
    variants.update({name: (lambda d=d: d.raw(x)) for name, d in dets.items()})
    times = {k: [] for k in variants}
    with torch.no_grad():
        for fn in variants.values():
            for _ in range(3):
                fn()
        for _ in tqdm(range(args.rounds), desc="rounds", disable=args.quiet):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["onnxruntime fp32 (ours)"]

    sizes = {"fp32 (ours)": base.size_bytes, "int8, head float": quant.size_bytes, "int8, head convs int8": quant_conv.size_bytes, "int8, all": quant_full.size_bytes,
             "fp32 (ours, static batch)": static.size_bytes,
             "merged-LoRA": lora.size_bytes, "fp32 (ultralytics export)": ul_path.stat().st_size}
    lines = [
        f"command: python benchmarks/export.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, {platform.system()}; "
        f"torch {torch.__version__}, onnxruntime {importlib.metadata.version('onnxruntime')}",
        f"model: {desc}, input {args.imgsz}x{args.imgsz}, batch 1, threads {args.threads} (torch and onnxruntime), "
        f"{args.rounds} interleaved rounds",
        "",
        "| variant | median ms | vs onnxruntime fp32 (ours) |",
        "| --- | ---: | ---: |",
        *[f"| {k} | {v:.2f} | {v / ref:.2f}x |" for k, v in med.items()],
        "",
        f"- PyTorch eager / onnxruntime fp32: ORT is {ref / med['pytorch eager']:.2f}x the eager time (target <= 0.6x)",
        f"- int8 / fp32: head float {med['onnxruntime int8 (head float)'] / ref:.2f}x, head convs int8 "
        f"{med['onnxruntime int8 (head convs int8, decode float)'] / ref:.2f}x, all "
        f"{med['onnxruntime int8 (all)'] / ref:.2f}x (target <= 0.7x)",
        f"- merged-LoRA / base export: {med['onnxruntime merged-LoRA'] / ref:.2f}x; operators equal: "
        f"{lora.op_counts == base.op_counts} ({lora.num_nodes} vs {base.num_nodes} nodes)",
        f"- ultralytics export / ours: {med['onnxruntime fp32 (ultralytics export)'] / ref:.2f}x "
        f"(export time {t_ul:.1f} s vs ours {t_ours:.1f} s incl. verification)",
        f"- parity (ours vs PyTorch): {base.verification.summary()}",
        "",
        "| file | size MB |",
        "| --- | ---: |",
        *[f"| {k} | {v / 1e6:.2f} |" for k, v in sizes.items()],
        "",
        "| mAP on the val split | mAP50 | mAP50-95 | change (points) |",
        "| --- | ---: | ---: | ---: |",
        f"| fp32 | {quant.base_metrics['map50']:.4f} | {quant.base_metrics['map50_95']:.4f} | |",
        f"| int8, head float ({quant.calibration_images} calibration frames) | {quant.metrics['map50']:.4f} | "
        f"{quant.metrics['map50_95']:.4f} | {quant.map50_95_change:+.2f} |",
        f"| int8, head convs int8, decode float | {quant_conv.metrics['map50']:.4f} | "
        f"{quant_conv.metrics['map50_95']:.4f} | {quant_conv.map50_95_change:+.2f} (default) |",
        f"| int8, all | {quant_full.metrics['map50']:.4f} | {quant_full.metrics['map50_95']:.4f} | "
        f"{quant_full.map50_95_change:+.2f} |",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
