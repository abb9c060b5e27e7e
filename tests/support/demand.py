"""Demand test helpers (a pytest plugin): a slice of the real Online Retail purchase stream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from streamrec.events import Event, EventType
from streamrec.settings import Settings

# Six trading weeks after the Christmas break: the first ~2 weeks warm the baselines up
# (warmup_windows active hours), the rest is tested.
SLICE_START, SLICE_END = "2011-01-04", "2011-02-19"
# Injections start here (a Tuesday morning, well after the warm-up).
INJECT_AT = pd.Timestamp("2011-02-01 09:00").value // 1_000_000
HOUR_MS = 3_600_000


@pytest.fixture(scope="session")
def retail_slice(data_dir: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """(purchases ts/user_id/item_id/category sorted by time, item -> category) of the slice."""
    from evaluation.spikes import load_stream

    s = Settings(data_dir=data_dir)
    df, cats = load_stream(s, SLICE_START, SLICE_END)
    return df, cats


def to_events(df: pd.DataFrame) -> list[Event]:
    """Purchase events of a frame (ts, user_id, item_id)."""
    return [
        Event(event_id=f"{u}-{i}-{t}", type=EventType.PURCHASE, user_id=str(u), ts=int(t), item_id=str(i))
        for t, u, i in zip(
            df["ts"].to_numpy(), df["user_id"].to_numpy(), df["item_id"].to_numpy(), strict=True
        )
    ]


def batches(df: pd.DataFrame, size: int = 4000) -> Iterator[list[Event]]:
    """The frame as event batches of ``size``, in time order."""
    for i in range(0, len(df), size):
        yield to_events(df.iloc[i : i + size])


def active_windows_after(df: pd.DataFrame, t_ms: int, n: int) -> list[int]:
    """The first ``n`` window indices (hours) at or after ``t_ms`` in which the shop sold anything."""
    wins = sorted(set((df["ts"][df["ts"] >= t_ms] // HOUR_MS).tolist()))
    return wins[:n]


def with_surge(df: pd.DataFrame, item: str, category: str, windows: list[int], buyers: int) -> pd.DataFrame:
    """The frame plus ``buyers`` new distinct buyers of ``item`` in each of ``windows``."""
    rows = [
        {
            "ts": w * HOUR_MS + 60_000 * (j + 1),
            "user_id": f"viral-{w}-{j}",
            "item_id": item,
            "category": category,
        }
        for w in windows
        for j in range(buyers)
    ]
    out = pd.concat([df, pd.DataFrame(rows)], ignore_index=True)
    return out.sort_values("ts", kind="stable").reset_index(drop=True)
