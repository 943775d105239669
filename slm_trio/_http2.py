"""HTTP/2 tuning for grpclib connections that carry large tensors.

grpclib speaks HTTP/2 through the pure-Python ``h2`` package, and two of its
defaults make tensor messages slow:

- Frames are at most 16 KiB, the HTTP/2 default. A 1 MiB message takes 64 DATA
  frames each way, and every frame costs several Python calls in ``h2``,
  ``hyperframe`` and grpclib. `TunedH2Protocol` advertises a larger maximum
  frame size, so a peer that honours it sends fewer, larger frames.
- ``h2`` 4 formats every received frame for a trace log, even when that log
  is disabled. For a DATA frame that means copying the payload and
  hex-encoding all of it, only to keep the first 20 characters. Received DATA
  frames get a class whose ``repr`` shows the length instead.

Both changes apply per connection. Nothing in ``h2`` or ``hyperframe`` is
patched for the rest of the process. Peers see an ordinary HTTP/2 endpoint with
a larger SETTINGS_MAX_FRAME_SIZE; grpcio and stock grpclib peers work with it.

The advertised size is accepted from the first byte received, before the peer
acknowledges the SETTINGS frame. ``h2`` applies a new maximum only once the
acknowledgement arrives and checks a whole read against the old one, so a peer
that sends large frames right after its acknowledgement, in the same TCP read,
would otherwise trip a FRAME_SIZE_ERROR.

NOTE: this module relies on private parts of its dependencies, each covered by
tests/test_http2.py. grpclib 0.4's ``_protocol_factory`` (of `Server` and
`Channel`) and ``Connection._connection`` supply the protocol and the ``h2``
connection. The quiet DATA frames register their class in ``H2Connection``'s
private frame dispatch table. When that table is missing (another ``h2``
version), the connection keeps ``h2``'s own frames and only the frame size
changes, and tests/test_http2.py fails so the loss does not go unnoticed.
"""

from __future__ import annotations

import asyncio

from grpclib.client import Channel
from grpclib.protocol import H2Protocol
from h2.connection import H2Connection
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame, Frame

__all__ = ["MAX_FRAME_SIZE", "TunedChannel", "TunedH2Protocol", "tune_h2_connection"]

# Of 16 KiB, 64 KiB, 256 KiB and 1 MiB frames, 256 KiB gave the fastest loopback round trips
# of 64 KiB to 4 MiB tensors on a 2-core CPU machine (docs/benchmarks.md).
MAX_FRAME_SIZE = 256 << 10


class _QuietDataFrame(DataFrame):
    """A received DATA frame whose ``repr`` shows the payload length, not its bytes."""

    def _body_repr(self) -> str:
        return f"<{len(self.data)} bytes>"


class _QuietFrameBuffer(FrameBuffer):
    """A frame buffer that hands out received DATA frames as `_QuietDataFrame`."""

    def __next__(self) -> Frame:
        frame = super().__next__()
        if type(frame) is DataFrame:
            frame.__class__ = _QuietDataFrame
        return frame


def tune_h2_connection(connection: H2Connection, *, max_frame_size: int = MAX_FRAME_SIZE) -> None:
    """Advertise ``max_frame_size`` and make received DATA frames cheap to describe.

    Call it after ``initiate_connection`` and before any data is received. The
    SETTINGS frame it queues goes out with the caller's next flush.

    Raises:
        ValueError: ``max_frame_size`` is outside HTTP/2's range, 16,384 to 16,777,215 bytes.
    """
    if not 1 << 14 <= max_frame_size < 1 << 24:
        raise ValueError(
            f"max_frame_size must be between 16384 and 16777215 bytes, got {max_frame_size!r}"
        )
    connection.update_settings({SettingCodes.MAX_FRAME_SIZE: max_frame_size})
    connection.max_inbound_frame_size = max_frame_size

    dispatch = getattr(connection, "_frame_dispatch_table", None)
    if isinstance(dispatch, dict) and DataFrame in dispatch:
        dispatch[_QuietDataFrame] = dispatch[DataFrame]
        connection.incoming_buffer = _QuietFrameBuffer(server=not connection.config.client_side)


class TunedH2Protocol(H2Protocol):
    """grpclib's HTTP/2 protocol with `tune_h2_connection` applied to every connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        tune_h2_connection(self.connection._connection)
        self.connection.flush()

    @classmethod
    def like(cls, protocol: H2Protocol) -> TunedH2Protocol:
        """Build a tuned protocol with the handler and configurations of ``protocol``."""
        return cls(protocol.handler, protocol.config, protocol.h2_config)


class TunedChannel(Channel):
    """A grpclib `Channel` whose connections use `TunedH2Protocol`.

    Build it inside a coroutine on the asyncio loop it will run on, as with `Channel`.
    """

    def _protocol_factory(self) -> H2Protocol:
        return TunedH2Protocol.like(super()._protocol_factory())
