"""Export benchmark: batch-1 CPU latency of PyTorch eager vs onnxruntime fp32 / int8, our default (static
batch 1) file vs our dynamic-batch file vs ultralytics' own ONNX export of the same weights, merged-LoRA vs
base; file sizes; int8 mAP change; with --knobs, the int8 settings (weights per channel or per tensor,
activation and weight types, QDQ or QOperator, which nodes stay float, calibration method and frame count,
onnxruntime session options).

    python benchmarks/export.py                                   # shipped base model (else fresh yolo11n) + generated data
    python benchmarks/export.py --source runs/kitchen --data data.yaml --imgsz 320 --threads 1 --knobs

All variants run interleaved in one process (one call each per round, in a new random order each
round), medians of wall time and of the calling thread's CPU time reported; the load average is
printed before and after (the ratios are what to compare on a shared machine).
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


def without_silu(src: Path, dst: Path) -> Path:
    """A copy of an exported file with every SiLU (``x * sigmoid(x)``) replaced by its input: not the model, only
    for attributing time (what SiLU costs in the fp32 file and in its int8 file)."""
    import onnx

    proto = onnx.load(str(src))
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dropped, renamed = set(), {}
    for sigmoid in (n for n in proto.graph.node if n.op_type == "Sigmoid"):
        x = sigmoid.input[0]
        muls = [m for m in consumers.get(sigmoid.output[0], []) if m.op_type == "Mul" and x in m.input]
        if len(muls) == 1:
            dropped |= {sigmoid.name, muls[0].name}
            renamed[muls[0].output[0]] = x
    kept = [n for n in proto.graph.node if n.name not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    onnx.save(proto, str(dst))
    return dst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=None, help="model / run dir (default: the shipped base, else a fresh yolo11n)")
    parser.add_argument("--data", default=None, help="data.yaml for calibration (train) + mAP (val); default: a generated "
                        "source-domain set (seed 1, not the base model's training seed)")
    parser.add_argument("--imgsz", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--calib", type=int, default=64, help="calibration frames")
    parser.add_argument("--knobs", action="store_true", help="also measure the int8 knobs (slower: more files, more mAP runs)")
    parser.add_argument("--no-map", dest="map", action="store_false",
                        help="skip the mAP measurements (latency and sizes only)")
    parser.add_argument("--out", default=None, help="folder for the exported files (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    import onnxruntime as ort

    from export import export_onnx, quantize_onnx
    from export.runtime import Detector
    from models import DetectionModel
    from models.registry import BASE_MODEL_DIR

    work = Path(args.out or tempfile.mkdtemp(prefix="export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.source:
        from export.source import load_source

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
    base = export_onnx(model, work / "fp32.onnx", imgsz=args.imgsz)  # the default: static batch 1, verified
    t_ours = time.perf_counter() - t
    dynamic = export_onnx(model, work / "fp32-dynamic.onnx", imgsz=args.imgsz, dynamic_batch=True, verify=False)
    lora = export_onnx(lora_model(model), work / "lora.onnx", imgsz=args.imgsz)
    t = time.perf_counter()
    ul_path = ultralytics_export(model, args.imgsz, work)
    t_ul = time.perf_counter() - t

    common = dict(calibration=data, max_calibration=args.calib, threads=args.threads, measure=False)
    #: label -> (quantize_onnx settings, shown in the tables)
    int8 = {"int8 (default: per-channel, stem conv float, head convs int8, decode float, minmax)": dict()}
    int8["int8 (front float: float_until='auto', up to layer 2's last conv)"] = dict(float_until="auto")
    int8["int8 (stem conv int8 too)"] = dict(keep_stem_float=False)
    int8["int8 (head float)"] = dict(keep_head_float=True)
    if args.knobs:
        from onnxruntime.quantization import QuantFormat, QuantType

        int8.update({
            "int8 (QOperator format: QLinearConv in the file)": dict(ort_options={"quant_format": QuantFormat.QOperator}),
            "int8 (uint8 weights, U8U8)": dict(ort_options={"weight_type": QuantType.QUInt8}),
            "int8 (reduce_range: 7-bit weights)": dict(ort_options={"reduce_range": True}),
            "int8 (symmetric uint8 activations)": dict(ort_options={"extra_options": {"ActivationSymmetric": True}}),
            "int8 (per-tensor weights)": dict(per_channel=False),
            "int8 (int8 activations, S8S8)": dict(activation_type="int8"),
            "int8 (convs only: SiLU/Concat/Add float)": dict(op_types=["Conv"]),
            "int8 (decode tail int8 too)": dict(keep_decode_float=False),
            "int8 (entropy calibration)": dict(calibration_method="entropy"),
            "int8 (percentile calibration)": dict(calibration_method="percentile"),
            f"int8 ({max(1, args.calib // 4)} calibration frames)": dict(max_calibration=max(1, args.calib // 4)),
            f"int8 ({args.calib * 4} calibration frames)": dict(max_calibration=args.calib * 4),
            "int8 (float until layer 2: stem and layer 1 float)": dict(float_until="/model.2/cv1/conv/Conv"),
            "int8 (float until layer 3: layers 0-2 float)": dict(float_until="/model.3/conv/Conv"),
        })
    reports = {}
    for i, (label, settings) in enumerate(tqdm(int8.items(), desc="int8 files", disable=args.quiet)):
        try:
            reports[label] = quantize_onnx(base.path, work / f"int8-{i}.onnx", **{**common, **settings})
        except Exception as exc:  # a knob onnxruntime cannot apply to this model is reported, not fatal
            print(f"{label}: failed ({type(exc).__name__}: {str(exc)[:160]})", file=sys.stderr)
    default_int8 = next(iter(int8))
    if args.map:  # the float file once, then each int8 file, by training.evaluate on the val split
        from export.evaluate import evaluate_onnx

        base_metrics = evaluate_onnx(base.path, data, threads=args.threads)
        for r in tqdm(reports.values(), desc="mAP", disable=args.quiet):
            r.base_metrics, r.metrics = base_metrics, evaluate_onnx(r.path, data, threads=args.threads)

    no_silu = {}
    if args.knobs:  # timing attribution: the same files with every SiLU removed (not the model; no mAP)
        no_silu["onnxruntime fp32 (ours), every SiLU removed"] = without_silu(base.path, work / "fp32-nosilu.onnx")
        no_silu["onnxruntime int8 (default), every SiLU removed"] = quantize_onnx(
            no_silu["onnxruntime fp32 (ours), every SiLU removed"], work / "int8-nosilu.onnx", **common).path

    fused = copy.deepcopy(model).fuse(verbose=False).eval()
    x = np.random.default_rng(0).random((1, 3, args.imgsz, args.imgsz), dtype=np.float32)
    xt = torch.from_numpy(x)
    files = {"onnxruntime fp32 (ours, default: static batch 1)": base.path,
             "onnxruntime fp32 (ours, dynamic batch)": dynamic.path,
             "onnxruntime fp32 (ultralytics export)": ul_path,
             "onnxruntime merged-LoRA (static batch 1)": lora.path}
    files.update({f"onnxruntime {label}": r.path for label, r in reports.items()})
    files.update(no_silu)
    dets = {name: Detector(p, threads=args.threads) for name, p in files.items()}

    def session(path, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, config=None, disabled_optimizers=None):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        options.graph_optimization_level = level
        options.log_severity_level = 3
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=disabled_optimizers)
        return lambda: sess.run(None, {"images": x})

    variants = {"pytorch eager": lambda: model(xt), "pytorch eager (fused)": lambda: fused(xt)}
    variants.update({name: (lambda d=d: d.raw(x)) for name, d in dets.items()})
    if args.knobs:
        extended = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        variants["onnxruntime fp32 (ours), ORT level EXTENDED"] = session(base.path, extended)
        if default_int8 in reports:
            q = reports[default_int8].path
            variants["onnxruntime int8 (default), ORT level EXTENDED"] = session(q, extended)
            variants["onnxruntime int8 (default), NhwcTransformer off"] = session(q, disabled_optimizers=["NhwcTransformer"])
            variants["onnxruntime int8 (default), session.qdqisint8allowed=1"] = session(
                q, config={"session.qdqisint8allowed": "1"})
    times = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    with torch.no_grad():
        for fn in variants.values():
            for _ in range(3):
                fn()
        order = list(variants.items())
        shuffle = np.random.default_rng(0)
        for _ in tqdm(range(args.rounds), desc="rounds", disable=args.quiet):
            # a new order every round: no variant always runs right after the same neighbour (cache effects)
            for i in shuffle.permutation(len(order)):
                name, fn = order[i]
                c, t = time.thread_time(), time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1000)
                cpu[name].append((time.thread_time() - c) * 1000)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    # CPU time of the calling thread: with one intra-op thread torch and onnxruntime compute on it, so this
    # leaves out the time the scheduler gave other jobs - the better figure on a loaded machine
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ref_name = "onnxruntime fp32 (ours, default: static batch 1)"
    ref = med[ref_name]
    ul = med["onnxruntime fp32 (ultralytics export)"]
    q_default = med.get(f"onnxruntime {default_int8}")
    before = "int8 (front float: float_until='auto', up to layer 2's last conv)"
    fp32_no_silu = med.get("onnxruntime fp32 (ours), every SiLU removed", 0.0)
    int8_no_silu = med.get("onnxruntime int8 (default), every SiLU removed", 0.0)

    sizes = {"fp32 (ours, static batch 1)": base.size_bytes, "fp32 (ours, dynamic batch)": dynamic.size_bytes,
             "fp32 (ultralytics export)": ul_path.stat().st_size, "merged-LoRA": lora.size_bytes,
             **{label: r.size_bytes for label, r in reports.items()}}
    fmt_load = lambda la: ", ".join(f"{v:.2f}" for v in la)  # noqa: E731
    lines = [
        f"command: python benchmarks/export.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, {platform.system()}; "
        f"torch {torch.__version__}, onnxruntime {importlib.metadata.version('onnxruntime')}",
        f"load average (1, 5, 15 min): {fmt_load(load_before)} before, {fmt_load(load_after)} after "
        f"({'LOADED: other jobs shared the cores' if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1) else 'quiet'})",
        f"model: {desc}, input {args.imgsz}x{args.imgsz}, batch 1, threads {args.threads} (torch and onnxruntime), "
        f"{args.rounds} interleaved rounds",
        "",
        f"| variant | median wall ms | wall ratio | median thread-CPU ms | CPU ratio (vs {ref_name}) |",
        "| --- | ---: | ---: | ---: | ---: |",
        *[f"| {k} | {v:.2f} | {v / ref:.2f}x | {med_cpu[k]:.2f} | {med_cpu[k] / med_cpu[ref_name]:.2f}x |"
          for k, v in med.items()],
        "",
        "ratios as wall / thread-CPU medians:",
        f"- onnxruntime fp32 / PyTorch eager: {ref / med['pytorch eager']:.2f}x / "
        f"{med_cpu[ref_name] / med_cpu['pytorch eager']:.2f}x (target <= 0.6x)",
        f"- ours (static batch 1) / ultralytics export: {ref / ul:.2f}x / "
        f"{med_cpu[ref_name] / med_cpu['onnxruntime fp32 (ultralytics export)']:.2f}x (target <= 1.0x); ours with a "
        f"dynamic batch: {med['onnxruntime fp32 (ours, dynamic batch)'] / ul:.2f}x / "
        f"{med_cpu['onnxruntime fp32 (ours, dynamic batch)'] / med_cpu['onnxruntime fp32 (ultralytics export)']:.2f}x; "
        f"export time {t_ours:.1f} s (incl. verification) vs ultralytics {t_ul:.1f} s",
        *([f"- int8 (default) / fp32: {q_default / ref:.2f}x / "
           f"{med_cpu[f'onnxruntime {default_int8}'] / med_cpu[ref_name]:.2f}x (target <= 0.7x)"] if q_default else []),
        *([f"- int8 (front float) / fp32: {med[f'onnxruntime {before}'] / ref:.2f}x / "
           f"{med_cpu[f'onnxruntime {before}'] / med_cpu[ref_name]:.2f}x"] if before in reports else []),
        *([f"- SiLU's cost (the same files with every SiLU removed, wall medians): fp32 {ref - fp32_no_silu:.2f} ms, "
           f"int8 (default) {q_default - int8_no_silu:.2f} ms; int8 / fp32 without SiLU: "
           f"{int8_no_silu / fp32_no_silu:.2f}x"] if no_silu and q_default else []),
        f"- merged-LoRA / base export: {med['onnxruntime merged-LoRA (static batch 1)'] / ref:.2f}x / "
        f"{med_cpu['onnxruntime merged-LoRA (static batch 1)'] / med_cpu[ref_name]:.2f}x; operators equal: "
        f"{lora.op_counts == base.op_counts} ({lora.num_nodes} vs {base.num_nodes} nodes)",
        f"- parity (ours vs PyTorch): {base.verification.summary()}",
        "",
        "| file | size MB |",
        "| --- | ---: |",
        *[f"| {k} | {v / 1e6:.2f} |" for k, v in sizes.items()],
    ]
    if reports and args.map:
        first = next(iter(reports.values()))
        lines += [
            "",
            "| mAP on the val split | mAP50 | mAP50-95 | change (points) | latency vs fp32 (wall / CPU) |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| fp32 | {first.base_metrics['map50']:.4f} | {first.base_metrics['map50_95']:.4f} | | 1.00x |",
            *[f"| {label} | {r.metrics['map50']:.4f} | {r.metrics['map50_95']:.4f} | {r.map50_95_change:+.2f} | "
              f"{med[f'onnxruntime {label}'] / ref:.2f}x / {med_cpu[f'onnxruntime {label}'] / med_cpu[ref_name]:.2f}x |"
              for label, r in reports.items()],
        ]
    if args.knobs:
        kernel_files = {"fp32 (ours)": base.path, "fp32 (ultralytics)": ul_path, "int8 (default)": reports[default_int8].path,
                        "int8 (front float)": reports[before].path}
        lines += ["", "onnxruntime's optimised graphs (ORT_ENABLE_ALL), kernels by type:", "```"]
        lines += [f"{name:20s} {kernel_counts(path, work)}" for name, path in kernel_files.items()] + ["```"]
    print("\n".join(lines))
    return 0


def kernel_counts(path, work: Path) -> str:
    """The op types of onnxruntime's optimised graph of ``path`` (what runs), most common first."""
    from collections import Counter

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(work / f"{Path(path).stem}.optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    counts = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return f"{sum(counts.values())} kernels: " + ", ".join(f"{k} {v}" for k, v in counts.most_common(9))


if __name__ == "__main__":
    sys.exit(main())
