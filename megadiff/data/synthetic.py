"""Synthetic image-caption pairs (coloured shapes) for the embedded demo and the tests."""
from __future__ import annotations

import random
from collections.abc import Iterator

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
           "yellow": (235, 210, 40), "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("square", "circle")


def shape_samples(n: int, size: int = 64, seed: int = 0) -> Iterator[tuple[Image.Image, str]]:
    rng = random.Random(seed)
    names = list(COLOURS)
    for _ in range(n):
        fg, bg = rng.sample(names, 2)
        shape = rng.choice(SHAPES)
        img = Image.new("RGB", (size, size), COLOURS[bg])
        r = rng.randint(size // 6, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        draw = ImageDraw.Draw(img)
        box = (cx - r, cy - r, cx + r, cy + r)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[fg])
        yield img, f"a {fg} {shape} on a {bg} background"
