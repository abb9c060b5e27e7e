"""Offline evaluations and every baseline: `streamrec eval loo|replay|spikes` (needs the `eval` extra)."""
