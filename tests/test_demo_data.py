"""The README's demo runs from a fresh clone: its data ships inside the repository."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _paths(node, trail=""):
    """(dotted key, string value) of every string in a loaded YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, f"{trail}.{k}" if trail else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, f"{trail}[{i}]")
    elif isinstance(node, str):
        yield trail, node


def test_demo_config_references_nothing_outside_the_repository() -> None:
    text = DEMO.read_text()
    assert "../" not in text and "shared/" not in text
    cfg = yaml.safe_load(text)
    paths = {k: v for k, v in _paths(cfg)
             if "/" in v and "://" not in v and "=" not in v and " " not in v}  # not overrides, URIs, prose
    assert {"data.src", "policy.config", "step.config", "storage"} <= paths.keys()
    for key, value in paths.items():
        assert not Path(value).is_absolute(), f"{key}: {value}"
        resolved = (REPO / value).resolve()  # relative to the repo root, where it is run
        assert resolved.is_relative_to(REPO), f"{key}: {value} leaves the repository"
        if key != "storage":  # the one output; every input is in the repository
            assert resolved.exists(), f"{key}: {value} does not exist in the repository"


def test_demo_data_ships_images_labels_and_licence() -> None:
    src = REPO / yaml.safe_load(DEMO.read_text())["data"]["src"]
    assert src.resolve().is_relative_to(REPO)
    images = sorted(p.name for p in (src / "img_dir").glob("*.png"))
    labels = sorted(p.name for p in (src / "ann_dir").glob("*.png"))
    assert images == labels == ["0.png", "1.png", "2.png"]
    for name in images:
        image, label = Image.open(src / "img_dir" / name), Image.open(src / "ann_dir" / name)
        assert image.size == label.size == (1024, 1024)
        assert image.mode == "RGB" and label.mode in ("L", "P")
    # small enough to live in git, and exactly the files the README's checksums name
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert total < 8_000_000
    readme = (src / "README.md").read_text()
    for sub in ("img_dir", "ann_dir"):
        for name in images:
            digest = hashlib.sha256((src / sub / name).read_bytes()).hexdigest()
            assert f"{digest}  {sub}/{name}" in readme
    licence = (src / "LICENSE").read_text()
    assert "CC BY-NC-SA 4.0" in licence and "CC BY-NC-SA 4.0" in readme
    assert "Wang" in readme and "NeurIPS" in readme and "MMSegmentation" in readme
