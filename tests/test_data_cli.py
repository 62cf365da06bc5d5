"""``glasses-vision data``: synth writes a dataset, check counts problems, to-coco converts, errors are one line."""

from __future__ import annotations

import json

from service.cli import main
from training.data import build_dataset


def test_synth_check_and_to_coco(tmp_path, capsys):
    out = tmp_path / "ego"
    assert main(["data", "synth", "--domain", "egocentric", "--n", "5", "--imgsz", "64", "--seed", "1", "--out", str(out),
                 "--quiet", "--hands", "2", "--jpeg", "0"]) == 0
    assert "5 egocentric images (64px) ready" in capsys.readouterr().out
    data = out / "data.yaml"
    assert "hands: 2.0" in data.read_text() and "jpeg: 0.0" in data.read_text()
    assert len(build_dataset(data, "train", imgsz=64)) == 4

    assert main(["data", "check", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.rsplit("\n", 2)[0])
    assert report["train"]["images"] == 4 and report["val"]["images"] == 1 and report["train"]["skipped"] == 0

    (out / "labels/train/egocentric_000000.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    assert main(["data", "check", str(data)]) == 1
    text = capsys.readouterr().out
    assert "[train] images=3" in text and "skipped=1" in text and "egocentric_000000.txt line 1: class id 7" in text

    assert main(["data", "to-coco", str(data), "--split", "val", "--out", str(tmp_path / "val.json")]) == 0
    assert len(json.loads((tmp_path / "val.json").read_text())["images"]) == 1


def test_bad_arguments_give_one_line_errors(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--n", "2", "--tilt", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: effect strength tilt=5.0 must be") and len(err.strip().splitlines()) == 1
    assert main(["data", "check", str(tmp_path / "missing.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().out
