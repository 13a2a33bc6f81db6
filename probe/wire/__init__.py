"""Sans-IO wire codecs: bytes in, objects out; no sockets, no asyncio.

Every parser rejects malformed input with `WireError` (a `ValueError`) and
nothing else, so bytes from a censor or a hostile endpoint can never crash the
agent; the hypothesis tests in tests/test_wire_*.py hold each codec to that.
"""


class WireError(ValueError):
    """Bytes that do not parse as the expected protocol message."""
