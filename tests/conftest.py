"""Shared test setup and every shared fixture: offline ultralytics, one thread, deterministic seeds, small generated data.

Plain helpers (models, batches, servers) live in ``tests/helpers/``; fixtures live here only.
Tests taking ~6 s or more (2 shared cores) carry ``@pytest.mark.slow``: the default run includes them; ``-m "not slow"`` skips them.
"""

from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tests also start subprocesses (uvicorn, job workers, gloo ranks); two threads per
# process oversubscribe the 2-core CI machine and run many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread for every test, restored afterwards: with 2 threads, a busy shared CPU makes
    OpenMP workers spin and the same small-model test runs 10x slower (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- data ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def source_yaml(tmp_path_factory) -> Path:
    """A 12-image source-domain YOLO dataset at 96 px (10 train, 2 val)."""
    from training.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synth") / "source", "source", n=12, imgsz=96, seed=3, val_fraction=0.2)


@pytest.fixture(scope="session")
def ego_yaml(tmp_path_factory) -> Path:
    """A 10-image egocentric YOLO dataset at 96 px."""
    from training.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("synth") / "ego", "egocentric", n=10, imgsz=96, seed=4, val_fraction=0.2)


# --- export / runtime ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def export_model():
    """``tests.helpers.models.firing_model()``: an untrained detector that gives plenty of boxes."""
    from tests.helpers.models import firing_model

    return firing_model()


@pytest.fixture(scope="session")
def exported(tmp_path_factory, export_model):
    """``(model, ExportResult)`` of the fp32 export (verified by export_onnx itself)."""
    from export import export_onnx

    out = tmp_path_factory.mktemp("export") / "model.onnx"
    return export_model, export_onnx(export_model, out)


@pytest.fixture(scope="session")
def export_dataset(tmp_path_factory) -> Path:
    """A 10-frame egocentric dataset at the export tests' input size."""
    from tests.helpers.models import IMGSZ
    from training.data.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("exds"), domain="egocentric", n=10, imgsz=IMGSZ, seed=0)


# --- service ------------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty service home directory."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def client(home: Path):
    """A ready TestClient on a service in ``home`` (dummy default model, FakeDetector)."""
    from tests.helpers.service import make_client, wait_for

    with make_client(home) as c:
        wait_for(lambda: c.get("/readyz").status_code == 200, 10, what="readyz")
        yield c
