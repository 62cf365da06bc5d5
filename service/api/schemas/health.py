"""Bodies of ``/healthz`` and ``/readyz``."""

from __future__ import annotations

from pydantic import BaseModel


class HealthOut(BaseModel):
    status: str = "ok"
    job_workers_alive: int
    job_workers_configured: int


class ReadyOut(BaseModel):
    status: str = "ready"
    default_model: str
