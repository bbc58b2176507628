"""Superpatch selection: oracle on real LoveDA scenes against a brute-force quadtree, the
policy ground truth, threshold and budget modes, and the supertoken embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from step_model import policy_targets
from step_model.selection import build_layout, select_by_budget, select_by_threshold

from helpers import loveda_pairs, tiny


def brute_force_quadtree_tokens(label: np.ndarray, purity: float = 1.0) -> int:
    """Independent reference: walk windows coarse to fine with plain loops and np.unique."""
    gh, gw = label.shape[0] // 16, label.shape[1] // 16
    taken = np.zeros((gh, gw), dtype=bool)
    windows = 0
    for s in (16, 8, 4, 2):
        for i in range(gh // s):
            for j in range(gw // s):
                if taken[i * s:(i + 1) * s, j * s:(j + 1) * s].any():
                    continue
                px = label[i * s * 16:(i + 1) * s * 16, j * s * 16:(j + 1) * s * 16]
                px = px[px != 255]
                if px.size:
                    _, counts = np.unique(px, return_counts=True)
                    if counts.max() < purity * px.size:
                        continue
                taken[i * s:(i + 1) * s, j * s:(j + 1) * s] = True
                windows += 1
    return windows + int((~taken).sum())


@pytest.fixture(scope="module")
def oracle_model():
    return tiny("oracle", num_classes=7)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_oracle_on_loveda_matches_brute_force_quadtree(oracle_model, index: int) -> None:
    name, image, label = loveda_pairs()[index]
    layout, _ = oracle_model.select(image, label)
    expected = brute_force_quadtree_tokens(label[0].numpy())
    assert int(layout.num_tokens[0]) == expected, name
    assert expected < 64 * 64 / 2, "a real scene should share a lot"
    # the layout is a partition of the grid: every token's cells are exactly its window
    c2t = layout.cell_to_token[0]
    cells_per_token = torch.bincount(c2t, minlength=expected)
    assert torch.equal(cells_per_token, layout.token_level[0] ** 2)


def test_policy_targets_purity_and_ignore() -> None:
    lab = torch.zeros(1, 64, 64, dtype=torch.long)
    lab[0, :32, :32] = 255  # all-ignore window: homogeneous
    lab[0, :32, 32:] = 1
    lab[0, 0, 32] = 2  # one stray pixel in 1024: pure at purity 0.99, not at 1.0
    lab[0, 32:, :32] = 1
    lab[0, 32:48, :32] = 2  # half / half
    t = policy_targets(lab, levels=(2, 4))
    assert t[2].tolist() == [[[1.0, 0.0], [0.0, 1.0]]]
    assert t[4].tolist() == [[[0.0]]]
    relaxed = policy_targets(lab, levels=(2,), purity=0.99)
    assert relaxed[2].tolist() == [[[1.0, 1.0], [0.0, 1.0]]]


def test_threshold_selection_is_coarse_to_fine_and_quadtree_aligned() -> None:
    grid = (8, 8)
    scores = {s: torch.zeros(1, 8 // s, 8 // s) for s in (2, 4, 8)}
    scores[4][0, 0, 1] = 0.9  # top-right 4x4 window
    scores[2][0, 0, 2] = 0.9  # inside it: must lose to the coarser window
    scores[2][0, 3, 3] = 0.7  # below the threshold of level 2
    scores[2][0, 3, 0] = 0.9
    accepted = select_by_threshold(scores, {2: 0.8, 4: 0.5, 8: 0.5}, grid)
    layout = build_layout(accepted, grid, 1, "cpu")
    assert accepted[4].sum() == 1 and accepted[2].sum() == 1
    assert int(layout.num_tokens[0]) == 64 - 15 - 3
    assert layout.cell_level[0, :4, 4:].eq(4).all() and layout.cell_level[0, 6:, :2].eq(2).all()


def test_budget_mode_keeps_the_requested_token_count() -> None:
    torch.manual_seed(0)
    grid = (16, 16)
    scores = {s: torch.rand(2, 16 // s, 16 // s) for s in (2, 4, 8, 16)}
    accepted = select_by_budget(scores, 0.5, grid)
    layout = build_layout(accepted, grid, 2, "cpu")
    for n in layout.num_tokens.tolist():
        assert 128 <= n <= 130


def test_supertoken_embedding_is_area_downsampling_and_mean_position() -> None:
    model = tiny("oracle")
    x = torch.rand(1, 3, 64, 64)
    y = torch.zeros(1, 64, 64, dtype=torch.long)
    y[0, 32:, :] = 1  # top half one class: two 2x2 windows; bottom half another
    with torch.no_grad():
        layout, _ = model.select(x, y)
        tokens = model.embed(x, layout)
    assert int(layout.num_tokens[0]) == 2 + 2  # two 2x2 windows on top, two at the bottom
    enc = model.encoder
    _, grid_pos = enc.grid_pos_embed(4, 4)
    norm = enc.normalize(x)
    block = F.avg_pool2d(norm[..., :32, :32], 2)  # token 0: top-left 32x32 px -> 16x16
    expected = enc.vit.patch_embed.proj(block).flatten(1)[:, :]
    pos = grid_pos.view(4, 4, -1)[:2, :2].reshape(4, -1).mean(0)
    torch.testing.assert_close(tokens[0, 1], expected[0] + pos, atol=1e-5, rtol=0)


def test_every_supertoken_gets_its_window_area_downsampled() -> None:
    """Mixed levels (1, 2, 4) in a batch of two with different token counts: each token's
    pixels are its window's area average at 16 x 16, padding slots are zero."""
    from step_model.model import StepSegmenter

    gen = torch.Generator().manual_seed(3)
    grid = (6, 10)  # not a multiple of 4: the pooled tables have rows no window uses
    scores = {s: torch.rand(2, -(-grid[0] // s), -(-grid[1] // s), generator=gen)
              for s in (2, 4, 8)}
    layout = build_layout(select_by_threshold(scores, {2: 0.5, 4: 0.6, 8: 0.3}, grid),
                          grid, 2, "cpu")
    assert set(layout.token_level.unique().tolist()) >= {1, 2, 4}
    assert layout.num_tokens[0] != layout.num_tokens[1]
    x = torch.rand(2, 3, grid[0] * 16, grid[1] * 16, generator=gen)
    got = StepSegmenter._gather_patches(x, layout)
    for b in range(2):
        for t in range(layout.max_tokens):
            s = int(layout.token_level[b, t])
            if s == 0:
                assert not got[b, t].any()
                continue
            r, c = divmod(int(layout.token_anchor[b, t]), grid[1])
            window = x[b, :, r * 16:(r + s) * 16, c * 16:(c + s) * 16]
            expected = F.avg_pool2d(window[None], s)[0].reshape(-1)
            torch.testing.assert_close(got[b, t], expected, atol=1e-6, rtol=0)
