"""``forward`` is its pieces composed: calling them by hand gives exactly its output."""

from __future__ import annotations

import dataclasses

import torch

from step_model import EncodedTokens, SuperTokens

from helpers import blocky_labels, tiny


def _assert_same(a, b, where: str) -> None:
    """Exact equality of tensors, lists, dicts and dataclasses (no tolerance)."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_pieces_by_hand_equal_forward() -> None:
    # oracle supertokens, two exits with halting, a size that needs padding, 2 images
    model = tiny("oracle", exits=[3, 6], inference={"exit_thresholds": [0.3], "top_k": 2})
    x = torch.rand(2, 3, 90, 117, generator=torch.Generator().manual_seed(0))
    y = torch.cat([blocky_labels(96, 128, seed) for seed in range(2)])[:, :90, :117]
    with torch.no_grad():
        ref = model(x, y)
        tokens = model.forward_tokens(x, y)
        encoded = model.forward_encoder(tokens)
        logits, token_logits = model.forward_head(tokens, encoded)
        flow = model.token_flow(tokens, encoded)

    assert isinstance(tokens, SuperTokens) and isinstance(encoded, EncodedTokens)
    n = tokens.num_tokens
    assert tokens.layout.grid == (6, 8) and tokens.input_size == (90, 117)
    assert tokens.prefix == 1 and tokens.x.shape == (2, 1 + n, 192)
    assert encoded.halted.any(), "the test needs some halting"
    assert encoded.x.shape == (2, 1 + max(encoded.lengths), 192) and max(encoded.lengths) < n
    assert encoded.slot_token.shape == (2, max(encoded.lengths))
    assert len(encoded.exit_logits) == 2 and encoded.exit_logits[0].shape == (2, n, 5)
    assert logits.shape == (2, 5, 90, 117) and token_logits.shape == (2, n, 5)

    _assert_same(logits, ref.logits, "logits")
    _assert_same(token_logits, ref.token_logits, "token_logits")
    _assert_same(encoded.exit_logits, ref.exit_logits, "exit_logits")
    _assert_same(encoded.exit_valid, ref.exit_valid, "exit_valid")
    _assert_same(tokens.policy_logits, ref.policy_logits, "policy_logits")
    _assert_same(flow, ref.flow, "flow")
