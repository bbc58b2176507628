"""What ``step predict`` writes, under ``--out`` (local or ``s3://``)::

    masks/<name>.png        class id per pixel, uint8 (255 = none), the input's size
    color/<name>.png        the same, RGB, with the palette (:mod:`pipelines.predict.palette`)
    levels/<name>.png       --token-maps: superpatch side per 16x16 cell (1, 2, 4, 8, 16), uint8
    exit_depth/<name>.png   --token-maps: blocks the cell's token ran through (uint8)
    token_maps/<name>.png   --token-maps: image | levels | exit depth, over the image, small
    summary.json            the run's figures and every image's (see the runner)

The cell maps have one pixel per 16 x 16 cell of the input padded to a multiple of 16
(cell (i, j) covers pixels 16i..16i+15, 16j..16j+15), so they stay exact and tiny.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

from data_prep import storage

# one colour per superpatch side 1, 2, 4, 8, 16 (viridis, as the pipeline's report)
LEVEL_COLOURS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98),
                          (253, 231, 37)], dtype=np.float32)
# magma anchors: shallow (halted early) is dark, the full depth is light
DEPTH_ANCHORS = np.array([(0, 0, 4), (81, 18, 124), (183, 55, 121), (252, 137, 97),
                          (252, 253, 191)], dtype=np.float32)
VISUAL_SIDE = 256  # long side of each panel of the token-map visual


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # level 3: masks compress almost as well as at 6, at a fraction of the time
    Image.fromarray(array).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def output_paths(name: str, token_maps: bool) -> dict[str, str]:
    kinds = ("masks", "color") + (("levels", "exit_depth", "token_maps") if token_maps else ())
    return {k: f"{k}/{name}.png" for k in kinds}


def _upsample(cells: np.ndarray, h: int, w: int) -> np.ndarray:
    """Cell map (gh, gw, ...) -> pixels (h, w, ...): 16 x 16 per cell, cropped to the image."""
    return cells.repeat(16, 0).repeat(16, 1)[:h, :w]


def _ramp(values: np.ndarray, top: float) -> np.ndarray:
    t = np.clip(values / max(top, 1e-9), 0, 1) * (len(DEPTH_ANCHORS) - 1)
    lo = np.floor(t).astype(int).clip(0, len(DEPTH_ANCHORS) - 2)
    f = (t - lo)[..., None]
    return DEPTH_ANCHORS[lo] * (1 - f) + DEPTH_ANCHORS[lo + 1] * f


def token_visual(image: np.ndarray, level: np.ndarray, depth: np.ndarray,
                 max_depth: int) -> np.ndarray:
    """Image | superpatch level | exit depth (both blended over the image), side by side,
    each panel at most VISUAL_SIDE pixels on its long side."""
    h, w = image.shape[:2]
    scale = min(1.0, VISUAL_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR),
                       dtype=np.float32)
    panels = [small]
    level_idx = np.log2(np.maximum(level, 1)).round().astype(int).clip(0, 4)
    for colours in (LEVEL_COLOURS[level_idx], _ramp(depth.astype(np.float32), max_depth)):
        full = _upsample(colours.astype(np.uint8), h, w)
        over = np.asarray(Image.fromarray(full).resize(size, Image.Resampling.NEAREST),
                          dtype=np.float32)
        panels.append(0.45 * small + 0.55 * over)
    gap = np.full((size[1], 4, 3), 255, dtype=np.float32)
    row = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    return row.round().clip(0, 255).astype(np.uint8)


def write_outputs(out: str, name: str, image: np.ndarray, mask: np.ndarray,
                  palette: np.ndarray, cells: dict[str, Any] | None) -> dict[str, str]:
    """Write one image's files; returns {kind: path relative to ``out``}.

    ``cells`` (with --token-maps): {"level": (gh, gw), "depth": (gh, gw), "max_depth": int}.
    """
    paths = output_paths(name, cells is not None)
    storage.write_bytes(storage.join(out, paths["masks"]), png(mask))
    storage.write_bytes(storage.join(out, paths["color"]), png(palette[mask]))
    if cells is not None:
        level = np.asarray(cells["level"]).astype(np.uint8)
        depth = np.asarray(cells["depth"]).astype(np.uint8)
        storage.write_bytes(storage.join(out, paths["levels"]), png(level))
        storage.write_bytes(storage.join(out, paths["exit_depth"]), png(depth))
        storage.write_bytes(storage.join(out, paths["token_maps"]),
                            png(token_visual(image, level, depth, int(cells["max_depth"]))))
    return paths


def write_summary(out: str, summary: dict[str, Any]) -> str:
    uri = storage.join(out, "summary.json")
    storage.write_bytes(uri, json.dumps(summary, indent=1, default=str).encode() + b"\n")
    return uri
