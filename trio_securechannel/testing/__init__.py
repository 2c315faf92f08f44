"""Fault relays for testing code that uses trio_securechannel (needs ``trustme``:
``pip install 'trio-securechannel[testing]'``).

`open_relay` runs a `LoopbackRelay`: TLS on 127.0.0.1 with a throwaway CA, raw or
``wss://``, echoing or running your handler; switch its `Fault` (or latency, replies in
pieces, idle closes, late TLS tickets) while your code talks to it, and assert on its
counters. For pytest, ``pytest_plugins = ["trio_securechannel.testing.pytest_plugin"]`` in
a ``conftest.py`` gives the ``tls_relay`` and ``wss_relay`` fixtures (with pytest-trio).
"""

from ._faults import Fault as Fault
from ._open import open_relay as open_relay
from ._relay import LoopbackRelay as LoopbackRelay
from ._relay import echo as echo
from ._streams import RelayStream as RelayStream
from ._websocket import echo_messages as echo_messages

__all__ = ["Fault", "LoopbackRelay", "RelayStream", "echo", "echo_messages", "open_relay"]
