"""``lowbit serve DIR [--tables URL] [--host H --port P --workers N]``: uvicorn with the factory
`lowbit.serve.app.app_from_env` in each worker; SIGTERM / SIGINT shut down gracefully (requests in
flight finish, within ``--graceful-s``)."""
from __future__ import annotations

import argparse
import json
import os

from .app import ENV_NAME, MAX_BODY_BYTES


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a saved CTR model over HTTP (POST /predict, GET /health, /metadata)")
    s.add_argument("dir", help="a served CTR model folder (lowbit.ctr.save_served)")
    s.add_argument("--tables", default=None,
                   help="rebind the tables: a folder holding them by name, or redis://host:port/db[?prefix=P]")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--workers", type=int, default=1, help="worker processes (each loads the model)")
    s.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    s.add_argument("--timeout-s", type=float, default=1.0, help="table store timeout per call (Redis)")
    s.add_argument("--max-body", type=int, default=MAX_BODY_BYTES, help="request size limit in bytes")
    s.add_argument("--graceful-s", type=float, default=10.0, help="shutdown waits this long for requests")
    s.add_argument("--log-level", default="info")
    s.set_defaults(serve_func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..ctr.served import load_served
    from .logs import log_config
    if args.workers < 1 or args.threads < 1:
        raise ValueError(f"--workers and --threads must be >= 1, found {args.workers} and {args.threads}")
    load_served(args.dir, args.tables, args.timeout_s)  # a bad folder or store fails here, once, plainly
    os.environ[ENV_NAME] = json.dumps({"dir": str(args.dir), "tables": args.tables, "threads": args.threads,
                                       "timeout_s": args.timeout_s, "max_body": args.max_body})
    uvicorn.run("lowbit.serve.app:app_from_env", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_config=log_config(args.log_level), access_log=False,
                timeout_graceful_shutdown=args.graceful_s)
    return 0
