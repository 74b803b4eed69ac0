"""Evaluate a checkpoint on its validation split (or on another folder with --data).

    python eval.py --ckpt best
"""

from flowers.cli import run
from flowers.config import EvalConfig, parse


def main() -> None:
    from flowers.evaluation import run_eval

    run_eval(parse(EvalConfig, description=__doc__))


if __name__ == "__main__":
    run(main)
