"""Private servers for tests that break them or need another shape (a pytest plugin).

``devstack.private.PrivateStack``: a Redis and a single-node KRaft broker of one test only;
``redis_cluster``: a real 3-master Redis Cluster from redis-server (cluster mode, no replicas)
on free loopback ports, for a module's tests.
"""

from __future__ import annotations

import pytest

from devstack.private import PrivateStack
from streamrec.settings import Settings

__all__ = ["PrivateStack"]


@pytest.fixture(scope="module")
def redis_cluster(stack: Settings, tmp_path_factory: pytest.TempPathFactory):
    """A private 3-master Redis Cluster for the module's tests (the shared Kafka)."""
    p = PrivateStack(stack, tmp_path_factory.mktemp("cluster"), kafka=False, cluster=True).up()
    yield p
    p.down()
