"""``step analyze``: where the tokens go (layout ceilings, trade-off, exit ablation, flow)."""
