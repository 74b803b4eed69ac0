"""Fine-tune a torchvision classifier (ResNet18 unless --arch says otherwise) on a folder of photos.

    accelerate launch train.py --lr 1e-3 --epochs 25 [--data PATH] [--config FILE]
"""

from flowers.cli import run
from flowers.config import TrainConfig, parse


def main() -> None:
    from flowers.training import fit  # heavy imports after argument parsing: --help stays fast

    fit(parse(TrainConfig, description=__doc__))


if __name__ == "__main__":
    run(main)
