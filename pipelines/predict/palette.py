"""Colours of the colour masks: 256 RGB entries, class id -> colour, 255 (none) = black.

Datasets with a published colour convention keep it: LoveDA (its official palette, as in
the LoveDA repository and MMSegmentation) and Cityscapes (the ``color`` of each train id in
``cityscapesscripts``). Every other case (ADE20K, COCO-Stuff, folder datasets, or an
unknown dataset) uses the fixed palette: the PASCAL VOC colour map shifted by one, so that
class ``c`` gets VOC colour ``c + 1`` (never black) and black stays free for 255. It is a
pure function of the class id: the same colours on every machine and every run.
"""

from __future__ import annotations

import numpy as np

NONE_COLOUR = (0, 0, 0)

LOVEDA = ((255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255), (159, 129, 183),
          (0, 255, 0), (255, 195, 128))


def voc_colour(i: int) -> tuple[int, int, int]:
    """Colour ``i`` of the PASCAL VOC colour map (bits of ``i`` spread over R, G, B)."""
    r = g = b = 0
    for j in range(8):
        r |= ((i >> 0) & 1) << (7 - j)
        g |= ((i >> 1) & 1) << (7 - j)
        b |= ((i >> 2) & 1) << (7 - j)
        i >>= 3
    return r, g, b


def fixed_palette() -> np.ndarray:
    pal = np.array([voc_colour(c + 1) for c in range(256)], dtype=np.uint8)
    pal[255] = NONE_COLOUR
    return pal


def _cityscapes() -> tuple[tuple[int, int, int], ...]:
    from cityscapesscripts.helpers.labels import labels

    colours = {lab.trainId: tuple(lab.color) for lab in labels if 0 <= lab.trainId < 19}
    return tuple(colours[t] for t in range(19))


def dataset_colours(name: str) -> tuple[tuple[int, int, int], ...] | None:
    """The published colours of dataset ``name`` in train-id order, or None."""
    if name == "loveda":
        return LOVEDA
    if name == "cityscapes":
        return _cityscapes()
    return None


def palette_for(dataset: str | None, num_classes: int) -> tuple[np.ndarray, str]:
    """(palette (256, 3) uint8, which one: the dataset's name or "fixed").

    A dataset's colours are used only when they cover the model's classes exactly; a
    model with another class count was not trained on that dataset's class list.
    """
    pal = fixed_palette()
    colours = dataset_colours(dataset) if dataset else None
    if colours is None or len(colours) != num_classes:
        return pal, "fixed"
    pal[: len(colours)] = np.asarray(colours, dtype=np.uint8)
    return pal, str(dataset)
