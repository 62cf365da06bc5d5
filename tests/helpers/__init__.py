"""Plain helpers shared by the tests (models, batches, datasets, servers); fixtures live in tests/conftest.py.

One module per area: ``models`` (every test model), ``peft``, ``optim``, ``export``, ``data``, ``recipe``, ``service``.
"""
