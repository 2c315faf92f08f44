"""Row 19: every option is validated when open_pool is called, naming the field."""

from __future__ import annotations

import dataclasses
import math
import ssl
import typing
import warnings
from typing import Any

import pytest

import trio_securechannel as sc
from trio_securechannel import Endpoint, PoolConfig


@pytest.mark.parametrize(
    ("target", "host", "port", "path"),
    [
        ("relay.example.com:443", "relay.example.com", 443, None),
        ("127.0.0.1:50001", "127.0.0.1", 50001, None),
        ("[::1]:8443", "::1", 8443, None),
        ("[2001:db8::7]:1", "2001:db8::7", 1, None),
        (("electrum.example.org", 50002), "electrum.example.org", 50002, None),
        (("::1", 65535), "::1", 65535, None),
        ("tls://relay.example.com:50002", "relay.example.com", 50002, None),
        ("tls://[::1]:50002", "::1", 50002, None),
        ("wss://relay.example.com/ws", "relay.example.com", 443, "/ws"),
        ("wss://relay.example.com", "relay.example.com", 443, "/"),
        (
            "wss://relay.example.com:8443/v1/feed?topic=blocks",
            "relay.example.com",
            8443,
            "/v1/feed?topic=blocks",
        ),
        ("wss://[::1]:9000/", "::1", 9000, "/"),
        ("wss://127.0.0.1:443/ws", "127.0.0.1", 443, "/ws"),
        ("WSS://relay.example.com/ws", "relay.example.com", 443, "/ws"),
        ("TLS://relay.example.com:50002", "relay.example.com", 50002, None),
        ("wss://relay.example.com/a%20b", "relay.example.com", 443, "/a%20b"),
    ],
)
def test_targets_parse(target: sc.Target, host: str, port: int, path: str | None) -> None:
    endpoint = Endpoint.parse(target)
    assert (endpoint.host, endpoint.port, endpoint.websocket_path) == (host, port, path)
    assert endpoint.is_websocket == (path is not None)
    if path is not None and "?" in path:  # a query may hold a key: shown as "?..."
        assert str(endpoint) == f"{target}".lower().partition("?")[0] + "?..."
    else:
        assert Endpoint.parse(str(endpoint)) == endpoint  # str() round-trips


def test_endpoint_names_and_host_headers() -> None:
    assert str(Endpoint.parse("tls://relay.example.com:50002")) == "relay.example.com:50002"
    wss = Endpoint.parse("wss://relay.example.com/ws")
    assert str(wss) == "wss://relay.example.com:443/ws"
    assert wss.host_header == "relay.example.com"  # the default port goes unsaid
    assert Endpoint.parse("wss://[::1]:9000/x").host_header == "[::1]:9000"
    assert Endpoint.parse("wss://127.0.0.1:8443/x").host_header == "127.0.0.1:8443"
    # The name as DNS and TLS use it, not the Unicode form.
    assert Endpoint.parse("wss://bücher.example/ws").host_header == "xn--bcher-kva.example"


def test_the_same_relay_twice_is_refused_whatever_the_spelling() -> None:
    with pytest.raises(ValueError, match="the same relay twice"):
        sc.open_pool(["tls://relay.example.com:443", ("relay.example.com", 443)])
    # A raw TLS relay and a WebSocket one on the same port are two relays.
    sc.open_pool(["relay.example.com:443", "wss://relay.example.com/ws"])


