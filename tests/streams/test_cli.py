"""``streamrec worker``'s faust Worker: its logging stays at the level asked for."""

from __future__ import annotations

import logging

import pytest

from streams.cli import faust_worker


@pytest.mark.parametrize("level", ["WARNING", "INFO"])
def test_worker_logs_at_the_level_asked_for_not_debug(level: str) -> None:
    import faust

    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    try:
        app = faust.App("streamrec-test-cli", broker="kafka://127.0.0.1:1")
        w = faust_worker(app, level)
        w._setup_logging()  # what execute_from_commandline does first
        assert root.getEffectiveLevel() == getattr(logging, level)
        assert not logging.getLogger("aiokafka.consumer.fetcher").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
