"""API keys: where they come from and how a presented key is checked."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from models.io import atomic_write_text
from service.core.config import Settings

API_KEY_HEADER = "X-API-Key"


def load_api_keys(settings: Settings) -> list[str]:
    """The configured keys, or the one in ``<home>/api_key`` (generated, mode 0600, on first use)."""
    if settings.api_keys:
        return list(settings.api_keys)
    path = settings.api_key_file
    if path.is_file():
        key = path.read_text().strip()
        if key:
            return [key]
    key = secrets.token_urlsafe(32)
    write_private(path, key + "\n")
    return [key]


def prepare_home(settings: Settings) -> None:
    """Create the home folder readable by its owner only (0700); tighten it if it exists."""
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if settings.home.stat().st_mode & 0o077:
        os.chmod(settings.home, 0o700)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically to a file that is mode 0600 from its first byte (never readable by others)."""
    atomic_write_text(path, text, private=True)


def key_is_valid(presented: str | None, keys: list[str]) -> bool:
    """Constant-time comparison against every accepted key."""
    if not presented:
        return False
    given = presented.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    return ok