@pytest.mark.parametrize(
    ("target", "error", "words"),
    [
        ("relay.example.com", ValueError, "missing ':port'"),
        ("relay.example.com:", ValueError, "port must be a number"),
        ("relay.example.com:https", ValueError, "port must be a number"),
        ("relay.example.com:0", ValueError, "out of range"),
        ("relay.example.com:65536", ValueError, "out of range"),
        (":443", ValueError, "invalid host"),
        ("::1:443", ValueError, "[addr]:port"),
        ("[::1]443", ValueError, "[v6addr]:port"),
        ("[relay]:443", ValueError, "not an IPv6 address"),
        ("https://relay.example.com:443", ValueError, "unsupported scheme 'https'"),
        ("ws://relay.example.com/ws", ValueError, "plain ws:// is not TLS: use wss://"),
        ("tls://relay.example.com", ValueError, "missing ':port'"),
        ("tls://relay.example.com:443/path", ValueError, "port must be a number"),
        ("wss://user:secret@relay.example.com/ws", ValueError, "credentials"),
        ("wss://relay.example.com/ws#top", ValueError, "no fragment"),
        ("wss://relay.example.com:99999/ws", ValueError, "invalid port"),
        ("wss://relay.example.com:0/ws", ValueError, "out of range"),
        ("wss:///ws", ValueError, "invalid host"),
        ("wss://[relay]/ws", ValueError, "malformed URL"),
        ("wss://relay.example.com/a b", ValueError, "whitespace"),
        ("WS://relay.example.com/ws", ValueError, "plain ws:// is not TLS"),
        ("ho\x00st:443", ValueError, "invalid host"),
        ("tls://ho\nst:443", ValueError, "invalid host"),
        ("relay.example.com:\u00b2", ValueError, "port must be a number"),
        ("relay.example.com:\uff14\uff14\uff13", ValueError, "port must be a number"),
        ("wss://relay.exa\nmple.com/ws", ValueError, "control character"),
        ("wss://relay.example.com/w\ts", ValueError, "control character"),
        ("wss://relay.example.com/bücher", ValueError, "non-ASCII path"),
        ("wss://[fe80::1%25eth0]/ws", ValueError, "invalid host"),  # no zone IDs
        ("relay%eth0:443", ValueError, "invalid host"),
        ("re;lay.example.com:443", ValueError, "invalid host name"),
        ("wss://re,lay.example.com/ws", ValueError, "invalid host name"),
        ("user@relay:443", ValueError, "invalid host"),
        ("relay..example.com:443", ValueError, "invalid host name"),
        ("x" * 64 + ".example.com:443", ValueError, "invalid host name"),
        (("relay", "443"), TypeError, "port must be an int"),
        (("relay", True), TypeError, "port must be an int"),
        (("relay", 70000), ValueError, "out of range"),
        ((b"relay", 443), TypeError, "host must be a str"),
        (443, TypeError, "target must be"),
        (None, TypeError, "target must be"),
    ],
)
def test_bad_targets_are_rejected_at_call_time(
    target: Any, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match="target") as info:
        sc.open_pool(target)  # no `async with`: the call itself must refuse
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"max_connections": 0}, ValueError, "max_connections must be >= 1, got 0"),
        ({"max_connections": -3}, ValueError, "max_connections"),
        ({"max_connections": 2.5}, TypeError, "max_connections must be an int"),
        ({"max_connections": True}, TypeError, "max_connections must be an int"),
        ({"min_idle": -1}, ValueError, "min_idle must be >= 0"),
        ({"min_idle": 11}, ValueError, "min_idle (11) must not exceed max_connections (10)"),
        ({"connect_timeout": 0}, ValueError, "connect_timeout must be > 0"),
        ({"connect_timeout": -1.0}, ValueError, "connect_timeout"),
        ({"connect_timeout": math.nan}, ValueError, "connect_timeout must be > 0 seconds, got nan"),
        ({"connect_timeout": math.inf}, ValueError, "connect_timeout must be finite"),
        ({"acquire_timeout": -0.5}, ValueError, "acquire_timeout must be >= 0"),
        ({"acquire_timeout": math.nan}, ValueError, "acquire_timeout"),
        ({"acquire_timeout": "1"}, TypeError, "acquire_timeout must be a number"),
        ({"idle_timeout": 0}, ValueError, "idle_timeout must be > 0"),
        ({"max_lifetime": -5}, ValueError, "max_lifetime"),
        ({"max_lifetime": math.nan}, ValueError, "max_lifetime"),
        ({"cleanup_interval": 0}, ValueError, "cleanup_interval must be > 0"),
        ({"cleanup_interval": math.inf}, ValueError, "cleanup_interval must be finite"),
        ({"shutdown_timeout": -1}, ValueError, "shutdown_timeout must be >= 0"),
        ({"namespace": ""}, ValueError, "namespace"),
        ({"namespace": "bitcoin-sprint"}, ValueError, "namespace"),
        ({"ssl_context": "yes"}, TypeError, "ssl_context"),
        ({"open_transport": 42}, TypeError, "open_transport must be callable"),
        ({"max_conections": 5}, TypeError, "unknown pool option(s) 'max_conections'"),
        ({"breaker_failure_threshold": 0}, ValueError, "breaker_failure_threshold must be >= 1"),
        ({"breaker_cooldown": -1}, ValueError, "breaker_cooldown must be >= 0"),
        ({"breaker_cooldown": math.nan}, ValueError, "breaker_cooldown"),
        ({"breaker_cooldown": math.inf}, ValueError, "breaker_cooldown must be finite"),
        ({"breaker_half_open_trials": 0}, ValueError, "breaker_half_open_trials must be >= 1"),
        ({"histogram_rotation_interval": 0}, ValueError, "histogram_rotation_interval must be > 0"),
        ({"max_latency_ms": 0}, ValueError, "max_latency_ms must be > 0 ms"),
        ({"max_latency_ms": math.nan}, ValueError, "max_latency_ms"),
        ({"metrics_port": -1}, ValueError, "metrics_port must be >= 0"),
        ({"metrics_port": 65536}, ValueError, "metrics_port must be <= 65535"),
        ({"metrics_port": "9090"}, TypeError, "metrics_port must be an int"),
        ({"metrics_host": ""}, ValueError, "metrics_host"),
        ({"metrics_auth_token": ""}, ValueError, "metrics_auth_token must be non-empty"),
        ({"metrics_auth_token": 12345}, TypeError, "metrics_auth_token must be a str"),
        ({"websocket_headers": "Authorization: x"}, TypeError, "mapping or (name, value) pairs"),
        ({"websocket_headers": [("X-Key",)]}, TypeError, "header 1 is not a (name, value)"),
        ({"websocket_headers": {"X Key": "1"}}, ValueError, "header 1 has an invalid name"),
        ({"websocket_headers": {"X-Key": " padded "}}, ValueError, "without surrounding"),
        ({"websocket_headers": {"Sec-WebSocket-Protocol": "a"}}, ValueError, "set by the"),
        ({"websocket_headers": {"Host": "elsewhere"}}, ValueError, "set by the WebSocket"),
        ({"websocket_headers": {"X-Key": "a\r\nInjected: 1"}}, ValueError, "printable ASCII"),
        ({"websocket_headers": {"X-Key": 7}}, ValueError, "value of header 1"),
        ({"websocket_subprotocols": "jsonrpc"}, TypeError, "sequence of names"),
        ({"websocket_subprotocols": ["json rpc"]}, ValueError, "invalid subprotocol name"),
        ({"websocket_max_message_size": 0}, ValueError, "websocket_max_message_size must be"),
    ],
)
def test_bad_options_are_rejected_at_call_time(
    options: dict[str, Any], error: type[Exception], words: str
) -> None:
    with pytest.raises(error) as info:
        sc.open_pool("relay.example.com:443", **options)
    assert words in str(info.value)
    with pytest.raises(error):  # the dataclass refuses the same values on its own
        PoolConfig(**options)


