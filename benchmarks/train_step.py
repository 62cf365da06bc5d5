"""Our training step against ultralytics' own trainer's: seconds per optimizer step and images per second.

    python benchmarks/train_step.py --out runs/train_step                 # the full run (docs/benchmarks/train_step.md)
    python benchmarks/train_step.py --out /tmp/train_step --quick         # a smoke run (tests)
    python benchmarks/train_step.py --out runs/train_step --setups full-adamw,ultralytics --steps 30 --rounds 3
    python benchmarks/train_step.py --out runs/train_step --profile full-adamw   # cProfile one run, top lines
    python benchmarks/train_step.py --out runs/train_step --op-profile full-adamw,ultralytics  # torch ops per step
    python benchmarks/train_step.py --out runs/train_step --data-loading        # batch loading alone, both pipelines

Every setup starts from the shipped base (YOLO11n) and trains on the same generated egocentric
frames (fixed seed) with the same batch and input size, augmentation on (each trainer's own
defaults), on the CPU with the same number of torch threads, data loaded in the main process
(``workers=0``: our default, and what ultralytics' trainer forces on the CPU). Ultralytics'
nominal batch ``nbs`` is set to the batch, so that it takes one optimizer step per batch as ours
does (its default would accumulate 4 batches of 16 into one step).

A step's time is the wall time between the ends of two consecutive optimizer steps, so it
includes loading and augmenting the batch; the first ``--warmup`` steps of every run are left
out of the median. Setups run one after another and the whole sequence is repeated ``--rounds``
times (the order rotated each round), so that machine load falls on all of them alike; the
1-minute load average is recorded after every run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
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

from benchmarks.adaptation import COAP, LORA, PEFT_LR, SETUPS as ADAPTATION_SETUPS, TARGET_SEED  # noqa: E402

_ADAPTATION = {s.name: s for s in ADAPTATION_SETUPS}


@dataclass(frozen=True)
class Setup:
    """One row: a recipe configuration (``TrainConfig`` fields) or ultralytics' trainer."""

    name: str
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    kind: str = "recipe"  # recipe | ultralytics


def _from_adaptation(name: str, label: str) -> Setup:
    """The adaptation benchmark's row of that name (same settings, same learning rate)."""
    return Setup(name, label, dict(_ADAPTATION[name].config))


SETUPS: tuple[Setup, ...] = (
    _from_adaptation("full-adamw", "ours: full FT, AdamW"),
    _from_adaptation("full-coap", "ours: full FT, COAP"),
    _from_adaptation("full-coap-ckpt", "ours: full FT, COAP + checkpointing (the demo's)"),
    Setup("lora-coap", "ours: LoRA r=8 + COAP", {**LORA, **COAP, "lr": PEFT_LR}),
    _from_adaptation("lora-coap-ckpt", "ours: LoRA r=8 + COAP + checkpointing"),
    Setup("lora-coap-ckpt-hr", "ours: LoRA r=8 + COAP + checkpointing of the stride <= 8 layers",
          {**_ADAPTATION["lora-coap-ckpt"].config, "grad_checkpoint_policy": "high_res"}),
    Setup("ultralytics", "ultralytics' trainer: full FT, AdamW", kind="ultralytics"),
)
REFERENCE = "ultralytics"

#: the issue's goals: our time per step / ultralytics' (None: reported, no goal)
GOALS = {"full-adamw": 1.0, "lora-coap-ckpt": 1.2, "lora-coap-ckpt-hr": 1.2}


@dataclass(frozen=True)
class Scale:
    """Sizes of one benchmark run (the full one, or ``--quick``)."""

    imgsz: int = 128
    batch: int = 16
    steps: int = 40  # optimizer steps per run, warm-up included
    warmup: int = 5
    rounds: int = 3
    val: int = 32


