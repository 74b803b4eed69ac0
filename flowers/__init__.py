"""flowers: fine-tune ResNet18 on a folder of flower photos with Accelerate."""

__version__ = "0.1.0"
