"""Research tools run from the repository root as `python -m tools.<group>.<name>`."""
