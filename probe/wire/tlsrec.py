"""What a TLS server sent during a handshake, read from the raw bytes (sans-IO).

Handshake progress is evidence (docs/verdicts.md, "Congestion"): an SNI filter kills or
blackholes the flow right after the ClientHello, so no server byte ever arrives; a
handshake that got a ServerHello and then ran out of time met a slow path or a broken
server.  `server_messages` names what came back, in order, without decrypting anything:
TLS 1.3 encrypts everything after the ServerHello, which then shows as ``encrypted``.
"""

from __future__ import annotations

__all__ = ["server_messages"]

_HANDSHAKE_TYPES = {
    1: "client_hello",
    2: "server_hello",
    4: "new_session_ticket",
    8: "encrypted_extensions",
    11: "certificate",
    12: "server_key_exchange",
    13: "certificate_request",
    14: "server_hello_done",
    15: "certificate_verify",
    20: "finished",
}
_RECORD_TYPES = {20: "change_cipher_spec", 21: "alert", 23: "encrypted"}
_MAX_MESSAGES = 12  # evidence, not a transcript


def _handshake_messages(stream: bytes, out: list[str]) -> None:
    """Message names of a plaintext handshake stream (complete headers only)."""
    pos = 0
    while pos + 4 <= len(stream) and len(out) < _MAX_MESSAGES:
        kind = stream[pos]
        length = int.from_bytes(stream[pos + 1 : pos + 4], "big")
        out.append(_HANDSHAKE_TYPES.get(kind, f"handshake_{kind}"))
        pos += 4 + length


def server_messages(data: bytes) -> list[str]:
    """Names of the TLS records and plaintext handshake messages at the start of ``data``.

    Never raises: bytes that are not TLS give ``["not_tls"]``, a truncated record ends
    the list (a partial record still names its type).  Consecutive ``encrypted`` records
    are named once.
    """
    out: list[str] = []
    pos = 0
    handshake = bytearray()  # plaintext handshake messages may span records
    while pos + 5 <= len(data) and len(out) < _MAX_MESSAGES:
        ctype, major = data[pos], data[pos + 1]
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if major != 3 or ctype not in (22, *_RECORD_TYPES):
            if not out and not handshake:
                return ["not_tls"]
            break
        body = data[pos + 5 : pos + 5 + length]
        if ctype == 22:
            handshake += body
        else:
            if handshake:
                _handshake_messages(bytes(handshake), out)
                handshake.clear()
            name = _RECORD_TYPES[ctype]
            if not (name == "encrypted" and out and out[-1] == name):
                out.append(name)
        pos += 5 + length
    if handshake:
        _handshake_messages(bytes(handshake), out)
    if not out and 0 < len(data) < 5:
        out.append("partial_record")
    return out[:_MAX_MESSAGES]
