"""The `pagellm` logger: INFO to stderr by default, level from $PAGELLM_LOGGING_LEVEL."""

from __future__ import annotations

import logging
import os
import sys


def init_logging() -> None:
    root = logging.getLogger("pagellm")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(os.environ.get("PAGELLM_LOGGING_LEVEL", "INFO").upper())
    root.propagate = False
