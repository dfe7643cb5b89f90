"""Two versions of one small system, to test schema evolution: `v1` (run as an old process) and `v2`."""
