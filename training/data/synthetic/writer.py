"""Write a rendered stream as an ultralytics-style YOLO dataset."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import yaml
from PIL import Image
from tqdm import tqdm

from models.errors import ConfigError
from training.data.synthetic.classes import CLASS_NAMES
from training.data.synthetic.generator import DOMAINS, Effects, render_sample

# training.data.yolo (write_data_yaml) imports torch through the dataset module; it is
# imported inside generate_dataset so that the CLI's --help stays fast.

IMAGE_FORMATS = ("png", "jpg")


def encode_image(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _existing_recipe(out: Path) -> dict | None:
    try:
        cfg = yaml.safe_load((out / "data.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return cfg.get("synthetic") if isinstance(cfg, dict) else None


def generate_dataset(
    out_dir: str | Path,
    domain: str = "source",
    n: int = 200,
    imgsz: int = 160,
    seed: int = 0,
    val_fraction: float = 0.2,
    *,
    image_format: str = "png",
    overwrite: bool = False,
    progress: bool = False,
    **effect_strengths: float,
) -> Path:
    """Render ``n`` frames of ``domain`` into ``out_dir`` in YOLO layout and return its ``data.yaml``.

    ``out_dir`` gets ``images/{train,val}/``, ``labels/{train,val}/`` and ``data.yaml``;
    the last ``round(n * val_fraction)`` frames form the validation split. Effect
    strengths (see :class:`Effects`) override the domain's defaults, e.g.
    ``generate_dataset(d, "egocentric", hands=0, jpeg=0.5)``. The dataset is written
    to a temporary folder next to ``out_dir`` and renamed into place when complete,
    so an interrupted run leaves nothing half-written. The same arguments give
    byte-identical files, so a folder already generated with the same arguments is
    returned as it is; any other non-empty folder needs ``overwrite=True``.
    """
    from training.data.yolo import write_data_yaml

    if domain not in DOMAINS:
        raise ConfigError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    if n < 1:
        raise ConfigError(f"n={n}: generate at least one image")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1)")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"image_format={image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    effects = Effects.for_domain(domain, **effect_strengths)
    recipe = {"domain": domain, "n": n, "imgsz": imgsz, "seed": seed, "val_fraction": val_fraction,
              "image_format": image_format, "effects": effects.to_dict()}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        if _existing_recipe(out) == recipe:
            return out / "data.yaml"  # already generated with these exact arguments: the files would be identical
        raise ConfigError(f"output folder {out} exists and is not empty; choose another folder or pass overwrite=True (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    n_val = int(round(n * val_fraction))
    n_train = n - n_val
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for split in ("train", "val"):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
        for i in tqdm(range(n), desc=f"synth {domain}", unit="img", disable=not progress):
            split = "train" if i < n_train else "val"
            sample = render_sample(i, seed=seed, domain=domain, imgsz=imgsz, effects=effects)
            stem = f"{domain}_{i:06d}"
            (tmp / "images" / split / f"{stem}.{image_format}").write_bytes(encode_image(sample.image, image_format))
            lines = sample.yolo_lines()
            (tmp / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        write_data_yaml(
            tmp / "data.yaml", root=out.resolve(), train="images/train", val="images/val", names=CLASS_NAMES,
            extra={"synthetic": recipe},
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "data.yaml"
