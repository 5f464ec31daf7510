"""TODO(client tier): tests/test_client_replay.py still imports these names from here;
once it moves to tests/client/ and imports them from tests.system.test_reliability,
delete this module and its line in collect_ignore (tests/conftest.py). Never
collected: its tests run from tests/system/test_reliability.py."""

from tests.system.test_reliability import SERVING, Rig, pause, resume, start_rig

__all__ = ["SERVING", "Rig", "pause", "resume", "start_rig"]
