"""Dataset paths stay inside the data root; uploaded zips are checked before anything is extracted."""

from __future__ import annotations

import os

import pytest
import yaml

from models.errors import DataError
from service.core.errors import PayloadTooLargeError, UnsupportedMediaError
from service.jobs.datasets import extract_dataset_zip, resolve_dataset_path
from tests.helpers.service import yolo_zip, zip_bytes


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "data"
    (root / "kitchen" / "images").mkdir(parents=True)
    (root / "kitchen" / "data.yaml").write_text("train: images\nval: images\nnames: [cup]\n")
    return root


def test_relative_dir_and_file_resolve_to_data_yaml(root):
    assert resolve_dataset_path(root, "kitchen") == (root / "kitchen" / "data.yaml").resolve()
    assert resolve_dataset_path(root, "kitchen/data.yaml") == (root / "kitchen" / "data.yaml").resolve()
    assert resolve_dataset_path(root, str(root / "kitchen")) == (root / "kitchen" / "data.yaml").resolve()


@pytest.mark.parametrize("bad, message", [
    ("../etc/passwd", "'..'"),
    ("kitchen/../../x", "'..'"),
    ("/etc", "outside the data root"),
    ("missing/data.yaml", "does not exist"),
    ("", "empty"),
])
def test_paths_outside_or_missing_are_refused(root, bad, message):
    with pytest.raises(DataError, match=message):
        resolve_dataset_path(root, bad)


def test_symlink_out_of_the_root_is_refused(root, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "data.yaml").write_text("train: .\nval: .\nnames: [x]\n")
    os.symlink(outside, root / "link")
    with pytest.raises(DataError, match="leads outside"):
        resolve_dataset_path(root, "link")


def test_data_yaml_pointing_outside_is_refused(root):
    (root / "evil").mkdir()
    (root / "evil" / "data.yaml").write_text("path: /etc\ntrain: .\nval: .\nnames: [x]\n")
    with pytest.raises(DataError, match="'path' points outside"):
        resolve_dataset_path(root, "evil")
    (root / "evil" / "data.yaml").write_text("train: ../../outside\nval: images\nnames: [x]\n")
    with pytest.raises(DataError, match="'train' points outside"):
        resolve_dataset_path(root, "evil")


def test_good_zip_extracts_and_rebases(tmp_path):
    src = tmp_path / "ds.zip"
    src.write_bytes(yolo_zip(prefix="ds/"))
    data_yaml = extract_dataset_zip(src, tmp_path / "out", max_total_bytes=10**7, max_entries=100)
    assert data_yaml == tmp_path / "out" / "ds" / "data.yaml"
    cfg = yaml.safe_load(data_yaml.read_text())
    assert cfg["path"] == str((tmp_path / "out" / "ds").resolve())
    assert (tmp_path / "out" / "ds" / "images" / "train" / "0.png").is_file()


@pytest.mark.parametrize("entries, symlinks, error, message", [
    ({"../evil.txt": b"x", "data.yaml": b"train: .\nval: .\nnames: [a]\n"}, None, DataError, "outside the archive"),
    ({"/abs.txt": b"x", "data.yaml": b"train: .\nval: .\nnames: [a]\n"}, None, DataError, "outside the archive"),
    ({"data.yaml": b"train: .\nval: .\nnames: [a]\n"}, {"link": "/etc/passwd"}, DataError, "symlink"),
    ({"images/a.png": b"x"}, None, DataError, "no data.yaml"),
    ({"data.yaml": b"train: ../../x\nval: .\nnames: [a]\n"}, None, DataError, "'train' points outside"),
])
def test_bad_zips_are_refused_and_leave_nothing(tmp_path, entries, symlinks, error, message):
    src = tmp_path / "bad.zip"
    src.write_bytes(zip_bytes(entries, symlinks))
    with pytest.raises(error, match=message):
        extract_dataset_zip(src, tmp_path / "out", max_total_bytes=10**6, max_entries=100)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.zip"]


def test_zip_size_and_count_limits(tmp_path):
    src = tmp_path / "big.zip"
    src.write_bytes(zip_bytes({"data.yaml": b"names: [a]\n", "zeros.bin": b"\0" * 200_000}))
    with pytest.raises(PayloadTooLargeError, match="unpacks to"):
        extract_dataset_zip(src, tmp_path / "out", max_total_bytes=100_000, max_entries=100)
    with pytest.raises(PayloadTooLargeError, match="entries"):
        extract_dataset_zip(src, tmp_path / "out", max_total_bytes=10**7, max_entries=1)
    not_zip = tmp_path / "x.zip"
    not_zip.write_bytes(b"this is not a zip")
    with pytest.raises(UnsupportedMediaError, match="not a zip"):
        extract_dataset_zip(not_zip, tmp_path / "out", max_total_bytes=10**7, max_entries=10)


def test_corrupt_zip_entry_is_a_clear_error(tmp_path):
    import zipfile

    src = tmp_path / "c.zip"
    with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data.yaml", b"names: [a]\n")
        zf.writestr("blob.bin", bytes(range(256)) * 400)
    raw = bytearray(src.read_bytes())
    start = raw.index(b"blob.bin") + len(b"blob.bin") + 10  # inside blob.bin's compressed data
    raw[start : start + 40] = b"\xff" * 40
    src.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt"):
        extract_dataset_zip(src, tmp_path / "out", max_total_bytes=10**7, max_entries=10)
    assert not (tmp_path / "out").exists()
