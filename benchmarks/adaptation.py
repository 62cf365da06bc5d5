"""The egocentric domain-shift benchmark: every adaptation setup on the same frames and the same steps.

    python benchmarks/adaptation.py --out runs/adaptation                      # the full run (docs/benchmarks/adaptation.md)
    python benchmarks/adaptation.py --out /tmp/adapt --quick                   # a smoke run (tests)
    python benchmarks/adaptation.py --out runs/adaptation --rows lora-all,full-adamw --seeds 1

It generates (from fixed seeds) an egocentric train/val set and a fresh source set
(train frames for replay, val frames to measure forgetting), then adapts the shipped
base with each setup below for the same optimizer steps, batch and frames, and
writes a Markdown table and a plot (target mAP50-95 against exact training bytes,
Pareto front drawn). Two reference rows are always there: our full fine-tuning and
ultralytics' own trainer from the same weights on the same frames; an in-domain
ceiling (full fine-tuning on many more egocentric frames) gives "gap closed" =
(adapted - zero-shot) / (ceiling - zero-shot).

Every finished run is cached in ``<out>/results.json``: a crashed or interrupted
benchmark continues where it stopped (``--force`` runs everything again).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Setup:
    """One row of the benchmark: a recipe configuration (``TrainConfig`` fields) or a reference."""

    name: str
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    kind: str = "recipe"  # recipe | zero-shot | ultralytics
    main: bool = False  # main rows run every seed
    mergeable: bool = True


LORA = {"peft": "lora", "rank": 8}
COAP = {"optimizer": "coap"}
CKPT = {"grad_checkpoint": ["backbone", "neck", "head"]}

#: learning rates per family; chosen on the benchmark's tuning rows (see docs/benchmarks/adaptation.md)
FULL_LR = 1e-3
PEFT_LR = 5e-3

SETUPS: tuple[Setup, ...] = (
    Setup("zero-shot", "zero-shot (shipped base)", kind="zero-shot"),
    Setup("head-only", "full FT of the head only, AdamW", {"peft": "full", "peft_settings": {"targets": ["head"]},
                                                            "lr": FULL_LR}),
    Setup("bitfit", "BitFit (biases + BN shifts), AdamW", {"peft": "bitfit", "lr": PEFT_LR}),
    Setup("lora-backbone", "LoRA r=8 on the backbone only, AdamW",
          {**LORA, "peft_settings": {"targets": ["backbone"]}, "lr": PEFT_LR}),
    Setup("lora-all", "LoRA r=8 on every part, AdamW", {**LORA, "lr": PEFT_LR}),
    Setup("lora-neck-head", "LoRA r=8 on neck + head, AdamW",
          {**LORA, "peft_settings": {"targets": ["neck", "head"]}, "lr": PEFT_LR}),
    Setup("dora", "DoRA r=8 on every part, AdamW", {"peft": "dora", "rank": 8, "lr": PEFT_LR}),
    Setup("qlora", "QLoRA r=8 (NF4 base), AdamW", {"peft": "qlora", "rank": 8, "lr": PEFT_LR}),
    Setup("adapters", "bottleneck adapters, AdamW", {"peft": "adapters", "lr": PEFT_LR},
          mergeable=False),
    Setup("full-adamw", "full FT, AdamW", {"lr": FULL_LR}, main=True),
    Setup("full-coap", "full FT, COAP", {**COAP, "lr": FULL_LR}),
    Setup("full-coap-ckpt", "full FT, COAP + checkpointing (the demo's)", {**COAP, **CKPT, "lr": FULL_LR}, main=True),
    Setup("full-coap8", "full FT, COAP-8bit", {"optimizer": "coap8bit", "lr": FULL_LR}),
    Setup("full-coap8-ckpt", "full FT, COAP-8bit + checkpointing", {"optimizer": "coap8bit", **CKPT, "lr": FULL_LR}),
    Setup("lora-coap-ckpt", "LoRA r=8 + COAP + checkpointing", {**LORA, **COAP, **CKPT, "lr": PEFT_LR},
          main=True),
    Setup("lora-r16-coap-ckpt", "LoRA r=16 + COAP + checkpointing", {**LORA, "rank": 16, **COAP, **CKPT, "lr": PEFT_LR},
          main=True),
    Setup("lora-neck-head-coap-ckpt", "LoRA r=8 on neck + head + COAP + checkpointing",
          {**LORA, **COAP, "grad_checkpoint": ["neck", "head"], "peft_settings": {"targets": ["neck", "head"]},
           "lr": PEFT_LR}),
    Setup("lora-coap-ckpt-replay", "LoRA + COAP + checkpointing, replay 25% source", {**LORA, **COAP, **CKPT,
          "lr": PEFT_LR, "replay_fraction": 0.25}),
    Setup("full-adamw-replay", "full FT, AdamW, replay 25% source", {"lr": FULL_LR, "replay_fraction": 0.25}),
    Setup("ultralytics", "ultralytics' own trainer, its defaults", kind="ultralytics", main=True),
    # tuning rows: the choices behind the defaults above
    Setup("lora-coap-ckpt-lr2e-3", "tuning: LoRA + COAP + ckpt at lr 2e-3", {**LORA, **COAP, **CKPT, "lr": 2e-3}),
    Setup("lora-coap-ckpt-lr1e-2", "tuning: LoRA + COAP + ckpt at lr 1e-2", {**LORA, **COAP, **CKPT, "lr": 1e-2}),
    Setup("lora-r32-coap-ckpt", "tuning: LoRA r=32 + COAP + ckpt", {**LORA, "rank": 32, **COAP, **CKPT, "lr": PEFT_LR}),
    Setup("dora-coap-ckpt", "tuning: DoRA r=8 + COAP + ckpt", {"peft": "dora", "rank": 8, **COAP, **CKPT, "lr": PEFT_LR}),
    Setup("lora-coap-ckpt-mosaic", "tuning: LoRA + COAP + ckpt, mosaic 0.5",
          {**LORA, **COAP, **CKPT, "lr": PEFT_LR, "augment_settings": {"mosaic": 0.5}}),
)

#: the order runs are made in: the reference rows first, so that a cut-short run still says the most
PRIORITY = ("zero-shot", "full-adamw", "lora-coap-ckpt", "ultralytics")


#: seeds of the generated sets: the egocentric target set (also the demo's), the source set, the large set
TARGET_SEED, SOURCE_SEED, CEILING_SEED = 21, 23, 22


@dataclass(frozen=True)
class Scale:
    """Sizes of one benchmark run (the full one, or ``--quick``)."""

    imgsz: int = 128
    batch: int = 16
    steps: int = 250
    target_train: int = 400
    target_val: int = 200
    source_train: int = 400
    source_val: int = 200
    ceiling_train: int = 3000
    ceiling_steps: int = 1200
    seeds: int = 3


QUICK = Scale(imgsz=64, batch=4, steps=2, target_train=8, target_val=4, source_train=8, source_val=4,
              ceiling_train=8, ceiling_steps=2, seeds=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/adaptation", help="work folder: data, runs, results.json")
    p.add_argument("--base", default="glasses-base-yolo11n", help="the base every setup starts from")
    p.add_argument("--rows", help="comma-separated setup names (default: all); known: "
                   + ", ".join(s.name for s in SETUPS))
    p.add_argument("--seeds", type=int, help="seeds for the main rows (others run seed 0); default 3")
    p.add_argument("--steps", type=int, help="optimizer steps per setup (default 250)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    p.add_argument("--no-ceiling", action="store_true", help="skip the in-domain ceiling run")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--force", action="store_true", help="ignore cached results")
    p.add_argument("--doc", help="write the Markdown report here (default <out>/adaptation.md)")
    p.add_argument("--plot", help="write the plot here (default next to the report)")
    p.add_argument("--record-ceiling", action="store_true",
                   help="write the measured ceiling into the shipped base's card.json (the demo reads it)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- data
def build_data(root: Path, scale: Scale, quiet: bool) -> dict[str, Path]:
    """The benchmark's fixed datasets (generated once, from fixed seeds)."""
    from training.data.synthetic import generate_dataset

    def make(name: str, domain: str, n_train: int, n_val: int, seed: int) -> Path:
        out = root / name
        if (out / "data.yaml").is_file():
            return out / "data.yaml"
        n = n_train + n_val
        return generate_dataset(out, domain, n=n, imgsz=scale.imgsz, seed=seed, val_fraction=n_val / n,
                                overwrite=True, progress=not quiet)

    return {
        "target": make("egocentric", "egocentric", scale.target_train, scale.target_val, TARGET_SEED),
        "source": make("source", "source", scale.source_train, scale.source_val, SOURCE_SEED),
        "ceiling": make("egocentric-large", "egocentric", scale.ceiling_train, scale.target_val, CEILING_SEED),
    }


