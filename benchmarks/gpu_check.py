"""CUDA checks that the CPU development machine cannot make (docs/benchmarks/gpu.md).

Three measurements on one CUDA device, each printed and written as JSON:

1. ``optimizer.step()`` and the whole training step (forward + backward + step) of
   AdamW (torch's default and ``fused=True``), COAP, COAP-8bit and AdamW8bit on full
   fine-tuning of YOLO11n/s: every method trains its own copy of the same weights on
   the same batches, one step each in turn (interleaved, the order rotating), timed
   with ``torch.cuda.synchronize`` around each phase; medians. Also the optimizer
   state as counted exactly (``training.memory.optimizer_state_bytes``) and as seen by
   the CUDA allocator (``memory_allocated`` growth over the first step, grads freed).
2. bf16 autocast (the recipe's ``amp: bf16``) against fp32 on one batch, on the shipped base: loss and
   gradient agreement (relative error, cosine), and the forward + backward time.
3. Gradient checkpointing: CUDA ``max_memory_allocated`` over forward + backward with
   and without checkpointing every part, next to ``MemoryReport``'s exact count of
   saved activations, and the time it costs.

Run:  python benchmarks/gpu_check.py --out results/   (needs CUDA; ~3 min on an H200)
      python benchmarks/gpu_check.py --from-json results/gpu_check.json   (the markdown tables)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from ultralytics.utils.loss import v8DetectionLoss  # noqa: E402

from models import DetectionModel  # noqa: E402
from models.registry import load_base_model  # noqa: E402
from training.memory import measure_memory, optimizer_state_bytes  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.recipe import amp_context  # noqa: E402

NC = 6
# The papers' projection settings (COAP: correlation update every 32 steps, re-projection every 160).
COAP = {"rank_ratio_cnn": 4.0, "rank_ratio_matrix": 4.0, "update_interval": 32, "reproject_factor": 5}
METHODS = {
    "adamw": lambda params: build_optimizer("adamw", params, lr=1e-4),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=True),
    "coap": lambda params: build_optimizer("coap", params, lr=1e-4, **COAP),
    "coap8bit": lambda params: build_optimizer("coap8bit", params, lr=1e-4, **COAP),
    "adamw8bit": lambda params: build_optimizer("adamw8bit", params, lr=1e-4),
}


def random_batch(batch: int, imgsz: int, device: torch.device, seed: int) -> tuple[torch.Tensor, dict]:
    """Random images with 1-4 random boxes each, in ultralytics' batch format."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 5, (batch,), generator=g)
    n = int(counts.sum())
    wh = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
    targets = {
        "batch_idx": torch.repeat_interleave(torch.arange(batch), counts).float(),
        "cls": torch.randint(0, NC, (n, 1), generator=g).float(),
        "bboxes": torch.cat([xy, wh], 1),
    }
    imgs = torch.rand(batch, 3, imgsz, imgsz, generator=g)
    return imgs.to(device), {k: v.to(device) for k, v in targets.items()}


