"""Test helpers shared by every test package, loaded as pytest plugins (tests/conftest.py)."""
