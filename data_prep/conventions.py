"""Constants shared by every ``data_prep`` module, defined here once.

Import them from here (``pipelines`` too); ``data_prep`` imports nothing else in this file,
so any module can use it without import cycles.
"""

from __future__ import annotations

# The ignore label everywhere: every reader maps its dataset's own convention to it.
IGNORE_INDEX = 255

# Source image files the readers accept (compared lower-case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
# ADE20K and COCO-Stuff ship JPEGs; PNG copies of them are accepted too.
JPEG_OR_PNG_SUFFIXES = (".jpg", ".jpeg", ".png")

# Members of a sample inside a shard: ``<key>.png`` or ``<key>.jpg`` (PNG sources stay
# PNG, every other format is stored as JPEG) and ``<key>.label.png`` (uint8 train ids).
SHARD_IMAGE_EXTS = ("png", "jpg")
SHARD_LABEL_EXT = "label.png"
