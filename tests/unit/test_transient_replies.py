"""Which Redis error replies mean "the same call succeeds later" (store/faults.py).

Redis 6 wraps an error that a script met in its own "Error running script"
reply; a READONLY from a demoted primary then arrived as a plain ResponseError
and was answered INTERNAL instead of UNAVAILABLE (found running the pipelined
connection's tests on Redis 6.2).
"""

from __future__ import annotations

import pytest
import redis.exceptions

from pagemeter_server.store.faults import demoted_primary, is_transient

REDIS_6_SCRIPT_ERROR = (
    "Error running script (call to f_61636018f4e6b5817b89791bbed242f93fa089e3): "
    "@user_script:1: @user_script: 1: -{reply}"
)


@pytest.mark.parametrize(
    "reply",
    [
        "READONLY You can't write against a read only replica.",
        "NOREPLICAS Not enough good replicas to write.",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "LOADING Redis is loading the dataset in memory",
    ],
)
def test_a_transient_reply_is_transient_bare_and_inside_a_redis_6_script_error(
    reply: str,
) -> None:
    assert is_transient(redis.exceptions.ResponseError(reply))
    assert is_transient(redis.exceptions.ResponseError(REDIS_6_SCRIPT_ERROR.format(reply=reply)))


def test_a_script_error_of_its_own_is_not_transient() -> None:
    """A script that fails on its own (a bug, a bad argument) must not be retried as if
    Redis were unavailable, even when its message mentions a transient code."""
    own = "Error running script (call to f_1): @user_script:12: user_script:12: bad argument"
    assert not is_transient(redis.exceptions.ResponseError(own))
    assert not is_transient(redis.exceptions.ResponseError("ERR READONLY is a word here"))


def test_a_demoted_primary_is_told_apart_in_both_forms() -> None:
    readonly = "READONLY You can't write against a read only replica."
    assert demoted_primary(redis.exceptions.ReadOnlyError(readonly))
    assert demoted_primary(
        redis.exceptions.ResponseError(REDIS_6_SCRIPT_ERROR.format(reply=readonly))
    )
    assert not demoted_primary(redis.exceptions.ResponseError("NOREPLICAS Not enough"))
