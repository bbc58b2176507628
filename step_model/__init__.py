"""step_model."""
