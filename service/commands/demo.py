"""``glasses-vision demo``: the main job, end to end, with no arguments.

1. generate the egocentric target set of the adaptation benchmark (wide-angle
   distortion, motion blur, hands, low light, tilted horizon, close-range clutter);
2. measure the shipped base detector on it (zero-shot);
3. adapt the base with the benchmark's best memory-lean setup: full fine-tuning
   with the COAP optimizer and gradient checkpointing, which matched full
   fine-tuning with AdamW at about a third of its exact training bytes, where
   LoRA + COAP + checkpointing saved a little more memory but gave up accuracy
   (docs/benchmarks/adaptation.md, rows ``full-coap-ckpt`` and ``lora-coap-ckpt``);
4. measure again; print mAP50-95 before -> after, the gap closed towards the
   in-domain ceiling, the trainable share and the exact memory against full
   fine-tuning;
5. export the merged model to ONNX and verify it against PyTorch.

Everything is written under ``runs/demo/`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

#: The demo's data is the benchmark's target set (benchmarks/adaptation.py: egocentric, seed 21,
#: 400 train + 200 val frames at the base's size), so the ceiling measured there applies to it.
FRAMES, VAL_FRAMES, DATA_SEED = 600, 200, 21
#: The adaptation: the benchmark row ``full-coap-ckpt`` (see docs/benchmarks/adaptation.md).
SETUP: dict[str, Any] = dict(peft="none", optimizer="coap", grad_checkpoint=["backbone", "neck", "head"], lr=1e-3, batch=16)
STEPS = 250


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--frames", type=int, default=FRAMES,
                        help=f"generated egocentric frames, {VAL_FRAMES} of them for val (default {FRAMES})")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps of batch 16 (default {STEPS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fine-tuning run (default 0)")
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def run_demo(out: str | Path = "runs/demo", frames: int = FRAMES, steps: int = STEPS, seed: int = 0, export: bool = True,
             quiet: bool = False, val_frames: int = VAL_FRAMES, batch: int = SETUP["batch"]) -> dict[str, Any]:
    """Run the demo; returns the numbers it prints (also written to ``<out>/demo.json``)."""
    import torch

    from models.io import atomic_write_json
    from models.registry import BASE_MODEL_NAME, load_base_model
    from training.config import TrainConfig
    from training.data.synthetic import generate_dataset
    from training.evaluate import evaluate
    from training.recipe import train

    started = time.perf_counter()
    out = Path(out)
    base = load_base_model()
    imgsz = base.imgsz
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    say(f"[1/5] generating {frames} egocentric frames at {imgsz} px (the adaptation benchmark's target set) ...")
    data = generate_dataset(out / "data", "egocentric", n=frames, imgsz=imgsz, seed=DATA_SEED,
                            val_fraction=val_frames / frames, overwrite=True, progress=not quiet)
    say("[2/5] evaluating the shipped base model (zero-shot) ...")
    before = evaluate(base, data, split="val", imgsz=imgsz, batch=32, quiet=quiet)
    say(f"[3/5] adapting: full fine-tuning with COAP and gradient checkpointing, {steps} steps of batch {batch} ...")
    config = TrainConfig(data=str(data), base=BASE_MODEL_NAME, imgsz=imgsz, max_steps=steps, epochs=10_000,
                         eval_every=0, save_every=0, seed=seed, out=str(out / "run"), quiet=quiet, eval_batch=32,
                         **{**SETUP, "batch": batch})
    result = train(config)
    after = result.metrics
    full_ft = full_fine_tuning_bytes(config)
    ceiling = ceiling_for(frames, val_frames, imgsz)
    gap = None
    if ceiling is not None and ceiling > before["map50_95"]:
        gap = (after["map50_95"] - before["map50_95"]) / (ceiling - before["map50_95"])
    summary: dict[str, Any] = {
        "command": "glasses-vision demo",
        "frames": {"train": frames - before["images"], "val": before["images"], "imgsz": imgsz},
        "map50_95_before": round(before["map50_95"], 4),
        "map50_95_after": round(after["map50_95"], 4),
        "map50_before": round(before["map50"], 4),
        "map50_after": round(after["map50"], 4),
        "ceiling_map50_95": ceiling,
        "gap_closed": None if gap is None else round(gap, 3),
        "training_bytes": result.memory["total"],
        "full_fine_tuning_bytes": full_ft,
        "memory_ratio_to_full_ft": round(result.memory["total"] / full_ft, 3),
        "trainable_parameters": result.trainable["trainable"],
        "total_parameters": result.trainable["total"],
        "trainable_percent": round(result.trainable["percent"], 3),
        "steps": result.steps,
        "train_seconds": round(result.wall_time_s, 1),
        "torch_threads": torch.get_num_threads(),
        "run_dir": str(result.run_dir),
    }
    if export:
        say("[4/5] exporting the merged model to ONNX and verifying it ...")
        summary["export"] = _export(result.run_dir)
        summary["before_after"] = str(draw_before_after(base, Path(summary["export"]["path"]), data, out))
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out / "demo.json", summary)
    return summary


def full_fine_tuning_bytes(config) -> int:
    """Exact bytes of one full fine-tuning step (AdamW) with ``config``'s data, batch and size."""
    import dataclasses

    import torch

    from training.memory import measure_memory
    from training.recipe import build_criterion, build_datasets, build_model, micro_batch_loss

    full = dataclasses.replace(config, peft="none", optimizer="adamw", grad_checkpoint=[], peft_settings={})
    train_ds, _ = build_datasets(full)
    model = build_model(full, list(train_ds.names)).train()
    criterion = build_criterion(model)
    from training.data import collate

    batch = collate([train_ds[i] for i in range(min(full.batch, len(train_ds)))])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=full.lr)
    device = torch.device("cpu")
    from contextlib import nullcontext

    report = measure_memory(model, optimizer,
                            lambda: micro_batch_loss(model, criterion, batch, device, nullcontext)[0].backward())
    return report.total


