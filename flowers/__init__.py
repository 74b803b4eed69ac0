"""flowers: fine-tune a torchvision classifier (ResNet18 by default) on a folder of flower photos with Accelerate."""

__version__ = "0.1.0"