def test_server_or_unverifying_contexts_are_refused() -> None:
    insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="ssl_context"):
        sc.open_pool("relay.example.com:443", ssl_context=insecure)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 is deprecated, as it should be
        old.minimum_version = ssl.TLSVersion.TLSv1
    with pytest.raises(ValueError, match="ssl_context"):
        sc.open_pool("relay.example.com:443", ssl_context=old)


def test_config_is_reusable_and_options_override_it() -> None:
    config = PoolConfig(max_connections=50, min_idle=5, namespace="bitcoin_sprint")
    assert PoolConfig().max_connections == 10  # the documented default
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_connections = 1  # type: ignore[misc]
    tweaked = config.replace(acquire_timeout=2.0)
    assert (tweaked.max_connections, tweaked.acquire_timeout) == (50, 2.0)
    assert config.acquire_timeout == 0.0  # the original is untouched
    with pytest.raises(ValueError, match="min_idle"):
        config.replace(max_connections=4)  # now below min_idle=5: re-validated
    with pytest.raises(TypeError, match="config must be a PoolConfig"):
        sc.open_pool("relay.example.com:443", config={"max_connections": 5})  # type: ignore[arg-type]


def test_options_typeddict_matches_config_fields() -> None:
    # open_pool's **options are typed by PoolOptions; it must list exactly the config's fields.
    fields = {field.name for field in dataclasses.fields(PoolConfig)}
    assert set(typing.get_type_hints(sc.PoolOptions)) == fields


