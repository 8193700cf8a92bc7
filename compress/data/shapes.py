"""The classes of the synthetic dataset (kept apart so the CLI can name them without importing OpenCV)."""

SHAPES = ("disc", "square", "triangle", "ring", "cross")
