"""A stub bitcoind for ElectrumX: a Bitcoin regtest chain served over HTTP JSON-RPC.

ElectrumX learns everything from its daemon's JSON-RPC (``electrumx/server/daemon.py``):
on start ``getblockcount``, ``getnetworkinfo`` (it wants a version of at least 31.0) and
``getindexinfo`` (``txindex`` and ``txospenderindex``, synced); then, polling, batches of
``getblockhash`` and ``getblock <hash> false`` (the raw block in hex), ``getrawmempool``,
and for its clients ``estimatesmartfee`` (first called without parameters, to see that it
exists), ``getmempoolinfo``, ``getrawtransaction``, ``gettxspendingprevout``. This stub
answers those, and a few more a test may want, from a chain it makes itself:

- The real regtest genesis block, which ElectrumX checks by hash.
- Blocks on top of it, each with one coinbase transaction: correct serialisation, previous
  hash and merkle root, and even a valid proof of work (regtest's target is so easy that a
  nonce takes two tries on average; ElectrumX checks no work, but a client may).

Blocks are mined on demand (`Chain.mine`) while the server runs, and the tip can be replaced
(`Chain.reorg`). The mempool is always empty; transactions are never accepted.

`StubBitcoind` serves the chain on 127.0.0.1 from a thread (``http.server``), so it answers
whatever the test's Trio loop is doing; it checks HTTP basic authentication as bitcoind
does (ElectrumX requires credentials in ``DAEMON_URL``), answers JSON-RPC batches, and counts
the calls by method.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import socket
import struct
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, final

#: The regtest genesis block, raw: Bitcoin's genesis coinbase under regtest's header (time
#: 1296688602, bits 0x207fffff, nonce 2).
REGTEST_GENESIS_HEX = (
    "0100000000000000000000000000000000000000000000000000000000000000000000003ba3edfd7a7b12"
    "b27ac72c3e67768f617fc81bc3888a51323a9fb8aa4b1e5e4adae5494dffff7f20020000000101000000"
    "010000000000000000000000000000000000000000000000000000000000000000ffffffff4d04ffff00"
    "1d0104455468652054696d65732030332f4a616e2f32303039204368616e63656c6c6f72206f6e20627269"
    "6e6b206f66207365636f6e64206261696c6f757420666f722062616e6b73ffffffff0100f2052a010000"
    "00434104678afdb0fe5548271967f1a67130b7105cd6a828e03909a67962e0ea1f61deb649f6bc3f4cef"
    "38c4f35504e51ec112de5c384df7ba0b8d578a4c702b6bf11d5fac00000000"
)
#: Its hash, as ElectrumX's ``BitcoinRegtest.GENESIS_HASH`` has it.
REGTEST_GENESIS_HASH = "0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206"
#: Regtest's proof-of-work limit, compact: half of all hashes meet it.
REGTEST_BITS = 0x207FFFFF
#: Regtest halves the block subsidy every 150 blocks.
REGTEST_HALVING_INTERVAL = 150
#: Seconds between the generated blocks' timestamps.
BLOCK_INTERVAL = 600
#: The stub claims to be Bitcoin Core 31.0.0 (``getnetworkinfo``'s version): ElectrumX 2.x
#: refuses daemons older than 31.0.
DAEMON_VERSION = 310000
#: Fee rates the stub quotes, in BTC per kvB (``getnetworkinfo``, ``getmempoolinfo``).
RELAY_FEE = 0.00001
#: What the generated coinbases pay to unless told otherwise: a P2PKH script of a fixed key
#: hash, so a test can follow its history (see `scripthash`).
MINER_SCRIPT = (
    b"\x76\xa9\x14" + hashlib.sha256(b"trio-securechannel stub miner").digest()[:20] + b"\x88\xac"
)

_COINBASE_TAG = b"/trio-securechannel stub/"
# bitcoind's error codes (src/rpc/protocol.h).
RPC_METHOD_NOT_FOUND = -32601
RPC_PARSE_ERROR = -32700
RPC_MISC_ERROR = -1
RPC_INVALID_ADDRESS_OR_KEY = -5
RPC_INVALID_PARAMETER = -8
RPC_VERIFY_REJECTED = -26


def double_sha256(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def scripthash(script: bytes) -> str:
    """The Electrum protocol's name for ``script``: its SHA-256, byte-reversed, in hex."""
    return hashlib.sha256(script).digest()[::-1].hex()


