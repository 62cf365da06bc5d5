"""Deprecated alias of ``tests.helpers.recipe``, kept only for tests/test_recipe_replay.py (owned elsewhere);
delete once that file imports ``from tests.helpers.recipe import tiny_config, tiny_dataset``."""

from tests.helpers.recipe import ddp_worker, tiny_config, tiny_dataset  # noqa: F401
