"""Run a command's main function: user mistakes become one line and exit code 2."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

from flowers.errors import UserError

# A mistake every process makes (a bad flag) should be said once, by rank 0; one only another
# rank hits (its share of the data) must still be shown. Other ranks wait this long before
# printing: when rank 0 fails too, the launcher (torchrun / accelerate launch) ends them first.
OTHER_RANK_DELAY_S = 2.0


def run(main: Callable[[], object]) -> None:
    try:
        main()
    except UserError as e:
        rank = os.environ.get("RANK", "0")
        if rank != "0":
            time.sleep(OTHER_RANK_DELAY_S)
        print(f"error: {e}" if rank == "0" else f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
