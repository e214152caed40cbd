"""Speed, memory and correctness measurements: `python -m benchmarks.<name>` from the repository root."""