def ceiling_for(frames: int, val_frames: int, imgsz: int) -> float | None:
    """The in-domain ceiling measured by the adaptation benchmark on this very val set (from the base's card)."""
    import json

    from models.registry import BASE_MODEL_DIR

    card = json.loads((BASE_MODEL_DIR / "card.json").read_text())
    ceiling = card.get("egocentric_ceiling")
    if not ceiling:
        return None
    same = (ceiling["data_seed"], ceiling["frames"], ceiling["val_frames"], ceiling["imgsz"]) == (
        DATA_SEED, frames, val_frames, imgsz)
    return ceiling["map50_95"] if same else None


def draw_before_after(base, adapted_onnx: Path, data: Path, out: Path, frames: int = 4) -> Path:
    """A picture of what adaptation changed: val frames with the base's boxes (top) and the adapted model's (bottom).

    Both models run through the glasses runtime (ONNX) and are drawn by the one drawing function.
    """
    import io

    import numpy as np
    from PIL import Image

    from export import export_onnx
    from export.draw import draw_detections
    from export.runtime import Detector, load_image
    from models.io import atomic_write_bytes

    base_onnx = out / "base.onnx"
    export_onnx(base, base_onnx, verify=False)
    val = sorted((data.parent / "images" / "val").iterdir())[:frames]
    rows = []
    for path in (base_onnx, adapted_onnx):
        detector = Detector(path)
        rows.append([np.asarray(draw_detections(load_image(f), detector.detect(load_image(f), conf=0.25)))
                     for f in val])
    h, w = rows[0][0].shape[:2]
    grid = np.full((2 * h + 6, len(val) * (w + 6) - 6, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid[r * (h + 6): r * (h + 6) + h, c * (w + 6): c * (w + 6) + w] = image
    path = out / "before_after.png"
    buffer = io.BytesIO()
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _export(run_dir: Path) -> dict[str, Any]:
    from export import export_onnx

    report = export_onnx(run_dir / "merged", run_dir / "model.onnx")
    verification = report.verification
    return {"path": report.path, "size_bytes": report.size_bytes, "verified": verification.passed,
            "max_abs_diff": verification.max_abs_diff}


def run(args: argparse.Namespace) -> int:
    s = run_demo(args.out, frames=args.frames, steps=args.steps, seed=args.seed, export=not args.no_export,
                 quiet=args.quiet)
    memory = Path(s["run_dir"]) / "memory.txt"
    print("[5/5] summary")
    print(f"  egocentric val mAP50-95: {s['map50_95_before']:.4f} -> {s['map50_95_after']:.4f}   "
          f"(mAP50 {s['map50_before']:.4f} -> {s['map50_after']:.4f}, {s['frames']['val']} frames)")
    gap = "n/a (no ceiling measured on this val set)" if s["gap_closed"] is None else \
        f"{100 * s['gap_closed']:.0f}% (ceiling {s['ceiling_map50_95']:.3f}, docs/benchmarks/adaptation.md)"
    print(f"  gap closed towards the in-domain ceiling: {gap}")
    print(f"  training memory: {s['training_bytes'] / 2**20:.1f} MiB = {s['memory_ratio_to_full_ft']:.2f}x full "
          f"fine-tuning with AdamW ({s['full_fine_tuning_bytes'] / 2**20:.1f} MiB), exact bytes of one step")
    print(f"  trainable: {s['trainable_parameters']:,} of {s['total_parameters']:,} parameters "
          f"({s['trainable_percent']:.2f}%), {s['steps']} steps")
    if memory.is_file():
        print("  " + memory.read_text().rstrip().replace("\n", "\n  "))
    if "export" in s:
        e = s["export"]
        print(f"  ONNX: {e['path']} (verified against PyTorch: {e['verified']})")
        print(f"  before / after on 4 val frames (top: shipped base, bottom: adapted): {s['before_after']}")
    print(f"  wall time: {s['wall_seconds']:.0f} s; everything is under {Path(s['run_dir']).parent}/")
    return 0
