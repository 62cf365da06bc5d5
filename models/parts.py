"""The parts of a detector, torch-free (the HTTP service checks part names without importing torch)."""

from __future__ import annotations

#: A DetectionModel's layers fall into these parts, in this order (``DetectionModel.part_of``).
PARTS = ("backbone", "neck", "head")
#: Which layers of the checkpointed parts recompute in backward (``DetectionModel.set_gradient_checkpointing``):
#: ``all`` of them, or ``high_res``, the layers at output stride <= 8, which hold most of the activation bytes.
CHECKPOINT_POLICIES = ("all", "high_res")
