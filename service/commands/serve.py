"""``glasses-vision serve``: start the HTTP service (uvicorn) with its job workers.

With no arguments it serves the shipped base model on 127.0.0.1:8000; the model
is exported to ONNX on first start and cached under the home folder.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=__doc__)
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 8000)")
    parser.add_argument("--home", default=None,
                        help="folder for models, jobs and the job database (default $GLASSES_VISION_HOME or ~/.glasses-vision)")
    parser.add_argument("--workers", type=int, default=None,
                        help="job worker processes; each runs one fine-tuning job at a time (default 1, 0: no jobs run)")
    parser.add_argument("--data-root", default=None, help="dataset paths of jobs must lie under it (default <home>/data)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from service.core.config import Settings
    from service.main import create_app

    settings = Settings.from_env(
        host=args.host, port=args.port, home=args.home, job_workers=args.workers, data_root=args.data_root
    )
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(settings)
    key_note = "the keys in GLASSES_VISION_API_KEYS" if settings.api_keys else f"the key in {settings.api_key_file}"
    print(f"glasses-vision: serving on http://{settings.host}:{settings.port} (home {settings.home}); "
          f"jobs and model changes need {key_note} in the X-API-Key header", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    return 0
