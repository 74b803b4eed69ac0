"""Run a command's main function: user mistakes become one line and exit code 2."""

from __future__ import annotations

import os
import sys
from typing import Callable

from flowers.errors import UserError


def run(main: Callable[[], object]) -> None:
    try:
        main()
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank hits the same mistake; say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