# ---------------------------------------------------------------------------- one run
def run_recipe(setup: Setup, seed: int, data: dict[str, Path], scale: Scale, base: str, out: Path,
               quiet: bool) -> dict[str, Any]:
    """Adapt the base with one setup; measure target and source mAP, bytes, time per step."""
    from models.detection import DetectionModel
    from training.config import TrainConfig
    from training.evaluate import evaluate
    from training.recipe import train

    values = dict(data=str(data["target"]), base=base, imgsz=scale.imgsz, batch=scale.batch, max_steps=scale.steps,
                  epochs=10_000, eval_every=0, save_every=0, log_every=10 if scale.steps >= 20 else 1, seed=seed,
                  out=str(out), quiet=quiet, eval_batch=32)
    values.update(setup.config)
    if values.get("replay_fraction"):
        values["replay"] = str(data["source"])
    if not setup.mergeable:
        return run_unmergeable(setup, values, data, scale, out, quiet)
    result = train(TrainConfig(**values))
    merged = DetectionModel.load(result.merged_dir)
    source = evaluate(merged, data["source"], split="val", imgsz=scale.imgsz, batch=32)
    record = _record(result.metrics, source, result.memory, result.trainable, out)
    if result.adapter_dir is not None:
        record["adapter_bytes"] = sum(f.stat().st_size for f in result.adapter_dir.iterdir())
    return record


