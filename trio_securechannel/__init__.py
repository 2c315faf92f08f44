"""A Trio pool of TLS client channels ("secure channels") to remote relays.

Only the names below are public; the modules behind them are private.
"""

import logging as _logging

from ._breaker import BreakerEvent as BreakerEvent
from ._breaker import BreakerState as BreakerState
from ._channel import Channel as Channel
from ._channel import SecureChannel as SecureChannel
from ._config import PoolConfig as PoolConfig
from ._config import PoolOptions as PoolOptions
from ._endpoint import Endpoint as Endpoint
from ._endpoint import Target as Target
from ._errors import CircuitOpen as CircuitOpen
from ._errors import ConnectError as ConnectError
from ._errors import PoolClosed as PoolClosed
from ._errors import PoolExhausted as PoolExhausted
from ._errors import ProtocolError as ProtocolError
from ._errors import RequestTimeout as RequestTimeout
from ._errors import SecureChannelError as SecureChannelError
from ._events import EventStream as EventStream
from ._pinning import public_key_pin as public_key_pin
from ._pool import SecureChannelPool as SecureChannelPool
from ._pool import open_pool as open_pool
from ._status import BreakerStatus as BreakerStatus
from ._status import ChannelStatus as ChannelStatus
from ._status import ConnectionsStatus as ConnectionsStatus
from ._status import EndpointStatus as EndpointStatus
from ._status import LatencyStatus as LatencyStatus
from ._status import LatencySummary as LatencySummary
from ._status import PoolStatus as PoolStatus
from ._tls import load_root_store as load_root_store
from ._websocket import WebSocketChannel as WebSocketChannel

__version__ = "0.1.0.dev0"

# A library never prints unasked: without a handler of its own, Python's last resort would
# write our warnings to the stderr of an application that configured no logging. The
# application's own configuration still gets every record (docs/logging.rst).
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

# Show the public names as belonging to this package, in reprs, tracebacks and docs.
for _name in list(globals()):
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("trio_securechannel._"):
        _obj.__module__ = __name__
del _name, _obj