def sync() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def optimizer_cell(cfg: str, imgsz: int, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    base = DetectionModel(cfg, nc=NC, imgsz=imgsz).to(device)
    batches = [random_batch(batch, imgsz, device, seed) for seed in range(4)]
    runs = {}
    for name, make in METHODS.items():
        model = copy.deepcopy(base).train()
        runs[name] = {"model": model, "crit": v8DetectionLoss(model), "opt": make(list(model.parameters())),
                      "fwd_bwd": [], "step": [], "loss": []}
    # optimizer state as the allocator sees it: memory growth over the first step (grads freed before and after)
    for r in runs.values():
        imgs, targets = batches[0]
        loss, _ = r["crit"](r["model"](imgs), targets)
        loss.sum().backward()
        before = torch.cuda.memory_allocated()
        r["opt"].step()
        torch.cuda.synchronize()
        r["state_allocated"] = torch.cuda.memory_allocated() - before
        r["opt"].zero_grad(set_to_none=True)
    names = list(runs)
    for i in range(warmup + steps):
        imgs, targets = batches[i % len(batches)]
        for name in names[i % len(names):] + names[: i % len(names)]:
            r = runs[name]
            t0 = sync()
            r["opt"].zero_grad(set_to_none=True)
            loss, _ = r["crit"](r["model"](imgs), targets)
            loss = loss.sum()
            loss.backward()
            t1 = sync()
            r["opt"].step()
            t2 = sync()
            if i >= warmup:
                r["fwd_bwd"].append(t1 - t0)
                r["step"].append(t2 - t1)
                r["loss"].append(loss.item())
    ref = runs["adamw"]
    out = {"model": cfg, "imgsz": imgsz, "batch": batch, "steps": steps, "methods": {}}
    for name, r in runs.items():
        step, whole = statistics.median(r["step"]), statistics.median([a + b for a, b in zip(r["fwd_bwd"], r["step"])])
        out["methods"][name] = {
            "step_ms": 1e3 * step,
            "whole_ms": 1e3 * whole,
            "step_vs_adamw": step / statistics.median(ref["step"]),
            "whole_vs_adamw": whole / statistics.median([a + b for a, b in zip(ref["fwd_bwd"], ref["step"])]),
            "state_bytes_exact": optimizer_state_bytes(r["opt"]),
            "state_bytes_allocated": r["state_allocated"],
            "loss_last": r["loss"][-1],
        }
    del runs, base
    torch.cuda.empty_cache()
    return out


def bf16_check(device: torch.device, imgsz: int = 320, batch: int = 16, repeats: int = 20) -> dict:
    # the shipped base, not random weights: at random init the loss's anchor assignment flips on
    # rounding-level differences and fp32 itself is not a stable reference for the gradients
    model = load_base_model().to(device).train()
    crit = v8DetectionLoss(model)
    imgs, targets = random_batch(batch, imgsz, device, 0)
    results = {}
    for amp in ("none", "bf16"):
        autocast = amp_context(amp, device)
        times = []
        for _ in range(repeats + 3):
            model.zero_grad(set_to_none=True)
            t0 = sync()
            with autocast():
                loss, _ = crit(model(imgs), targets)
            loss.sum().backward()
            times.append(sync() - t0)
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        results[amp] = {"loss": loss.sum().item(), "grads": grads, "fwd_bwd_ms": 1e3 * statistics.median(times[3:])}
    g32, g16 = results["none"]["grads"], results["bf16"]["grads"]
    return {
        "model": "glasses-base-yolo11n", "imgsz": imgsz, "batch": batch,
        "loss_fp32": results["none"]["loss"], "loss_bf16": results["bf16"]["loss"],
        "loss_rel_err": abs(results["bf16"]["loss"] - results["none"]["loss"]) / abs(results["none"]["loss"]),
        "grad_cosine": torch.nn.functional.cosine_similarity(g32, g16, dim=0).item(),
        "grad_rel_err": ((g16 - g32).norm() / g32.norm()).item(),
        "fwd_bwd_ms_fp32": results["none"]["fwd_bwd_ms"], "fwd_bwd_ms_bf16": results["bf16"]["fwd_bwd_ms"],
    }  # fmt: skip


def checkpointing_check(device: torch.device, cfg: str = "yolo11s", imgsz: int = 640, batch: int = 16,
                        repeats: int = 10) -> dict:
    torch.manual_seed(0)
    imgs, targets = random_batch(batch, imgsz, device, 0)
    out = {"model": cfg, "imgsz": imgsz, "batch": batch}
    for label, parts in (("off", ()), ("all parts", ("backbone", "neck", "head"))):
        model = DetectionModel(cfg, nc=NC, imgsz=imgsz).to(device).train()
        model.set_gradient_checkpointing(parts)
        crit = v8DetectionLoss(model)

        def step():
            loss, _ = crit(model(imgs), targets)
            loss.sum().backward()
            return loss

        report = measure_memory(model, None, step)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        resting = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - resting
        times = []
        for _ in range(repeats + 2):
            model.zero_grad(set_to_none=True)
            t0 = sync()
            step()
            times.append(sync() - t0)
        out[label] = {"saved_activations_exact": report.activations, "peak_over_resting": peak,
                      "fwd_bwd_ms": 1e3 * statistics.median(times[2:])}
        del model, crit
        torch.cuda.empty_cache()
    out["activations_ratio"] = out["all parts"]["saved_activations_exact"] / out["off"]["saved_activations_exact"]
    out["peak_ratio"] = out["all parts"]["peak_over_resting"] / out["off"]["peak_over_resting"]
    out["time_ratio"] = out["all parts"]["fwd_bwd_ms"] / out["off"]["fwd_bwd_ms"]
    return out


def render(result: dict) -> str:
    """The markdown report of one run (docs/benchmarks/gpu.md)."""
    mib = 2**20
    lines = [
        f"command: `{result['command']}`  ",
        f"device: {result['device']}, torch {result['torch']} (CUDA {result['cuda']})",
        "",
        "### Optimizer step on CUDA (full fine-tuning, interleaved, medians)",
        "",
        "| model | px | batch | optimizer | `step()` ms | vs AdamW | whole step ms | vs AdamW | state MiB (exact / allocator) |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cell in result["optimizers"]:
        for name, m in cell["methods"].items():
            lines.append(
                f"| {cell['model']} | {cell['imgsz']} | {cell['batch']} | {name} | {m['step_ms']:.2f} | "
                f"{m['step_vs_adamw']:.2f}x | {m['whole_ms']:.2f} | {m['whole_vs_adamw']:.2f}x | "
                f"{m['state_bytes_exact'] / mib:.2f} / {m['state_bytes_allocated'] / mib:.2f} |"
            )
    if result["bf16"]:
        b = result["bf16"]
        lines += [
            "",
            f"### bf16 autocast vs fp32 ({b['model']}, {b['imgsz']} px, batch {b['batch']}, one batch)",
            "",
            "| loss fp32 | loss bf16 | loss rel. error | gradient cosine | gradient rel. error | fwd+bwd ms fp32 | fwd+bwd ms bf16 |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {b['loss_fp32']:.3f} | {b['loss_bf16']:.3f} | {b['loss_rel_err']:.1e} | {b['grad_cosine']:.4f} | "
            f"{b['grad_rel_err']:.3f} | {b['fwd_bwd_ms_fp32']:.1f} | {b['fwd_bwd_ms_bf16']:.1f} |",
        ]
    if result["checkpointing"]:
        c = result["checkpointing"]
        lines += [
            "",
            f"### Gradient checkpointing ({c['model']}, {c['imgsz']} px, batch {c['batch']})",
            "",
            "| checkpointing | saved activations, exact (MiB) | CUDA peak over resting (MiB) | fwd+bwd ms |",
            "| --- | ---: | ---: | ---: |",
        ]
        for label in ("off", "all parts"):
            r = c[label]
            lines.append(f"| {label} | {r['saved_activations_exact'] / mib:,.0f} | {r['peak_over_resting'] / mib:,.0f} | "
                         f"{r['fwd_bwd_ms']:.1f} |")
        lines.append(f"| ratio | {c['activations_ratio']:.2f}x | {c['peak_ratio']:.2f}x | {c['time_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", default="yolo11n:320:16,yolo11n:640:16,yolo11s:640:16",
                    help="model:imgsz:batch cells of the optimizer comparison")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per method and cell")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for gpu_check.json")
    ap.add_argument("--from-json", type=Path, default=None, help="print the markdown report of an earlier run, run nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        print(render(json.loads(args.from_json.read_text())), end="")
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; this benchmark only runs on a GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "optimizers": [], "bf16": None, "checkpointing": None}
    for cell in args.grid.split(","):
        cfg, imgsz, batch = cell.split(":")
        res = optimizer_cell(cfg, int(imgsz), int(batch), args.steps, args.warmup, device)
        result["optimizers"].append(res)
        for name, m in res["methods"].items():
            print(f"{cfg} {imgsz}px b{batch} {name:12s} step {m['step_ms']:7.2f} ms ({m['step_vs_adamw']:.2f}x)  "
                  f"whole {m['whole_ms']:7.2f} ms ({m['whole_vs_adamw']:.2f}x)  state {m['state_bytes_exact']/2**20:6.2f} MiB "
                  f"(allocator {m['state_bytes_allocated']/2**20:6.2f})", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    result["bf16"] = bf16_check(device)
    print("bf16:", json.dumps(result["bf16"]), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    result["checkpointing"] = checkpointing_check(device)
    print("checkpointing:", json.dumps(result["checkpointing"]), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
