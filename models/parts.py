"""The parts of a detector, torch-free (the HTTP service checks part names without importing torch)."""

from __future__ import annotations

#: A DetectionModel's layers fall into these parts, in this order (``DetectionModel.part_of``).
PARTS = ("backbone", "neck", "head")
