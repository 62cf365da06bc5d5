"""COCO detection json (``images``, ``annotations`` with pixel ``[x, y, w, h]``, ``categories``): read and write.

Category ids may be any integers; they map to contiguous class indices in
ascending id order, and ``names`` follow that order. ``file_name`` is looked up
relative to ``image_root`` (default: the json's folder, then its ``images/``
subfolder). Crowd annotations (``iscrowd=1``) are left out, as in COCO training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import DataError
from models.io import atomic_write_json
from models.images import pil_open, upright_size
from training.data.dataset import DataProblem, DetectionDataset, Record, check_image


def _find_image(name: str, roots: list[Path]) -> Path:
    for root in roots:
        p = root / name
        if p.is_file():
            return p
    return roots[0] / name


class CocoDataset(DetectionDataset):
    """A COCO json split behind the common interface; bad entries are errors or counted skips like YOLO's."""

    def __init__(self, json_path: str | Path, imgsz: int = 320, augment=False, *, strict: bool = True,
                 check_images: bool = True, image_root: str | Path | None = None):
        json_path = Path(json_path)
        if not json_path.is_file():
            raise DataError(f"COCO file {json_path} does not exist")
        try:
            doc = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{json_path} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or not all(k in doc for k in ("images", "annotations", "categories")):
            raise DataError(f"{json_path} is not a COCO detection file: it needs 'images', 'annotations' and 'categories'")
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        cat_index = {c["id"]: i for i, c in enumerate(cats)}
        names = [str(c["name"]) for c in cats]
        roots = [Path(image_root)] if image_root else [json_path.parent, json_path.parent / "images"]
        by_image: dict = {im["id"]: [] for im in doc["images"]}
        problems: list[DataProblem] = []
        where = str(json_path)
        for ann in doc["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            if ann.get("image_id") not in by_image:
                problems.append(DataProblem(where, 0, f"annotation {ann.get('id')} refers to unknown image_id {ann.get('image_id')}"))
                continue
            by_image[ann["image_id"]].append(ann)
        records = []
        for im in doc["images"]:
            found: list[DataProblem] = []
            im_file = _find_image(str(im["file_name"]), roots)
            if not im_file.is_file():
                found.append(DataProblem(str(im_file), 0, "image file is missing"))
            elif check_images and (bad := check_image(im_file)) is not None:
                found.append(bad)
            W, H = float(im.get("width") or 0), float(im.get("height") or 0)
            if (not W or not H) and not found:  # sizes are optional in some exports: read the header
                try:
                    with pil_open(im_file) as pil:  # as shown: boxes are in the EXIF-upright frame
                        W, H = (float(v) for v in upright_size(pil))
                except (OSError, SyntaxError, ValueError) as exc:
                    found.append(DataProblem(str(im_file), 0, f"image cannot be decoded ({exc}); replace or remove it"))
            cls, boxes = [], []
            for ann in by_image[im["id"]]:
                tag = f"annotation {ann.get('id')} (image {im['file_name']})"
                if ann.get("category_id") not in cat_index:
                    found.append(DataProblem(where, 0, f"{tag}: category_id {ann.get('category_id')} is not in 'categories' (nc={len(names)})"))
                    continue
                b = ann.get("bbox")
                if not isinstance(b, (list, tuple)) or len(b) != 4:
                    found.append(DataProblem(where, 0, f"{tag}: bbox must be [x, y, w, h], got {b!r}"))
                    continue
                x, y, w, h = (float(v) for v in b)
                if w <= 0 or h <= 0 or x < 0 or y < 0 or (W and x + w > W + 1e-3) or (H and y + h > H + 1e-3):
                    found.append(DataProblem(where, 0, f"{tag}: bbox {b} is empty or outside the {W:g}x{H:g} image"))
                    continue
                cls.append(cat_index[ann["category_id"]])
                boxes.append([x, y, w, h])
            if found:
                if strict:
                    raise DataError(f"{found[0]} (pass strict=False / use 'glasses-vision data check' to skip and list bad files)")
                problems += found
                continue
            records.append(Record(im_file, np.asarray(cls, np.int64), np.asarray(boxes, np.float32).reshape(-1, 4),
                                  normalized=False, meta={"width": W, "height": H, "id": im["id"]}))
        super().__init__(records, names, imgsz, augment, problems, str(json_path))


def write_coco(dataset: DetectionDataset, out: str | Path, *, image_root: str | Path | None = None) -> Path:
    """Write ``dataset``'s labels as a COCO json (``file_name`` relative to ``image_root``, default the json's folder)."""
    out = Path(out)
    root = Path(image_root) if image_root else out.parent
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for i, r in enumerate(dataset.records):
        with pil_open(r.im_file) as im:
            w, h = upright_size(im)  # the frame the boxes are in
        try:
            name = str(Path(r.im_file).resolve().relative_to(root.resolve()))
        except ValueError:
            name = str(Path(r.im_file).resolve())
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for c, (x0, y0, x1, y1) in zip(r.cls, dataset.to_pixels(r, h, w)):
            bw, bh = float(x1 - x0), float(y1 - y0)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                         "bbox": [float(x0), float(y0), bw, bh], "area": bw * bh, "iscrowd": 0})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(dataset.names)]
    return atomic_write_json(out, {"images": images, "annotations": anns, "categories": cats})
