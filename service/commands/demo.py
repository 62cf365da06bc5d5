"""``glasses-vision demo``: the main job, end to end, with no arguments.

1. generate a small egocentric target set (wide-angle distortion, motion blur, hands,
   low light, tilted horizon, close-range clutter);
2. measure the shipped base detector on it (zero-shot);
3. fine-tune the base with LoRA + COAP + gradient checkpointing;
4. measure again, print mAP50-95 before -> after, the trainable share, the memory
   budget table and the wall time;
5. export the merged model to ONNX and verify it against PyTorch.

Everything is written under ``runs/demo/`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--frames", type=int, default=120, help="generated egocentric frames, a third for val (default 120)")
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs (default 6)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated set and the run (default 7)")
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def run_demo(out: str | Path = "runs/demo", frames: int = 120, epochs: int = 6, seed: int = 7, export: bool = True,
             quiet: bool = False) -> dict[str, Any]:
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

    say(f"[1/5] generating {frames} egocentric frames at {imgsz} px ...")
    data = generate_dataset(out / "data", "egocentric", n=frames, imgsz=imgsz, seed=seed, val_fraction=1 / 3,
                            overwrite=True)
    say("[2/5] evaluating the shipped base model (zero-shot) ...")
    before = evaluate(base, data, split="val", imgsz=imgsz, batch=16, quiet=quiet)
    say("[3/5] fine-tuning: LoRA rank 8 on every part, COAP, gradient checkpointing (backbone, neck) ...")
    config = TrainConfig(
        data=str(data), base=BASE_MODEL_NAME, imgsz=imgsz, peft="lora", rank=8, optimizer="coap",
        grad_checkpoint=["backbone", "neck"], batch=8, epochs=epochs, lr=5e-3, warmup_fraction=0.1, eval_every=0,
        save_every=0, seed=seed, out=str(out / "run"), quiet=quiet,
    )
    result = train(config)
    after = result.metrics
    summary: dict[str, Any] = {
        "command": "glasses-vision demo",
        "frames": {"train": frames - round(frames / 3), "val": before["images"], "imgsz": imgsz},
        "map50_95_before": round(before["map50_95"], 4),
        "map50_95_after": round(after["map50_95"], 4),
        "map50_before": round(before["map50"], 4),
        "map50_after": round(after["map50"], 4),
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
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out / "demo.json", summary)
    return summary


def _export(run_dir: Path) -> dict[str, Any]:
    try:
        from export import export_onnx
    except ImportError as exc:  # the export package is optional for the demo
        return {"skipped": f"export is not available: {exc}"}
    report = export_onnx(run_dir / "merged", run_dir / "model.onnx")
    verification = getattr(report, "verification", None)
    return {"path": str(run_dir / "model.onnx"), "size_bytes": report.size_bytes,
            "verified": bool(getattr(verification, "passed", False)),
            "max_abs_diff": getattr(verification, "max_abs_diff", None)}


def run(args: argparse.Namespace) -> int:
    s = run_demo(args.out, frames=args.frames, epochs=args.epochs, seed=args.seed, export=not args.no_export,
                 quiet=args.quiet)
    memory = Path(s["run_dir"]) / "memory.txt"
    print("[5/5] summary")
    print(f"  egocentric val mAP50-95: {s['map50_95_before']:.4f} -> {s['map50_95_after']:.4f}   "
          f"(mAP50 {s['map50_before']:.4f} -> {s['map50_after']:.4f}, {s['frames']['val']} frames)")
    print(f"  trainable: {s['trainable_parameters']:,} of {s['total_parameters']:,} parameters "
          f"({s['trainable_percent']:.2f}%), {s['steps']} steps")
    if memory.is_file():
        print("  " + memory.read_text().rstrip().replace("\n", "\n  "))
    if "export" in s:
        e = s["export"]
        print(f"  ONNX: {e.get('path', e.get('skipped'))}" + (f" (verified: {e['verified']})" if "verified" in e else ""))
    print(f"  wall time: {s['wall_seconds']:.0f} s; everything is under {Path(s['run_dir']).parent}/")
    return 0
