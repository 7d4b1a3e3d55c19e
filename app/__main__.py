"""`python -m app --host H --port P`: run the API with uvicorn, after the checks that need the bind address.

With no API keys configured (UPLVP_API_KEYS empty) anyone who reaches the port may train and
delete models, so the API then refuses to listen on anything but loopback.
"""

from __future__ import annotations

import argparse
import sys

from app.core.config import get_settings
from app.core.security import LOOPBACK


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = p.parse_args(argv)
    settings = get_settings()
    if args.host not in LOOPBACK and not settings.api_keys.get_secret_value():
        print(f"refusing to listen on {args.host}: no API keys are configured, so anyone could train and delete "
              "models. Set UPLVP_API_KEYS (comma-separated keys; KEY:read for read-only) or use --host 127.0.0.1.",
              file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                proxy_headers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
