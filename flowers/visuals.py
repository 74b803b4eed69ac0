"""Pictures for trackers, drawn with Pillow only (no plotting library needed)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 44
MARGIN = 90  # room for the class names at the left and the top


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def confusion_matrix_image(matrix: np.ndarray, class_names: list[str], title: str = "") -> Image.Image:
    """Rows: true class, columns: predicted class; cell shade = fraction of the row."""
    n = len(class_names)
    size = MARGIN + n * CELL + 10
    image = Image.new("RGB", (size, size + 20), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((4, 2), f"{title}  (rows: true, columns: predicted)".strip(), fill="black", font=font)
    row_totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    top = MARGIN + 20
    for i in range(n):
        draw.text((4, top + i * CELL + CELL // 2 - 6), class_names[i][:12], fill="black", font=font)
        draw.text((MARGIN + i * CELL + 2, top - 16), class_names[i][:7], fill="black", font=font)
        for j in range(n):
            shade = int(255 * (1 - matrix[i, j] / row_totals[i, 0]))
            box = (MARGIN + j * CELL, top + i * CELL, MARGIN + (j + 1) * CELL - 1, top + (i + 1) * CELL - 1)
            draw.rectangle(box, fill=(shade, shade, 255), outline="grey")
            draw.text((box[0] + 6, box[1] + CELL // 2 - 6), str(matrix[i, j]),
                      fill="white" if shade < 128 else "black", font=font)
    return image
