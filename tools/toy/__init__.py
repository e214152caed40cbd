"""Measuring aids for toy-world checkpoints (what the encoder, the fusion and the task heads learned), run as
`python -m tools.toy.<name>` from the repository root; see docs/toy_world.md."""