def run_unmergeable(setup: Setup, values: dict[str, Any], data: dict[str, Path], scale: Scale, out: Path,
                    quiet: bool) -> dict[str, Any]:
    """Bottleneck adapters cannot be folded into plain weights, so the recipe refuses them; train them here
    with the recipe's own components (same data order, loss, schedule, clipping) and score the live model."""
    import torch

    from training.config import TrainConfig
    from training.evaluate import evaluate
    from training import recipe

    from service.layers.peft import apply_peft

    cfg = TrainConfig(**{**values, "peft": "none"})
    recipe.seed_everything(cfg.seed)
    train_ds, val_ds = recipe.build_datasets(cfg)
    model = apply_peft(recipe.build_base_model(cfg, list(train_ds.names)), setup.config["peft"])
    trainable = recipe.trainable_summary(model)
    criterion = recipe.build_criterion(model)
    device = torch.device("cpu")
    memory = recipe.preflight_memory(model, criterion, train_ds, cfg, device, recipe.nullcontext)
    optimizer = recipe.build_optimizer_for(cfg, model)
    scheduler = recipe.build_scheduler_for(cfg, optimizer, cfg.max_steps)
    steps_per_epoch = len(train_ds) // cfg.batch
    out.mkdir(parents=True, exist_ok=True)
    log = recipe.MetricsLog(out / "metrics.jsonl")
    started, step, epoch = time.perf_counter(), 0, 0
    while step < cfg.max_steps:
        batches = iter(recipe.build_loader(train_ds, cfg, recipe.DistInfo(), epoch, 0, steps_per_epoch))
        for _ in range(steps_per_epoch):
            if step >= cfg.max_steps:
                break
            model.train()
            parts = recipe.train_step(model, criterion, batches, accumulate=1, device=device,
                                      autocast=recipe.nullcontext, dist_info=recipe.DistInfo())
            recipe.clip_gradients(model, cfg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if step % cfg.log_every == 0:
                log.write({"kind": "train", "step": step, "loss": parts["loss"],
                           "time_s": round(time.perf_counter() - started, 3)})
        epoch += 1
    memory = recipe.finish_memory_report(memory, optimizer, out, recipe.DistInfo())
    target = evaluate(model, val_ds, batch=32)
    source = evaluate(model, data["source"], split="val", imgsz=scale.imgsz, batch=32)
    return _record(target, source, memory, trainable, out)


def _record(target: dict, source: dict, memory: dict, trainable: dict, out: Path) -> dict[str, Any]:
    return {"target_map50_95": target["map50_95"], "target_map50": target["map50"],
            "source_map50_95": source["map50_95"], "trainable_percent": trainable["percent"],
            "bytes": memory["total"], "memory": memory, "seconds_per_step": seconds_per_step(out / "metrics.jsonl")}


def seconds_per_step(metrics_path: Path) -> float | None:
    """Median seconds per optimizer step between logged train records (preflight and final eval excluded)."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("kind") == "train" and "time_s" in r]
    rates = [(b["time_s"] - a["time_s"]) / (b["step"] - a["step"]) for a, b in zip(rows, rows[1:]) if b["step"] > a["step"]]
    return statistics.median(rates) if rates else None


def run_zero_shot(data: dict[str, Path], scale: Scale, base: str) -> dict[str, Any]:
    from models.registry import create_model
    from training.evaluate import evaluate

    model = create_model(base)
    target = evaluate(model, data["target"], split="val", imgsz=scale.imgsz, batch=32)
    source = evaluate(model, data["source"], split="val", imgsz=scale.imgsz, batch=32)
    return {"target_map50_95": target["map50_95"], "target_map50": target["map50"],
            "source_map50_95": source["map50_95"], "trainable_percent": 0.0, "bytes": None,
            "seconds_per_step": None}


def run_ultralytics(seed: int, data: dict[str, Path], scale: Scale, base: str, out: Path) -> dict[str, Any]:
    """ultralytics' own trainer from the same weights, same frames, same steps and batch, its defaults; its
    ``best.pt`` is scored by our evaluator (its own validator pads the frames differently)."""
    from models.detection import DetectionModel
    from models.registry import create_model
    from training.evaluate import evaluate
    from ultralytics import YOLO

    from export.ultralytics_export import export_ultralytics

    out = out.resolve()  # ultralytics puts a relative project under its own runs_dir setting
    start = out / "start.pt"
    out.mkdir(parents=True, exist_ok=True)
    export_ultralytics(create_model(base), start, imgsz=scale.imgsz)
    epochs = max(1, round(scale.steps / math.ceil(scale.target_train / scale.batch)))
    started = time.perf_counter()
    YOLO(str(start)).train(data=str(data["target"]), epochs=epochs, batch=scale.batch, imgsz=scale.imgsz, seed=seed,
                           device="cpu", workers=0, project=str(out), name="train", exist_ok=True, plots=False,
                           verbose=False)
    wall = time.perf_counter() - started
    weights = out / "train" / "weights"
    best = weights / "best.pt"
    tuned = DetectionModel.from_ultralytics(best, trusted=True)  # our own file, written just above
    tuned.imgsz = scale.imgsz
    target = evaluate(tuned, data["target"], split="val", imgsz=scale.imgsz, batch=32)
    source = evaluate(tuned, data["source"], split="val", imgsz=scale.imgsz, batch=32)
    steps = epochs * math.ceil(scale.target_train / scale.batch)
    return {"target_map50_95": target["map50_95"], "target_map50": target["map50"],
            "source_map50_95": source["map50_95"], "trainable_percent": 100.0, "bytes": None,
            "seconds_per_step": wall / steps, "note": f"{epochs} epochs = {steps} steps; time includes its per-epoch "
            "validation and plots off"}


def run_ceiling(data: dict[str, Path], scale: Scale, base: str, out: Path, quiet: bool) -> dict[str, Any]:
    """Full fine-tuning + EMA from the same base on many more egocentric frames: what the domain allows."""
    from training.config import TrainConfig
    from training.recipe import train

    result = train(TrainConfig(data=str(data["ceiling"]), base=base, imgsz=scale.imgsz, batch=scale.batch,
                               max_steps=scale.ceiling_steps, epochs=10_000, eval_every=0, save_every=200,
                               ema=True, lr=FULL_LR, seed=0, out=str(out), quiet=quiet, eval_batch=32))
    from models.detection import DetectionModel
    from training.evaluate import evaluate

    model = DetectionModel.load(result.merged_dir)
    target = evaluate(model, data["target"], split="val", imgsz=scale.imgsz, batch=32)
    return {"target_map50_95": target["map50_95"], "target_map50": target["map50"], "steps": result.steps,
            "train_frames": scale.ceiling_train, "seconds_per_step": seconds_per_step(out / "metrics.jsonl")}


# ---------------------------------------------------------------------------- the report
def summarize(setups: list[Setup], results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per setup: means and spreads over its seeds, ratios to full FT, gap closed."""
    zero = results.get("zero-shot/0", {}).get("target_map50_95")
    ceiling = results.get("ceiling", {}).get("target_map50_95")
    full_bytes = _first(results, "full-adamw", "bytes")
    rows = []
    for s in setups:
        runs = [v for k, v in results.items() if k.split("/")[0] == s.name]
        if not runs:
            continue
        t = [r["target_map50_95"] for r in runs]
        row = {"setup": s, "n": len(runs), "target": statistics.mean(t),
               "spread": (max(t) - min(t)) / 2 if len(t) > 1 else None,
               "target50": statistics.mean(r["target_map50"] for r in runs),
               "source": statistics.mean(r["source_map50_95"] for r in runs),
               "trainable": runs[0]["trainable_percent"], "bytes": runs[0].get("bytes"),
               "sps": _median([r.get("seconds_per_step") for r in runs]), "adapter_bytes": runs[0].get("adapter_bytes")}
        row["bytes_ratio"] = row["bytes"] / full_bytes if row["bytes"] and full_bytes else None
        row["gap_closed"] = ((row["target"] - zero) / (ceiling - zero)) if ceiling is not None and zero is not None \
            and ceiling > zero and s.kind != "zero-shot" else None
        rows.append(row)
    return rows


def _first(results: dict, name: str, key: str):
    for k, v in results.items():
        if k.split("/")[0] == name and v.get(key):
            return v[key]
    return None


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def goals(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, checked against the measured rows."""
    by = {r["setup"].name: r for r in rows}
    lines = []
    full, ul = by.get("full-adamw"), by.get("ultralytics")
    if full and ul:
        ok = full["target"] >= ul["target"]
        lines.append(f"- our full FT ({full['target']:.3f}) {'>=' if ok else '<'} ultralytics' trainer "
                     f"({ul['target']:.3f}): {'met' if ok else 'missed'}")
    if full:
        cheap = [r for r in rows if r["bytes_ratio"] is not None and r["bytes_ratio"] <= 0.35
                 and r["setup"].kind == "recipe"]
        best = max(cheap, key=lambda r: r["target"], default=None)
        if best:
            share = best["target"] / full["target"]
            lines.append(f"- best setup at <= 0.35x full-FT bytes: {best['setup'].name} ({best['bytes_ratio']:.2f}x) "
                         f"reaches {100 * share:.1f}% of full FT's target mAP50-95: "
                         f"{'met' if share >= 0.95 else 'missed'} (goal 95%)")
        peft = [r for r in rows if r["setup"].kind == "recipe" and r["trainable"] <= 10 and r["setup"].mergeable
                and "replay" not in r["setup"].name]
        best_peft = max(peft, key=lambda r: r["target"], default=None)
        if best_peft:
            share = best_peft["target"] / full["target"]
            lines.append(f"- best PEFT setup (<= 10% trainable): {best_peft['setup'].name} reaches {100 * share:.1f}% "
                         f"of full FT: {'met' if share >= 0.95 else 'missed'} (goal 95%)")
            if best_peft["gap_closed"] is not None:
                lines.append(f"- gap closed by it: {100 * best_peft['gap_closed']:.0f}%: "
                             f"{'met' if best_peft['gap_closed'] >= 0.60 else 'missed'} (goal 60%)")
    zero = by.get("zero-shot")
    for name, plain in (("lora-coap-ckpt-replay", "lora-coap-ckpt"), ("full-adamw-replay", "full-adamw")):
        if name in by and plain in by and zero:
            kept = by[name]["source"] / zero["source"]
            cost = 100 * (by[plain]["target"] - by[name]["target"])
            lines.append(f"- replay ({name}): source mAP50-95 kept {100 * kept:.0f}% of before (goal >= 90%), "
                         f"target cost {cost:+.1f} points vs {plain} (goal <= 2): "
                         f"{'met' if kept >= 0.9 and cost <= 2 else 'missed'}")
    return lines


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not beaten by another with fewer (or equal) bytes and a higher (or equal) score."""
    front, best = [], -1.0
    for x, y, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y, name))
            best = y
    return front


