"""`python -m public_api --host H --port P`: serve the public API with uvicorn."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from inference_server.serving import serve
from inference_server.settings import refuse_to_start
from public_api.config import PublicSettings
from public_api.main import create_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m public_api", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        settings = PublicSettings()
    except ValidationError as exc:
        return refuse_to_start("public_api", exc)
    serve(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