@pytest.mark.parametrize("token", ["", " padded-s3cret ", "line\nbreak-s3cret"])
def test_bad_token_is_refused_without_being_echoed(token: str) -> None:
    with pytest.raises(ValueError, match="metrics_auth_token") as info:
        sc.open_pool("relay.example.com:443", metrics_auth_token=token)
    assert "s3cret" not in str(info.value)
    config = PoolConfig(metrics_auth_token="real-s3cret")
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize(
    "error",
    [
        sc.PoolExhausted("relay:443", 10, 2.0),
        sc.ConnectError("relay:443", "tls", "certificate verify failed"),
        sc.PoolClosed("relay:443"),
        sc.CircuitOpen("relay:443", 12.5),
    ],
)
def test_errors_survive_pickling(error: sc.SecureChannelError) -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.__dict__ == error.__dict__


def test_websocket_headers_are_kept_as_pairs_and_out_of_reprs() -> None:
    config = PoolConfig(
        websocket_headers={"Authorization": "Bearer hunter2", "X-Client": "wallet/1.0"},
        websocket_subprotocols=["jsonrpc", "v2.relay"],
    )
    assert config.websocket_headers == (
        ("Authorization", "Bearer hunter2"),
        ("X-Client", "wallet/1.0"),
    )
    assert config.websocket_subprotocols == ("jsonrpc", "v2.relay")
    assert "hunter2" not in repr(config)
    with pytest.raises(ValueError, match="value of header 1") as info:
        PoolConfig(websocket_headers=[("Authorization", "Bearer hunter2\n")])
    assert "hunter2" not in str(info.value)  # a malformed secret is still a secret
    with pytest.raises(ValueError, match="invalid name") as info:
        PoolConfig(websocket_headers=[("Bearer hunter2", "Authorization")])  # swapped
    assert "hunter2" not in str(info.value)
    with pytest.raises(ValueError, match="value of header 2") as info:
        PoolConfig(websocket_headers=[("X-A", "1"), ("sk_live_hunter2", "X-Api-Key\n")])
    assert "hunter2" not in str(info.value)  # a swapped pair whose secret is a valid name


# -- values no float, no DNS name and no socket can hold: a ValueError naming the field ------

HUGE = 10**400  # more than a float holds: float(HUGE) raises OverflowError
SECONDS_OPTIONS = [
    "connect_timeout",
    "acquire_timeout",
    "request_timeout",
    "idle_timeout",
    "max_lifetime",
    "cleanup_interval",
    "shutdown_timeout",
    "breaker_cooldown",
    "histogram_rotation_interval",
    "max_latency_ms",
]


@pytest.mark.parametrize("value", [HUGE, -HUGE], ids=["1e400", "-1e400"])
@pytest.mark.parametrize("name", SECONDS_OPTIONS)
def test_seconds_too_large_for_a_float_are_a_value_error(name: str, value: int) -> None:
    options: dict[str, Any] = {name: value}
    with pytest.raises(ValueError, match=rf"^{name} ") as info:
        sc.open_pool("relay.example.com:443", **options)
    assert str(HUGE) not in str(info.value)  # not 401 digits either
    with pytest.raises(ValueError, match=rf"^{name} "):
        PoolConfig(**options)


