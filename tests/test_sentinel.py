"""TODO(client tier): tests/test_client_replay.py still imports these names from here;
once it moves to tests/client/ and imports them from tests.system.test_sentinel,
delete this module and its line in collect_ignore (tests/conftest.py). Never
collected: its tests run from tests/system/test_sentinel.py."""

from tests.system.test_sentinel import MASTER, Topology, running_topology

__all__ = ["MASTER", "Topology", "running_topology"]
