"""The reference report's recipe as a plain PyTorch script, to compare our pipeline against.

torchvision ImageFolder + random 80/20 split + DataLoader with 2 workers + the report's
augmentations (v1 transforms on PIL images) + ResNet18 + Adam + StepLR, the usual tutorial loop
(loss.item() every step). No channels_last, no caching. Trains one epoch and prints one JSON line:

    python bench/plain_recipe.py --data /path/to/flower_dataset --image-size 128 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms
from torchvision.models import resnet18


def build_loader(data: str, image_size: int, batch_size: int, workers: int) -> DataLoader:
    augment = transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(15),
        transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05),
        transforms.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.9, 1.1)),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    images = datasets.ImageFolder(data, transform=augment)
    val_size = int(0.2 * len(images))
    train_set, _ = random_split(images, [len(images) - val_size, val_size],
                                generator=torch.Generator().manual_seed(42))
    return DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=workers)


def train_one_epoch(data: str, image_size: int, batch_size: int, workers: int, max_steps: int = 0) -> dict:
    """One epoch (or `max_steps`); images/s counted from the end of the first step (worker start-up excluded)."""
    start = time.perf_counter()
    loader = build_loader(data, image_size, batch_size, workers)
    model = resnet18(num_classes=len(loader.dataset.dataset.classes))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    model.train()
    running_loss, running_corrects, seen = 0.0, 0, 0
    first_step_end, images_after_first = None, 0
    for inputs, labels in loader:
        optimizer.zero_grad()
        outputs = model(inputs)
        _, preds = torch.max(outputs, 1)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item() * inputs.size(0)
        running_corrects += int(torch.sum(preds == labels.data))
        seen += inputs.size(0)
        if first_step_end is None:
            first_step_end = time.perf_counter()
        else:
            images_after_first += inputs.size(0)
        if max_steps and seen >= max_steps * batch_size:
            break
    scheduler.step()
    seconds = time.perf_counter() - first_step_end
    return {"train_images_per_s": images_after_first / seconds, "images_after_first": images_after_first,
            "seconds_after_first": seconds, "first_step_s": first_step_end - start,
            "loss": running_loss / seen, "accuracy": running_corrects / seen, "images": seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=0, help="stop the epoch after this many steps")
    args = parser.parse_args()
    print(json.dumps(train_one_epoch(args.data, args.image_size, args.batch_size, args.workers, args.max_steps)))


if __name__ == "__main__":
    main()