async def test_a_checkout_timeout_too_large_for_a_float_is_a_value_error() -> None:
    async with sc.open_pool("relay.example.com:443") as pool:
        with pytest.raises(ValueError, match=r"^timeout "):
            pool.connection(timeout=HUGE)


@pytest.mark.parametrize(
    ("name", "bound"),
    [
        ("max_connections", 1_000_000),
        ("min_idle", 1_000_000),
        ("max_line_length", 1 << 30),
        ("breaker_failure_threshold", 1_000_000_000),
        ("breaker_half_open_trials", 1_000_000),
        ("websocket_max_message_size", 1 << 30),
    ],
)
@pytest.mark.parametrize("excess", [1, HUGE, 10**5000], ids=["bound+1", "1e400", "1e5000"])
def test_counts_beyond_a_sane_bound_are_a_value_error(name: str, bound: int, excess: int) -> None:
    value = bound + excess
    options: dict[str, Any] = {name: value}
    if name == "min_idle":
        options["max_connections"] = 1_000_000
    with pytest.raises(ValueError, match=rf"^{name} must be <= {bound}, got ") as info:
        sc.open_pool("relay.example.com:443", **options)
    assert len(str(info.value)) < 200  # the bound, not the thousands of digits
    if name == "min_idle":
        options["min_idle"] = bound
    else:
        options[name] = bound
    PoolConfig(**options)  # the bound itself is fine


async def test_the_largest_pool_still_serves_metrics() -> None:
    # 10**400 used to be accepted, and every /metrics scrape then failed (no float for it).
    async with sc.open_pool("relay.example.com:443", max_connections=1_000_000) as pool:
        assert (
            'securechannel_max_connections{endpoint="relay.example.com:443"} 1e+06'
            in pool.metrics_text().decode()
        )


LABEL = "a" * 63  # the longest label DNS allows
NAME_253 = ".".join([LABEL, LABEL, LABEL, "a" * 61])  # the longest name: 253 characters
NAME_255 = ".".join([LABEL, LABEL, LABEL, LABEL])


@pytest.mark.parametrize(
    "target",
    [
        f"{NAME_255}:443",
        f"tls://{NAME_255}:443",
        f"wss://{NAME_255}/ws",
        (NAME_255, 443),
        f"{NAME_253}a.:443",  # 254 before the root's dot
    ],
)
def test_host_names_longer_than_dns_allows_are_refused(target: sc.Target) -> None:
    with pytest.raises(ValueError, match=r"^target: host name .* is 25\d characters long"):
        sc.open_pool(target)
    with pytest.raises(ValueError, match=r"^target\[1\]: "):
        sc.open_pool(["relay.example.com:443", target])


@pytest.mark.parametrize("target", [f"{NAME_253}:443", f"{NAME_253}.:443", (NAME_253, 443)])
def test_the_longest_host_name_dns_allows_is_accepted(target: sc.Target) -> None:
    assert len(NAME_253) == 253
    assert Endpoint.parse(target).host.rstrip(".") == NAME_253


@pytest.mark.parametrize(
    ("host", "words"),
    [
        ("a" * 300, "invalid host name"),
        (NAME_255, "characters long"),
        ("bad host", "invalid host"),
        ("[::1]", "invalid host"),
        ("relay..example.com", "invalid host name"),
    ],
)
def test_bad_metrics_host_is_a_value_error_naming_it(host: str, words: str) -> None:
    with pytest.raises(ValueError, match=r"^metrics_host: ") as info:
        sc.open_pool("relay.example.com:443", metrics_host=host, metrics_port=0)
    assert words in str(info.value)
    with pytest.raises(ValueError, match=r"^metrics_host: "):
        PoolConfig(metrics_host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "0.0.0.0", "::", "localhost"])
def test_good_metrics_hosts_are_accepted(host: str) -> None:
    assert PoolConfig(metrics_host=host).metrics_host == host


def test_a_scoped_ipv6_metrics_host_is_accepted() -> None:
    assert sc.PoolConfig(metrics_host="fe80::1%lo").metrics_host == "fe80::1%lo"