QUICK = Scale(imgsz=64, batch=4, steps=2, warmup=1, rounds=1, val=4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/train_step", help="work folder: data, runs, results.json, report")
    p.add_argument("--base", default="glasses-base-yolo11n", help="the model every setup starts from")
    p.add_argument("--setups", help="comma-separated setup names (default: all); known: "
                   + ", ".join(s.name for s in SETUPS))
    p.add_argument("--steps", type=int, help=f"optimizer steps per run, warm-up included (default {Scale.steps})")
    p.add_argument("--warmup", type=int, help=f"first steps of each run left out of the median (default {Scale.warmup})")
    p.add_argument("--rounds", type=int, help=f"times the whole sequence of setups is repeated (default {Scale.rounds})")
    p.add_argument("--batch", type=int, help=f"images per step (default {Scale.batch})")
    p.add_argument("--imgsz", type=int, help=f"input size in pixels (default {Scale.imgsz})")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, for every setup (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (2 steps of 4 images at 64 px, one round)")
    p.add_argument("--profile", metavar="SETUP", help="instead of timing: run SETUP once under cProfile and print "
                   "the functions with the most cumulative time")
    p.add_argument("--op-profile", metavar="SETUPS", help="instead of timing: run each of these setups once under "
                   "torch.profiler and print, side by side, the ops with the most self CPU time per optimizer step "
                   "(the data loader's batches included)")
    p.add_argument("--data-loading", action="store_true", help="instead of training: time loading + augmenting "
                   "batches alone, our loader against ultralytics' (its trainer's dataset and loader), interleaved")
    p.add_argument("--doc", help="write the Markdown report here (default <out>/train_step.md)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- data
def build_data(root: Path, scale: Scale, quiet: bool) -> Path:
    """One generated egocentric set with exactly ``steps x batch`` train frames (one epoch = one run)."""
    from training.data.synthetic import generate_dataset

    n_train = scale.steps * scale.batch
    n = n_train + scale.val
    out = root / f"egocentric-{scale.imgsz}px-{n_train}+{scale.val}"
    return generate_dataset(out, "egocentric", n=n, imgsz=scale.imgsz, seed=TARGET_SEED, val_fraction=scale.val / n,
                            progress=not quiet)


# ---------------------------------------------------------------------------- runs
@dataclass
class StepClock:
    """Wall-clock stamps: the loop's start, then the end of every optimizer step."""

    start: float | None = None
    ends: list[float] = field(default_factory=list)

    def intervals(self) -> list[float]:
        stamps = [self.start, *self.ends]
        return [b - a for a, b in zip(stamps, stamps[1:])]


def run_recipe(setup: Setup, data: Path, scale: Scale, base: str, out: Path, threads: int) -> dict[str, Any]:
    """Our recipe (``training.recipe.train``), with its defaults but for the sizes; ``should_stop`` (asked after
    every optimizer step) is the step clock."""
    import torch

    from training.config import TrainConfig
    from training.recipe import train

    clock = StepClock()

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "start":
            clock.start = time.perf_counter()

    def should_stop() -> bool:
        clock.ends.append(time.perf_counter())
        assert torch.get_num_threads() == threads, torch.get_num_threads()
        return False

    values = dict(data=str(data), base=base, imgsz=scale.imgsz, batch=scale.batch, max_steps=scale.steps,
                  epochs=1, out=str(out), quiet=True, seed=0, eval_batch=32)
    values.update(setup.config)
    config = TrainConfig(**values)
    started = time.perf_counter()
    result = train(config, on_event=on_event, should_stop=should_stop)
    call_wall = time.perf_counter() - started
    assert result.steps == scale.steps, result.steps
    return {"intervals": clock.intervals(), "call_wall_s": call_wall, "workers": config.workers,
            "augmentation": "ours (training.data.augment defaults: flip, colour jitter, affine; mosaic off)"}


def run_ultralytics(data: Path, scale: Scale, base: str, out: Path, threads: int) -> dict[str, Any]:
    """ultralytics' trainer from the same weights (exported by the project's own exporter) on the same frames;
    its defaults but for the sizes, ``nbs`` (one optimizer step per batch), AdamW at our full-FT lr, and the
    thread count (its ``select_device`` sets ``min(8, cores - 1)`` torch threads; we set them back after it)."""
    import torch
    from ultralytics import YOLO

    from benchmarks.adaptation import FULL_LR
    from export.ultralytics_export import export_ultralytics
    from models.registry import create_model

    out = out.resolve()  # ultralytics puts a relative project under its own runs_dir setting
    out.mkdir(parents=True, exist_ok=True)
    start = out / "start.pt"
    export_ultralytics(create_model(base), start, imgsz=scale.imgsz)
    clock = StepClock()
    seen: dict[str, Any] = {}

    def on_train_start(trainer) -> None:
        torch.set_num_threads(threads)
        seen["workers"] = trainer.train_loader.num_workers
        seen["accumulate"] = trainer.accumulate
        clock.start = time.perf_counter()

    def on_train_batch_end(trainer) -> None:
        clock.ends.append(time.perf_counter())
        assert torch.get_num_threads() == threads, torch.get_num_threads()
        if len(clock.ends) >= scale.steps:
            trainer.stop = True

    model = YOLO(str(start))
    model.add_callback("on_train_start", on_train_start)
    model.add_callback("on_train_batch_end", on_train_batch_end)
    started = time.perf_counter()
    model.train(data=str(data), epochs=1, batch=scale.batch, nbs=scale.batch, imgsz=scale.imgsz, seed=0,
                optimizer="AdamW", lr0=FULL_LR, device="cpu", workers=0, project=str(out), name="train",
                exist_ok=True, plots=False, verbose=False)
    call_wall = time.perf_counter() - started
    # undo what its trainer set for the whole process, so the next setup runs as it would on its own
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)
    assert len(clock.ends) == scale.steps, len(clock.ends)
    assert seen["accumulate"] == 1, seen
    return {"intervals": clock.intervals(), "call_wall_s": call_wall, "workers": seen["workers"],
            "augmentation": "ultralytics' defaults (mosaic 1.0, random perspective, HSV, flip"
                            + (", albumentations" if _has_albumentations() else "") + ")"}


def _has_albumentations() -> bool:
    from importlib.util import find_spec

    return find_spec("albumentations") is not None


def run_once(setup: Setup, data: Path, scale: Scale, base: str, out: Path, threads: int) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    if setup.kind == "ultralytics":
        record = run_ultralytics(data, scale, base, out, threads)
    else:
        record = run_recipe(setup, data, scale, base, out, threads)
    timed = record["intervals"][scale.warmup:]
    record.update(median_s=statistics.median(timed), loop_wall_s=sum(record["intervals"]),
                  load_average=[round(x, 2) for x in os.getloadavg()])
    return record


def profile_once(setup: Setup, data: Path, scale: Scale, base: str, out: Path, threads: int, top: int = 30) -> str:
    """One run of ``setup`` under cProfile: the ``top`` functions by cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    record = run_once(setup, data, scale, base, out, threads)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return (f"{setup.name}: median {record['median_s']:.3f} s/step under cProfile, loop {record['loop_wall_s']:.1f} s, "
            f"load {record['load_average']}\n" + text.getvalue())


def op_profile(setups: list[Setup], data: Path, scale: Scale, base: str, out: Path, threads: int,
               top: int = 20) -> str:
    """Each setup run once under ``torch.profiler``: self CPU time per optimizer step of the ``top`` ops (over all
    setups), one column per setup. The runs' setup and final evaluation are included, divided by the step count."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    columns: dict[str, dict[str, float]] = {}
    lines = []
    for s in setups:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            record = run_once(s, data, scale, base, out / s.name, threads)
        columns[s.name] = {e.key: e.self_cpu_time_total / 1000 / scale.steps for e in prof.key_averages()}
        lines.append(f"{s.name}: median {record['median_s']:.3f} s/step while profiled, load {record['load_average']}")
    names = sorted({k for c in columns.values() for k in c}, key=lambda k: -max(c.get(k, 0.0) for c in columns.values()))
    header = f"{'op (self CPU ms per step)':60s}" + "".join(f"{n[:18]:>20s}" for n in columns)
    rows = [f"{k[:60]:60s}" + "".join(f"{c.get(k, 0.0):20.2f}" for c in columns.values()) for k in names[:top]]
    return "\n".join(lines + ["", header, *rows])


def time_data_loading(data: Path, scale: Scale, threads: int) -> dict[str, Any]:
    """Seconds per batch of loading + augmenting + collating alone, for our loader (the recipe's) and ultralytics'
    (the dataset and loader its trainer builds, its default hyperparameters), in the main process, interleaved."""
    import torch
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from training import recipe
    from training.config import TrainConfig

    cfg = TrainConfig(data=str(data), imgsz=scale.imgsz, batch=scale.batch, seed=0)
    ours = recipe.build_datasets(cfg)[0]
    hyp = get_cfg(overrides={"imgsz": scale.imgsz, "batch": scale.batch})
    info = check_det_dataset(str(data))
    theirs = build_yolo_dataset(hyp, info["train"], scale.batch, info, mode="train", stride=32)
    times: dict[str, list[float]] = {"ours": [], "ultralytics": []}

    def batches(name: str, epoch: int):
        if name == "ours":
            return iter(recipe.build_loader(ours, cfg, recipe.DistInfo(), epoch, 0, scale.steps))
        return iter(build_dataloader(theirs, scale.batch, workers=0, shuffle=True))

    for rnd in range(scale.rounds):
        for name in ("ours", "ultralytics") if rnd % 2 == 0 else ("ultralytics", "ours"):
            it = batches(name, rnd)
            for k in range(scale.steps):
                started = time.perf_counter()
                next(it)
                if k >= scale.warmup:
                    times[name].append(time.perf_counter() - started)
                assert torch.get_num_threads() == threads
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------- the report
def summarize(setups: list[Setup], runs: list[dict[str, Any]], scale: Scale) -> list[dict[str, Any]]:
    """One row per setup: median step over every round's timed steps, per-round medians, ratio to ultralytics."""
    rows = []
    for s in setups:
        mine = [r for r in runs if r["setup"] == s.name]
        if not mine:
            continue
        steps = [t for r in mine for t in r["intervals"][scale.warmup:]]
        median = statistics.median(steps)
        rows.append({"setup": s, "median_s": median, "images_per_s": scale.batch / median,
                     "round_medians": [r["median_s"] for r in mine],
                     "loop_wall_s": statistics.median(r["loop_wall_s"] for r in mine),
                     "call_wall_s": statistics.median(r["call_wall_s"] for r in mine),
                     "workers": mine[0]["workers"], "augmentation": mine[0]["augmentation"]})
    ref = next((r for r in rows if r["setup"].name == REFERENCE), None)
    for row in rows:
        row["ratio"] = row["median_s"] / ref["median_s"] if ref else None
        # the same ratio within each round (runs made minutes apart under the same load), for its spread
        row["round_ratios"] = ([a / b for a, b in zip(row["round_medians"], ref["round_medians"])] if ref else [])
    return rows


def goals(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["setup"].name: r for r in rows}
    lines = []
    for name, limit in GOALS.items():
        if name in by and by[name]["ratio"] is not None:
            r = by[name]["ratio"]
            lines.append(f"- {name}: {r:.2f}x ultralytics' time per step (goal <= {limit:.1f}x): "
                         f"{'met' if r <= limit else 'missed'}")
    pairs = (("lora-coap", "lora-coap-ckpt"), ("lora-coap", "lora-coap-ckpt-hr"), ("full-coap", "full-coap-ckpt"))
    for plain, ckpt in pairs:
        if plain in by and ckpt in by:
            lines.append(f"- checkpointing costs {ckpt} {by[ckpt]['median_s'] / by[plain]['median_s']:.2f}x the time "
                         f"per step of {plain}")
    return lines


def report(rows: list[dict[str, Any]], runs: list[dict[str, Any]], scale: Scale, command: str, machine: str) -> str:
    loads = [r["load_average"][0] for r in runs]
    lines = [
        "# Training step: ours against ultralytics' trainer",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}; 1-minute load average after each run: {min(loads):.2f}–{max(loads):.2f}.",
        "",
        f"Each run: {scale.steps} optimizer steps of batch {scale.batch} at {scale.imgsz} px from the shipped base, "
        f"on {scale.steps * scale.batch} generated egocentric frames (seed {TARGET_SEED}); {scale.rounds} round(s) of "
        f"all setups, interleaved. s/step = median over all rounds of the steps after the first {scale.warmup} of "
        "each run (a step = end of one optimizer step to the end of the next: data loading and augmentation "
        "included). Loop wall = the run's first step start to its last step end (median over rounds); call wall "
        "= the whole training call (setup, memory pre-flight or label cache, final evaluation and saving included).",
        "",
        "| setup | s/step | images/s | × ultralytics | per-round × | loop wall (s) | call wall (s) | data workers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
        spread = ", ".join(f"{x:.2f}" for x in r["round_ratios"]) or "–"
        lines.append(f"| {r['setup'].label} | {r['median_s']:.3f} | {r['images_per_s']:.1f} | {ratio} | {spread} | "
                     f"{r['loop_wall_s']:.1f} | {r['call_wall_s']:.1f} | {r['workers']} (main process) |")
    lines += ["", "Augmentation: " + "; ".join(sorted({r["augmentation"] for r in rows})) + ".", "", "## Goals", ""]
    lines += goals(rows)
    return "\n".join(lines) + "\n"


def command_line(argv) -> str:
    args = argv if argv is not None else sys.argv[1:]
    return ("python benchmarks/train_step.py " + " ".join(shlex.quote(a) for a in args)).strip()


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else Scale()
    overrides = {k: getattr(args, k) for k in ("steps", "warmup", "rounds", "batch", "imgsz") if getattr(args, k)}
    scale = Scale(**{**scale.__dict__, **overrides})
    if scale.steps <= scale.warmup:
        raise SystemExit(f"--steps ({scale.steps}) must be more than --warmup ({scale.warmup})")
    known = {s.name: s for s in SETUPS}
    names = [n.strip() for n in args.setups.split(",")] if args.setups else list(known)
    if args.profile:
        names = [args.profile]
    elif args.op_profile:
        names = [n.strip() for n in args.op_profile.split(",")]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown setups {unknown}; known: {', '.join(known)}")
    setups = [known[n] for n in names]
    out = Path(args.out).resolve()
    data = build_data(out / "data", scale, args.quiet)
    if args.data_loading:
        medians = time_data_loading(data, scale, args.threads)
        print("\n".join(f"{name}: {1000 * t:.1f} ms per batch of {scale.batch} ({scale.batch / t:.0f} images/s)"
                        for name, t in medians.items()) + f"; load {os.getloadavg()[0]:.2f}")
        return 0
    if args.op_profile:
        print(op_profile(setups, data, scale, args.base, out / "runs" / "op-profile", args.threads))
        return 0
    if args.profile:
        print(profile_once(setups[0], data, scale, args.base, out / "runs" / f"profile-{args.profile}", args.threads))
        return 0

    from models.io import atomic_write_json, atomic_write_text

    runs: list[dict[str, Any]] = []
    for rnd in range(scale.rounds):
        order = setups[rnd % len(setups):] + setups[: rnd % len(setups)]
        for s in order:
            record = run_once(s, data, scale, args.base, out / "runs" / s.name, args.threads)
            runs.append({"setup": s.name, "round": rnd, **record})
            atomic_write_json(out / "results.json", {"scale": scale.__dict__, "runs": runs})
            if not args.quiet:
                print(f"round {rnd + 1}/{scale.rounds} {s.name}: {record['median_s']:.3f} s/step, loop "
                      f"{record['loop_wall_s']:.1f} s, load {record['load_average'][0]}", flush=True)
    rows = summarize(setups, runs, scale)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
               f"{torch.__version__} with {args.threads} threads")
    doc = Path(args.doc) if args.doc else out / "train_step.md"
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(doc, report(rows, runs, scale, command_line(argv), machine))
    print("\n".join(goals(rows)))
    print(f"report: {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
