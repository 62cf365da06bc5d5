"""Fine-tuning jobs: the SQLite store, the worker process that runs them, dataset safety."""
