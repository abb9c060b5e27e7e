"""Batch windows: no wait at low load, longer gathering under a backlog, back once it drains."""

from __future__ import annotations

import asyncio

from streams.batching import BatchWindow, _drain


def test_the_window_doubles_under_a_backlog_up_to_its_top_and_resets_when_the_buffer_runs_dry():
    w = BatchWindow(0.02, 0.25)
    seen = []
    for backlog in (True, True, True, True, True, False, True):
        w.update(backlog)
        seen.append(round(w.wait_s, 3))
    assert seen == [0.04, 0.08, 0.16, 0.25, 0.25, 0.02, 0.04]
    assert BatchWindow(0.05).top_s == 0.05  # no backlog window: never grows


def test_drain_reports_a_backlog_only_when_time_ran_out_while_events_kept_coming():
    async def run(feeding: bool) -> tuple[bool, int]:
        buffer: list[int] = [0]
        full = asyncio.Event()

        async def feed() -> None:
            while feeding:
                buffer.append(len(buffer))
                await asyncio.sleep(0)

        task = asyncio.get_running_loop().create_task(feed())
        backlog = await _drain(buffer, full, 0.05)
        task.cancel()
        return backlog, len(buffer)

    backlog, n = asyncio.run(run(True))
    assert backlog and n > 10
    backlog, n = asyncio.run(run(False))
    assert not backlog and n == 1
