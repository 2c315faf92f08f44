"""`status()` is exactly its typed dicts: every key they declare, with its type, and no
other; and the reference documents exactly those keys."""

from __future__ import annotations

import json
import re
import ssl
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict

import pytest

import trio_securechannel as sc
from trio_securechannel.testing import Fault, LoopbackRelay, open_relay

from conftest import CA, make_server_context
from helpers import echo

STATUS_TYPES = [
    sc.PoolStatus,
    sc.EndpointStatus,
    sc.ConnectionsStatus,
    sc.BreakerStatus,
    sc.LatencyStatus,
    sc.LatencySummary,
    sc.ChannelStatus,
]


def check(value: object, hint: Any, path: str = "status()") -> None:
    """Assert that ``value`` is of type ``hint``: typed dicts key for key (all of them, no
    others), lists and dicts element by element, ``X | None``, literals and plain types."""
    origin = get_origin(hint)
    if is_typeddict(hint):
        assert type(value) is dict, f"{path}: {type(value).__name__}, not a dict"
        declared = get_type_hints(hint, include_extras=True)
        assert hint.__required_keys__ == frozenset(declared), f"{hint.__name__}: optional keys"
        missing, extra = declared.keys() - value.keys(), value.keys() - declared.keys()
        assert not missing, f"{path}: no {sorted(missing)} ({hint.__name__} declares them)"
        assert not extra, f"{path}: {sorted(extra)}, which {hint.__name__} does not declare"
        for key, key_hint in declared.items():
            check(value[key], key_hint, f"{path}[{key!r}]")
    elif origin is Literal:
        assert value in get_args(hint), f"{path}: {value!r} is not one of {get_args(hint)}"
    elif origin in (Union, types.UnionType):
        arms = get_args(hint)
        if value is None:
            assert type(None) in arms, f"{path}: None, not {hint}"
        else:
            (arm,) = [arm for arm in arms if arm is not type(None)]  # X | None only
            check(value, arm, path)
    elif origin is list:
        assert type(value) is list, f"{path}: {type(value).__name__}, not a list"
        (item,) = get_args(hint)
        for index, one in enumerate(value):
            check(one, item, f"{path}[{index}]")
    elif origin is dict:
        assert type(value) is dict, f"{path}: {type(value).__name__}, not a dict"
        key_type, value_type = get_args(hint)
        for key, one in value.items():
            check(key, key_type, f"{path} key {key!r}")
            check(one, value_type, f"{path}[{key!r}]")
    elif hint in (int, float, str, bool):
        # Exactly: a bool is no count, and a float figure is never an int (JSON keeps 1.0).
        assert type(value) is hint, f"{path}: {value!r} is {type(value).__name__}, not {hint}"
    else:
        raise AssertionError(f"{path}: the check does not know {hint!r}")


def walked(value: Any, hint: Any, found: set[str], path: str = "") -> None:
    """Collect the paths of the typed dicts' keys that ``value`` fills (each list's
    entries too), to show the traffic below reached every part of the schema."""
    if is_typeddict(hint):
        for key, key_hint in get_type_hints(hint).items():
            found.add(f"{path}.{key}")
            walked(value[key], key_hint, found, f"{path}.{key}")
    elif get_origin(hint) is list and value:
        for one in value:
            walked(one, get_args(hint)[0], found, f"{path}[]")


async def test_a_busy_pool_s_status_is_exactly_its_typed_dict(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    options: sc.PoolOptions = {
        "ssl_context": client_context,
        "max_connections": 2,
        "breaker_failure_threshold": 1,
    }
    async with (
        sc.open_pool(relay.target, **options) as pool,
        pool.connection() as held,  # lent while the status is taken
    ):
        for number in range(5):
            assert await echo(held, b"%d" % number) == b"%d" % number
        relay.fault = Fault.CLOSE_ON_ACCEPT
        with pytest.raises(sc.ConnectError):  # a failed connect opens the breaker
            async with pool.connection():
                pass
        with pytest.raises(sc.CircuitOpen):
            async with pool.connection():
                pass
        status = pool.status()
    check(status, sc.PoolStatus)
    assert json.loads(json.dumps(status)) == status  # JSON-serialisable as it is
    # The figures filled in are the ones provoked (so the check saw real values, not only
    # zeros and Nones).
    assert status["breaker"]["state"] == "open"
    assert isinstance(status["breaker"]["retry_after"], float)
    assert status["errors_total"] == 1
    assert status["channels"][0]["state"] == "in_use"
    assert status["latency"]["round_trip"]["count"] == 5
    assert isinstance(status["latency"]["round_trip"]["p50_ms"], float)
    assert status["latency"]["acquire_wait"]["count"] >= 1
    assert status["endpoints"][0]["channels"] == status["channels"]
    assert status["protocol"] == "tls"


async def test_a_pool_of_several_relays_has_the_same_shape(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    async with (
        open_relay(websocket=True, path="/ws", ca=CA, tls_context=make_server_context()) as wss,
        sc.open_pool([relay.target, wss.url], ssl_context=client_context) as pool,
        pool.connection() as channel,
        pool.websocket() as websocket,
    ):
        assert await echo(channel, b"tls") == b"tls"
        await websocket.send_message("wss")
        assert await websocket.get_message() == "wss"
        status = pool.status()
    check(status, sc.PoolStatus)
    found: set[str] = set()
    walked(status, sc.PoolStatus, found)
    assert ".endpoints[].channels[].round_trip.p99_ms" in found  # every level was walked
    assert status["protocol"] == "mixed"
    assert [e["protocol"] for e in status["endpoints"]] == ["tls", "websocket"]
    assert {c["endpoint"] for c in status["channels"]} == {f"127.0.0.1:{relay.port}", wss.url}
    assert status["target"] == f"127.0.0.1:{relay.port}, {wss.url}"


@pytest.mark.parametrize("typed_dict", [*STATUS_TYPES, sc.PoolOptions], ids=lambda t: t.__name__)
def test_each_typed_dict_documents_exactly_its_keys(typed_dict: Any) -> None:
    """The reference lists each key under "Keys:" with its type: none missing or extra."""
    doc = typed_dict.__doc__
    section = doc[doc.index("    Keys:\n") :]
    documented = re.findall(r"^ {8}(\w+) \(", section, re.MULTILINE)
    assert documented == list(get_type_hints(typed_dict))
