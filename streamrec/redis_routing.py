"""Pipelines that work on one Redis node and on a Redis Cluster alike.

redis-py's ``ClusterPipeline`` refuses ``EVALSHA`` (the per-user compare-and-set scripts of
``profiles/store.py``). :class:`RoutedPipeline` keeps one plain pipeline per node instead: each
command is queued on the pipeline of the node serving its key's slot, the node pipelines run
one round trip each, and the replies come back in call order. On a single node it is one
ordinary pipeline. Every key of a script shares one hash tag, so each script runs on one node.

A slot that moved (resharding, failover: ``MOVED`` / ``ASK``) or a node that went away makes
:meth:`RoutedPipeline.execute` refresh the cluster map and raise; callers retry the whole
batch, which the idempotent writes make safe.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from redis.client import Pipeline
from redis.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

__all__ = ["RoutedPipeline", "is_cluster"]

_POOL: ThreadPoolExecutor | None = None  # sends the node pipelines of a batch in parallel


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:  # once per process: not a thread start per batch
        _POOL = ThreadPoolExecutor(16, thread_name_prefix="redis-node")
    return _POOL


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


class RoutedPipeline:
    """Queue commands by key; ``execute()`` returns their replies in call order.

    Usage: ``rp.on(key).hset(key, ...)`` — exactly one command per :meth:`on` call, with the
    key that routes it (for a script: any of its keys)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.cluster = is_cluster(client)
        self._pipes: dict[str, Pipeline] = {}
        self._order: list[tuple[str, int]] = []  # (node name, index of the reply in its pipeline)

    def on(self, key: str | bytes) -> Pipeline:
        if self.cluster:
            node = self.client.get_node_from_key(key)
            name = node.name
            pipe = self._pipes.get(name)
            if pipe is None:
                pipe = self._pipes[name] = self.client.get_redis_connection(node).pipeline(transaction=False)
        else:
            name = ""
            pipe = self._pipes.get(name)
            if pipe is None:
                pipe = self._pipes[name] = self.client.pipeline(transaction=False)
        self._order.append((name, len(pipe)))
        return pipe

    def __len__(self) -> int:
        return len(self._order)

    def execute(self) -> list[Any]:
        if not self._order:
            return []
        try:
            if len(self._pipes) == 1:
                replies = {name: pipe.execute() for name, pipe in self._pipes.items()}
            else:  # the nodes answer in parallel: one round trip in all, not one per node
                futs = {name: _pool().submit(pipe.execute) for name, pipe in self._pipes.items()}
                replies = {name: f.result() for name, f in futs.items()}
        except (ResponseError, RedisError) as exc:
            if self.cluster:
                moved = isinstance(exc, ResponseError) and str(exc).startswith(("MOVED", "ASK"))
                try:
                    self.client.nodes_manager.initialize()  # the slots' owners now
                except RedisError:
                    pass
                if moved:
                    raise RedisError(f"a Redis Cluster slot moved during the batch ({exc}); retry") from exc
            raise
        finally:
            self._pipes.clear()
        out = [replies[name][i] for name, i in self._order]
        self._order.clear()
        return out
