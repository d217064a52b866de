"""What Ferryman's Consul client reads from a real agent: a state/any wait that runs out at the same index is
reported unchanged (not decoded, an idle cost at scale), and a change after it is read in full."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from discovery.consul import ConsulAddress, ConsulClient

from .harness import CatalogInstance, ConsulAgent


@pytest.fixture
def consul(tmp_path: Path) -> Iterator[ConsulAgent]:
    """An agent of this test's own: on the suite's shared one, other tests' changes wake the wait that must run
    out unchanged here (two CI runs failed on it)."""
    agent = ConsulAgent(tmp_path)
    agent.start()
    yield agent
    agent.stop()


async def test_state_any_unchanged_when_the_wait_runs_out_then_read_on_a_change(consul: ConsulAgent) -> None:
    """checks(index) answers (index, None) when nothing changed within the wait; a new check is read in full."""
    await asyncio.to_thread(consul.register_external, "reads-node",
                            [CatalogInstance("reads", "reads-1", 9, ("urlprefix-/reads",))])
    client = ConsulClient(ConsulAddress.parse(consul.addr), token=None, dc=None, wait_s=1)
    try:
        index, checks = await client.checks(0)
        assert checks is not None and any(c.get("ServiceID") == "reads-1" for c in checks)
        assert await client.checks(index) == (index, None)  # blocked ~1 s, nothing changed
        changed = asyncio.create_task(client.checks(index))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(consul.register_external, "reads-node",
                                [CatalogInstance("reads", "reads-2", 10, ("urlprefix-/reads",))])
        new_index, after = await changed
        assert new_index > index
        assert after is not None and {str(c.get("ServiceID")) for c in after} >= {"reads-1", "reads-2"}
    finally:
        await client.close()
        await asyncio.to_thread(consul.deregister_external, "reads-node")