def _varint(n: int) -> bytes:
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + struct.pack("<H", n)
    if n <= 0xFFFFFFFF:
        return b"\xfe" + struct.pack("<I", n)
    return b"\xff" + struct.pack("<Q", n)


def _push(data: bytes) -> bytes:
    assert len(data) < 0x4C
    return bytes([len(data)]) + data


def _script_number(n: int) -> bytes:
    """``n`` pushed as a script number, as BIP 34 puts the height in a coinbase."""
    if 1 <= n <= 16:
        return bytes([0x50 + n])  # OP_1 .. OP_16
    encoded = n.to_bytes((n.bit_length() + 8) // 8, "little")  # room for the sign bit
    return _push(encoded)


def _target(bits: int) -> int:
    return (bits & 0xFFFFFF) << (8 * ((bits >> 24) - 3))


@final
@dataclass(frozen=True)
class Block:
    """One block of the chain: its height and raw serialisation."""

    height: int
    raw: bytes

    @property
    def header(self) -> bytes:
        return self.raw[:80]

    @property
    def hash(self) -> str:
        """The block hash in the usual (byte-reversed) hex."""
        return double_sha256(self.header)[::-1].hex()

    @property
    def prev_hash(self) -> str:
        return self.header[4:36][::-1].hex()

    @property
    def time(self) -> int:
        return int(struct.unpack_from("<I", self.header, 68)[0])

    @property
    def coinbase(self) -> bytes:
        """The block's only transaction (the varint before it is one byte: a count of 1)."""
        return self.raw[81:]

    @property
    def txid(self) -> str:
        return double_sha256(self.coinbase)[::-1].hex()


def _coinbase(height: int, script: bytes, extra_nonce: int) -> bytes:
    """A coinbase paying the regtest subsidy to ``script``; ``extra_nonce`` tells apart the
    blocks that replace others at the same height (see `Chain.reorg`)."""
    script_sig = _script_number(height) + _push(_COINBASE_TAG + str(extra_nonce).encode())
    subsidy = (50 * 100_000_000) >> (height // REGTEST_HALVING_INTERVAL)
    return b"".join(
        [
            struct.pack("<i", 1),  # version
            _varint(1),
            bytes(32) + struct.pack("<I", 0xFFFFFFFF),  # the null prevout
            _varint(len(script_sig)) + script_sig,
            struct.pack("<I", 0xFFFFFFFF),  # sequence
            _varint(1),
            struct.pack("<q", subsidy) + _varint(len(script)) + script,
            struct.pack("<I", 0),  # lock time
        ]
    )


def _make_block(prev: Block, script: bytes, extra_nonce: int) -> Block:
    height = prev.height + 1
    coinbase = _coinbase(height, script, extra_nonce)
    merkle_root = double_sha256(coinbase)  # of a single transaction: its txid
    prefix = (
        struct.pack("<i", 0x20000000)  # version: BIP 9 bits, none signalled
        + double_sha256(prev.header)
        + merkle_root
        + struct.pack("<II", prev.time + BLOCK_INTERVAL, REGTEST_BITS)
    )
    target = _target(REGTEST_BITS)
    nonce = 0
    while int.from_bytes(double_sha256(prefix + struct.pack("<I", nonce)), "little") > target:
        nonce += 1
    return Block(height, prefix + struct.pack("<I", nonce) + _varint(1) + coinbase)


GENESIS = Block(0, bytes.fromhex(REGTEST_GENESIS_HEX))
assert GENESIS.hash == REGTEST_GENESIS_HASH


class Chain:
    """A regtest chain of ``blocks`` blocks above the genesis block, safe to share between
    threads: the RPC server reads it while a test mines."""

    def __init__(self, blocks: int = 0) -> None:
        self._lock = threading.Lock()
        self._blocks = [GENESIS]
        self._by_hash = {GENESIS.hash: GENESIS}
        self._by_txid = {GENESIS.txid: GENESIS}
        self._mined = 0
        self.mine(blocks)

    @property
    def height(self) -> int:
        with self._lock:
            return len(self._blocks) - 1

    @property
    def tip(self) -> Block:
        with self._lock:
            return self._blocks[-1]

    def mine(self, count: int = 1, *, script: bytes = MINER_SCRIPT) -> list[Block]:
        """Add ``count`` blocks whose coinbases pay ``script``; the new blocks."""
        with self._lock:
            return self._extend(count, script)

    def reorg(self, depth: int, count: int | None = None) -> list[Block]:
        """Replace the top ``depth`` blocks by ``count`` new ones (``depth + 1`` unless given:
        ElectrumX notices a reorganisation only when the daemon's height grows)."""
        with self._lock:
            if not 0 < depth < len(self._blocks):
                raise ValueError(f"cannot replace {depth} blocks of {len(self._blocks)}")
            for block in self._blocks[-depth:]:
                del self._by_hash[block.hash]
                del self._by_txid[block.txid]
            del self._blocks[-depth:]
            return self._extend(depth + 1 if count is None else count, MINER_SCRIPT)

    def _extend(self, count: int, script: bytes) -> list[Block]:
        new = []
        for _ in range(count):
            self._mined += 1
            block = _make_block(self._blocks[-1], script, self._mined)
            self._blocks.append(block)
            self._by_hash[block.hash] = block
            self._by_txid[block.txid] = block
            new.append(block)
        return new

    def at(self, height: int) -> Block | None:
        with self._lock:
            return self._blocks[height] if 0 <= height < len(self._blocks) else None

    def by_hash(self, block_hash: str) -> Block | None:
        with self._lock:
            return self._by_hash.get(block_hash)

    def by_txid(self, txid: str) -> Block | None:
        """The block holding transaction ``txid`` (every transaction is a coinbase)."""
        with self._lock:
            return self._by_txid.get(txid)

    def __iter__(self) -> Iterator[Block]:
        with self._lock:
            return iter(list(self._blocks))


class RPCError(Exception):
    """An error answer, as bitcoind gives it: a code and a message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class StubBitcoind:
    """The JSON-RPC server of a stub bitcoind on 127.0.0.1, serving `chain`.

    Use it as a context manager (or `start` and `close`). `url` is what ElectrumX takes as
    ``DAEMON_URL``; `calls` counts the requests by method (a batch counts each of its calls).

    Args:
        blocks: How many blocks to mine above the genesis block before serving.
        fee_rate: What ``estimatesmartfee`` answers, in BTC per kvB; None: "insufficient
            data", as a fresh regtest node says (ElectrumX then tells its clients -1).
    """

    def __init__(self, blocks: int = 10, *, fee_rate: float | None = 0.0002) -> None:
        self.chain = Chain(blocks)
        self.fee_rate = fee_rate
        self.user = "electrumx"
        self.password = secrets.token_hex(8)
        self.calls: Counter[str] = Counter()
        self._calls_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the stub bitcoind is not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}/"

    def start(self) -> None:
        """Listen on a free port of 127.0.0.1 and serve from a thread."""
        assert self._server is None, "already started"
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="stub-bitcoind",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the listener and every connection; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        assert self._thread is not None
        self._thread.join()
        server.close_connections()
        server.server_close()  # joins the connections' threads too

    def __enter__(self) -> StubBitcoind:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- JSON-RPC -----------------------------------------------------------------------------

    def answer(self, request: Any) -> dict[str, Any]:
        """The reply object to one JSON-RPC request object (bitcoind's JSON-RPC 1.0 style:
        ``result`` and ``error`` both present)."""
        request_id = request.get("id") if isinstance(request, dict) else None
        try:
            if not isinstance(request, dict) or not isinstance(request.get("method"), str):
                raise RPCError(-32600, "Invalid Request object")
            method = request["method"]
            params = request.get("params") or []
            if not isinstance(params, list):
                raise RPCError(-32600, "Params must be an array")
            with self._calls_lock:
                self.calls[method] += 1
            result = self.call(method, params)
        except RPCError as error:
            return {
                "result": None,
                "error": {"code": error.code, "message": error.message},
                "id": request_id,
            }
        return {"result": result, "error": None, "id": request_id}

    def call(self, method: str, params: list[Any]) -> Any:
        """The result of RPC ``method`` with ``params``; raises `RPCError`."""
        handler = getattr(self, f"_rpc_{method}", None)
        if handler is None:
            raise RPCError(RPC_METHOD_NOT_FOUND, "Method not found")
        try:
            return handler(*params)
        except (TypeError, ValueError, KeyError) as error:  # parameters of the wrong shape
            raise RPCError(RPC_MISC_ERROR, f"{method}: {error!r}") from None

    def _block(self, block_hash: object) -> Block:
        block = self.chain.by_hash(block_hash) if isinstance(block_hash, str) else None
        if block is None:
            raise RPCError(RPC_INVALID_ADDRESS_OR_KEY, "Block not found")
        return block

    def _rpc_getblockcount(self) -> int:
        return self.chain.height

    def _rpc_getbestblockhash(self) -> str:
        return self.chain.tip.hash

    def _rpc_getblockhash(self, height: int) -> str:
        block = self.chain.at(height)
        if block is None:
            raise RPCError(RPC_INVALID_PARAMETER, "Block height out of range")
        return block.hash

    def _rpc_getblock(self, block_hash: str, verbosity: int | bool = 1) -> Any:
        block = self._block(block_hash)
        if not int(verbosity):
            return block.raw.hex()
        info = self._header_info(block)
        info.update(size=len(block.raw), strippedsize=len(block.raw), weight=4 * len(block.raw))
        info["tx"] = [self._tx_info(block) if int(verbosity) >= 2 else block.txid]
        return info

    def _rpc_getblockheader(self, block_hash: str, verbose: bool = True) -> Any:
        block = self._block(block_hash)
        return self._header_info(block) if verbose else block.header.hex()

    def _header_info(self, block: Block) -> dict[str, Any]:
        tip = self.chain.tip
        info: dict[str, Any] = {
            "hash": block.hash,
            "confirmations": tip.height - block.height + 1,
            "height": block.height,
            "version": struct.unpack_from("<i", block.header, 0)[0],
            "merkleroot": block.header[36:68][::-1].hex(),
            "time": block.time,
            "mediantime": block.time,
            "nonce": struct.unpack_from("<I", block.header, 76)[0],
            "bits": block.header[72:76][::-1].hex(),
            "difficulty": 4.656542373906925e-10,
            "chainwork": f"{2 * (block.height + 1):064x}",
            "nTx": 1,
        }
        if block.height:
            info["previousblockhash"] = block.prev_hash
        following = self.chain.at(block.height + 1)
        if following is not None:
            info["nextblockhash"] = following.hash
        return info

    def _tx_info(self, block: Block) -> dict[str, Any]:
        coinbase = block.coinbase
        script_sig_length = coinbase[41]
        script_sig = coinbase[42 : 42 + script_sig_length]
        value_at = 42 + script_sig_length + 4 + 1
        value = struct.unpack_from("<q", coinbase, value_at)[0]
        script = coinbase[value_at + 9 : -4]
        return {
            "txid": block.txid,
            "hash": block.txid,
            "version": 1,
            "size": len(coinbase),
            "vsize": len(coinbase),
            "weight": 4 * len(coinbase),
            "locktime": 0,
            "vin": [{"coinbase": script_sig.hex(), "sequence": 0xFFFFFFFF}],
            "vout": [{"value": value / 100_000_000, "n": 0, "scriptPubKey": {"hex": script.hex()}}],
            "hex": coinbase.hex(),
        }

    def _rpc_getblockchaininfo(self) -> dict[str, Any]:
        tip = self.chain.tip
        return {
            "chain": "regtest",
            "blocks": tip.height,
            "headers": tip.height,
            "bestblockhash": tip.hash,
            "difficulty": 4.656542373906925e-10,
            "time": tip.time,
            "mediantime": tip.time,
            "verificationprogress": 1,
            "initialblockdownload": False,
            "chainwork": f"{2 * (tip.height + 1):064x}",
            "size_on_disk": 0,
            "pruned": False,
            "warnings": [],
        }

    def _rpc_getnetworkinfo(self) -> dict[str, Any]:
        return {
            "version": DAEMON_VERSION,
            "subversion": "/Satoshi:31.0.0(stub)/",
            "protocolversion": 70016,
            "localservices": "0000000000000c09",
            "localrelay": True,
            "timeoffset": 0,
            "networkactive": True,
            "connections": 0,
            "networks": [],
            "relayfee": RELAY_FEE,
            "incrementalfee": RELAY_FEE,
            "localaddresses": [],
            "warnings": [],
        }

    def _rpc_getindexinfo(self, name: str | None = None) -> dict[str, Any]:
        indexes = {
            index: {"synced": True, "best_block_height": self.chain.height}
            for index in ("txindex", "txospenderindex")
        }
        return {index: info for index, info in indexes.items() if name in (None, index)}

    def _rpc_getrawmempool(self, verbose: bool = False) -> Any:
        return {} if verbose else []

    def _rpc_getmempoolinfo(self) -> dict[str, Any]:
        return {
            "loaded": True,
            "size": 0,
            "bytes": 0,
            "usage": 0,
            "total_fee": 0,
            "maxmempool": 300_000_000,
            "mempoolminfee": RELAY_FEE,
            "minrelaytxfee": RELAY_FEE,
            "incrementalrelayfee": RELAY_FEE,
            "unbroadcastcount": 0,
            "fullrbf": True,
        }

    def _rpc_estimatesmartfee(self, *params: Any) -> dict[str, Any]:
        if not params:  # ElectrumX calls it bare to see that it exists: bitcoind's usage error
            raise RPCError(RPC_MISC_ERROR, 'estimatesmartfee conf_target ( "estimate_mode" )')
        if self.fee_rate is None:
            return {"errors": ["Insufficient data or no feerate found"], "blocks": 0}
        return {"feerate": self.fee_rate, "blocks": max(2, int(params[0]))}

    def _rpc_getrawtransaction(
        self, txid: str, verbose: int | bool = False, block_hash: str | None = None
    ) -> Any:
        block = self.chain.by_txid(txid) if isinstance(txid, str) else None
        if block is None:
            raise RPCError(
                RPC_INVALID_ADDRESS_OR_KEY,
                "No such mempool or blockchain transaction. Use gettransaction for wallet"
                " transactions.",
            )
        if not int(verbose):
            return block.coinbase.hex()
        info = self._tx_info(block)
        info.update(
            blockhash=block.hash,
            confirmations=self.chain.height - block.height + 1,
            time=block.time,
            blocktime=block.time,
        )
        return info

    def _rpc_gettxspendingprevout(
        self, outputs: list[dict[str, Any]], options: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        # Nothing spends anything here: every transaction is a coinbase.
        return [{"txid": output["txid"], "vout": output["vout"]} for output in outputs]

    def _rpc_sendrawtransaction(self, raw: str, *rest: Any) -> str:
        raise RPCError(RPC_VERIFY_REJECTED, "the stub bitcoind accepts no transactions")


# -- HTTP ----------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: aiohttp reuses its connections
    server: _Server
    timeout = 60  # an idle connection's thread ends in the end, even if its client stays

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        self.server.track(self.connection, add=False)
        super().finish()

    def do_POST(self) -> None:
        stub = self.server.stub
        expected = base64.b64encode(f"{stub.user}:{stub.password}".encode()).decode()
        if self.headers.get("Authorization") != f"Basic {expected}":
            # bitcoind's answer: 401 with no body.
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="jsonrpc"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status = 200
        try:
            request = json.loads(body)
        except ValueError:
            reply: Any = {
                "result": None,
                "error": {"code": RPC_PARSE_ERROR, "message": "Parse error"},
                "id": None,
            }
            status = 500
        else:
            if isinstance(request, list):
                reply = [stub.answer(item) for item in request]
            else:
                reply = stub.answer(request)
                error = reply["error"]
                if error is not None:  # bitcoind's statuses for a single request's errors
                    status = 404 if error["code"] == RPC_METHOD_NOT_FOUND else 500
        data = json.dumps(reply).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")  # ElectrumX wants exactly this
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # ElectrumX polls several times a second: no line per request on stderr


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True

    def __init__(self, stub: StubBitcoind) -> None:
        self.stub = stub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        """Shut every open connection down, so the threads blocked reading them end."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # closed meanwhile
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away mid-request (ElectrumX stopping): not our error
        super().handle_error(request, client_address)
