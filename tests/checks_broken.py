"""A deliberately broken system for `choreo check`'s tests (see tests/test_checks.py)."""

from tests.test_checks import broken_system

system = broken_system()
