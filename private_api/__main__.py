"""`python -m private_api --host H --port P`: upgrade the database, then serve."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from inference_server.serving import serve
from inference_server.settings import refuse_to_start
from private_api.config import PrivateSettings
from private_api.db import upgrade_database
from private_api.main import create_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m private_api", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)

    try:
        settings = PrivateSettings()
    except ValidationError as exc:
        # Most often IS_SERVICE_TOKEN missing or too short.
        return refuse_to_start("private_api", exc)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    upgrade_database(settings.database_url)
    serve(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
