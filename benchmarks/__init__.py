"""choreo's benchmarks: run `python -m benchmarks.replay`."""