def plot(rows: list[dict[str, Any]], path: Path, zero: float | None, ceiling: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["bytes"] / 2**20, r["target"], r["setup"].name) for r in rows if r["bytes"]]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for x, y, name in pts:
        ax.scatter(x, y, s=28, color="tab:blue")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    front = pareto(pts)
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:orange", label="Pareto front")
    for value, label, style in ((zero, "zero-shot", ":"), (ceiling, "in-domain ceiling", "--")):
        if value is not None:
            ax.axhline(value, linestyle=style, color="gray", linewidth=1)
            ax.annotate(label, (ax.get_xlim()[0], value), textcoords="offset points", xytext=(2, 2), fontsize=7)
    ul = [r for r in rows if r["setup"].name == "ultralytics"]
    if ul:
        ax.axhline(ul[0]["target"], linestyle="-.", color="tab:red", linewidth=1)
        ax.annotate("ultralytics trainer", (ax.get_xlim()[0], ul[0]["target"]), textcoords="offset points",
                    xytext=(2, -9), fontsize=7, color="tab:red")
    ax.set_xlabel("exact training bytes of one step (MiB): params + grads + optimizer state + saved activations")
    ax.set_ylabel("egocentric val mAP50-95")
    ax.set_title("Adapting the shipped base to egocentric frames")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def report(rows: list[dict[str, Any]], results: dict[str, Any], scale: Scale, command: str, machine: str,
           plot_name: str) -> str:
    zero = results.get("zero-shot/0", {}).get("target_map50_95")
    ceiling = results.get("ceiling", {})

    def f(v, fmt="{:.3f}"):
        return "–" if v is None else fmt.format(v)

    lines = [
        "# Egocentric domain-shift benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}",
        "",
        f"Every setup adapts the shipped base for **{scale.steps} optimizer steps of batch {scale.batch}** at "
        f"{scale.imgsz} px on the same {scale.target_train} generated egocentric frames (seed {TARGET_SEED}); target = its "
        f"{scale.target_val}-frame egocentric val split; source = {scale.source_val} fresh source-domain val frames "
        f"(seed {SOURCE_SEED}; forgetting). Main rows (marked *) are the mean over {scale.seeds} training seeds, ± half the range. "
        "Bytes are exact (training.memory: parameters, gradients, optimizer state, activations saved for backward, "
        "one micro-batch). Seconds per step are medians on a shared 2-core CPU (see load), for ratios only.",
        "",
        f"In-domain ceiling: full FT + EMA from the same base on {ceiling.get('train_frames', '?')} other egocentric "
        f"frames (seed {CEILING_SEED}), {ceiling.get('steps', '?')} steps: target mAP50-95 **{f(ceiling.get('target_map50_95'))}**"
        f" (mAP50 {f(ceiling.get('target_map50'))}). Gap closed = (adapted − zero-shot) / (ceiling − zero-shot).",
        "",
        "| setup | target mAP50-95 | mAP50 | source mAP50-95 after | trainable % | training bytes (MiB) | × full FT | s/step | gap closed | adapter file |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["setup"]
        name = f"{s.label}{' *' if s.main and r['n'] > 1 else ''}{'' if s.mergeable else ' (not mergeable)'}"
        target = f(r["target"]) + (f" ± {r['spread']:.3f}" if r["spread"] is not None else "")
        lines.append(
            f"| {name} | {target} | {f(r['target50'])} | {f(r['source'])} | {f(r['trainable'], '{:.2f}')} | "
            f"{f(r['bytes'] / 2**20 if r['bytes'] else None, '{:.1f}')} | {f(r['bytes_ratio'], '{:.2f}')} | "
            f"{f(r['sps'], '{:.2f}')} | {f(100 * r['gap_closed'] if r['gap_closed'] is not None else None, '{:.0f}%')} | "
            f"{f(r['adapter_bytes'] / 2**10 if r.get('adapter_bytes') else None, '{:.0f} KiB')} |")
    lines += ["", f"![target mAP50-95 against training bytes]({plot_name})", "", "## Goals", ""] + goals(rows)
    ul = [v for k, v in results.items() if k.startswith("ultralytics/")]
    if ul and ul[0].get("note"):
        lines += ["", f"ultralytics row: {ul[0]['note']}; its `best.pt` (chosen by its own validation on the "
                  "target val split) is scored by our evaluator."]
    if zero is not None:
        lines += ["", f"Zero-shot target mAP50-95 of the shipped base: {zero:.3f}."]
    return "\n".join(lines) + "\n"


#: the hand-written reading of the table; a re-render keeps it (and everything after it)
ANALYSIS_HEADING = "## What the table says"


#: the first line of the generated part of a report; what an existing report has between its title and this line
#: (sections written by hand, such as re-runs of some rows) is kept by a re-render too
GENERATED_START = "\nCommand: `"


def with_kept_sections(text: str, doc: Path) -> str:
    """The re-rendered report ``text`` with the hand-written parts of the existing ``doc``: the sections between
    its title and its generated part, and the analysis from :data:`ANALYSIS_HEADING` on."""
    if not doc.is_file():
        return text
    old = doc.read_text()
    title_end, generated = old.index("\n"), old.find(GENERATED_START)
    preamble = old[title_end : generated + 1] if generated > title_end else "\n\n"
    start = old.find(ANALYSIS_HEADING)
    analysis = "" if start < 0 else "\n" + old[start:]
    return text[: text.index("\n")] + preamble + text[text.find(GENERATED_START) + 1 :] + analysis


def command_line(argv) -> str:
    args = argv if argv is not None else sys.argv[1:]
    return ("python benchmarks/adaptation.py " + " ".join(shlex.quote(a) for a in args)).strip()


def record_ceiling(ceiling: dict[str, Any], scale: Scale, command: str) -> None:
    """Store the in-domain ceiling, with the val set it was measured on, in the shipped base's card."""
    from models.io import atomic_write_json
    from models.registry import BASE_MODEL_DIR

    card_path = BASE_MODEL_DIR / "card.json"
    card = json.loads(card_path.read_text())
    card["egocentric_ceiling"] = {
        "map50_95": round(ceiling["target_map50_95"], 4), "map50": round(ceiling["target_map50"], 4),
        "data_seed": TARGET_SEED, "frames": scale.target_train + scale.target_val, "val_frames": scale.target_val,
        "imgsz": scale.imgsz, "train_frames": ceiling["train_frames"], "steps": ceiling["steps"], "command": command,
    }
    atomic_write_json(card_path, card)


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else Scale()
    if args.steps:
        scale = Scale(**{**scale.__dict__, "steps": args.steps})
    if args.seeds:
        scale = Scale(**{**scale.__dict__, "seeds": args.seeds})
    known = {s.name: s for s in SETUPS}
    names = [n.strip() for n in args.rows.split(",")] if args.rows else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown setups {unknown}; known: {', '.join(known)}")
    setups = [known[n] for n in names]
    if "zero-shot" not in names:
        setups.insert(0, known["zero-shot"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "results.json"
    results: dict[str, Any] = {} if args.force or not cache_path.is_file() else json.loads(cache_path.read_text())
    from models.io import atomic_write_json, atomic_write_text

    data = build_data(out / "data", scale, args.quiet)
    first = sorted(setups, key=lambda s: PRIORITY.index(s.name) if s.name in PRIORITY else len(PRIORITY))
    jobs: list[tuple[Setup | None, int]] = [(s, 0) for s in first]
    if not args.no_ceiling:
        jobs.insert(len([s for s in first if s.name in PRIORITY]), (None, 0))
    jobs += [(s, seed) for s in first if s.main for seed in range(1, scale.seeds)]
    from tqdm import tqdm

    for setup, seed in tqdm(jobs, desc="adaptation benchmark", unit="run", disable=args.quiet):
        key = f"{setup.name}/{seed}" if setup else "ceiling"
        if key in results:
            continue
        run_dir = out / "runs" / key.replace("/", "-seed")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        if setup is None:
            record = run_ceiling(data, scale, args.base, run_dir, args.quiet)
        elif setup.kind == "zero-shot":
            record = run_zero_shot(data, scale, args.base)
        elif setup.kind == "ultralytics":
            record = run_ultralytics(seed, data, scale, args.base, run_dir)
        else:
            record = run_recipe(setup, seed, data, scale, args.base, run_dir, args.quiet)
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        record["load_average"] = [round(x, 2) for x in os.getloadavg()]
        results[key] = record
        atomic_write_json(cache_path, results)
        if not args.quiet:
            tqdm.write(f"{key}: target mAP50-95 {record['target_map50_95']:.4f}, source "
                       f"{record.get('source_map50_95', float('nan')):.4f} ({record['wall_s']} s)")
    if args.record_ceiling and "ceiling" in results:
        record_ceiling(results["ceiling"], scale, command_line(argv))
    rows = summarize(setups, results)
    doc = Path(args.doc) if args.doc else out / "adaptation.md"
    plot_path = Path(args.plot) if args.plot else doc.with_name("adaptation.png")
    plot(rows, plot_path, results.get("zero-shot/0", {}).get("target_map50_95"),
         results.get("ceiling", {}).get("target_map50_95"))
    loads = [v["load_average"][0] for v in results.values() if "load_average" in v]
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with {args.threads} threads; "
               f"1-minute load average while the runs finished: {min(loads):.1f}–{max(loads):.1f}" if loads else "")
    command = command_line(argv)
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = report(rows, results, scale, command.strip(), machine, os.path.relpath(plot_path, doc.parent))
    atomic_write_text(doc, with_kept_sections(text, doc))
    print("\n".join(goals(rows)))
    print(f"report: {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
