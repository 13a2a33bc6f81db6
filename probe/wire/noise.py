"""WhatsApp's chat-protocol opening, sans-IO: the ``WA`` header, ClientHello, ServerHello.

WhatsApp's chat servers (``g.whatsapp.net``, ``e*.whatsapp.net``, ports 5222/443)
speak Noise ``XX_25519_AESGCM_SHA256`` over raw TCP, not TLS.  The first message
of each side is enough to tell a live chat server from a black hole, a reset or
a block page, and needs no account: we send our ephemeral key, the server
answers its ephemeral key plus its (encrypted) static key and certificate.  We
stop there.

Wire layout (learned from public open-source clients, not copied):

* client, once per connection: ``57 41 <magic> <dict>`` -- "WA", then two version
  bytes, (6, 3) in current clients: whatsmeow ``socket/constants.go``
  (``WAMagicValue = 6``, ``WAConnHeader = {'W','A',WAMagicValue,token.DictVersion}``,
  ``DictVersion = 3``) and Baileys ``src/Defaults`` (``NOISE_WA_HEADER =
  [87, 65, 6, DICT_VERSION]``, ``DICT_VERSION = 3``).  Older and forked clients
  show ``5, 2`` and ``6, 5``, hence a parameter.
* then frames, both directions: 3-byte big-endian length, then payload
  (whatsmeow ``socket/framesocket.go``: ``FrameLengthSize = 3``).
* the handshake payloads are the protobuf ``HandshakeMessage`` (Baileys
  ``WAProto/WAProto.proto``; Cobalt ``model/signal/auth/HandshakeMessage.java``,
  ``ClientHello.java``, ``ServerHello.java``)::

      message HandshakeMessage { ClientHello clientHello = 2; ServerHello serverHello = 3;
                                 ClientFinish clientFinish = 4; }
      message ClientHello { bytes ephemeral = 1; bytes static = 2; bytes payload = 3; }
      message ServerHello { bytes ephemeral = 1; bytes static = 2; bytes payload = 3; }

The protobuf subset needed (varints, length-delimited fields, skipping unknown
fields) is written here rather than pulling in a protobuf runtime for two
messages.  Parsers raise only `WireError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import WireError

__all__ = [
    "DEFAULT_VERSION",
    "KEY_LEN",
    "MAX_FRAME",
    "STATIC_ENCRYPTED_LEN",
    "ServerHello",
    "client_hello",
    "client_hello_packet",
    "decode_frame_length",
    "decode_varint",
    "encode_server_hello",
    "encode_varint",
    "frame",
    "header",
    "new_ephemeral",
    "parse_client_hello",
    "parse_header",
    "parse_server_hello",
    "public_bytes",
]

DEFAULT_VERSION: tuple[int, int] = (6, 3)
KEY_LEN = 32  # X25519 public key
_TAG_LEN = 16  # AES-GCM tag: what Noise's EncryptAndHash appends once a key is set
# The server's static key travels encrypted once the ee DH has keyed the cipher:
# 32 bytes of key plus the tag, exactly (Noise spec, section 5.2 EncryptAndHash).
STATIC_ENCRYPTED_LEN = KEY_LEN + _TAG_LEN
# A ServerHello is a few hundred bytes (keys + a certificate chain); refusing far
# bigger frames before reading them bounds what a hostile peer can make us buffer.
MAX_FRAME = 8192

# HandshakeMessage field numbers (see module docstring for the sources)
_HS_CLIENT_HELLO = 2
_HS_SERVER_HELLO = 3
_HELLO_EPHEMERAL = 1
_HELLO_STATIC = 2
_HELLO_PAYLOAD = 3

_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10


@dataclass(frozen=True)
class ServerHello:
    """The server's first handshake message; static and payload stay encrypted."""

    ephemeral: bytes  # the server's X25519 ephemeral public key, in the clear
    static: bytes  # AES-GCM(server static public key)
    payload: bytes  # AES-GCM(certificate chain)


# ---------------------------------------------------------------- keys


def new_ephemeral() -> X25519PrivateKey:
    """A fresh X25519 key pair; a new one per connection, as Noise requires."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


# ---------------------------------------------------------------- framing


def header(version: tuple[int, int] = DEFAULT_VERSION) -> bytes:
    """The 4-byte connection header: ``WA`` and two version bytes."""
    if (
        not isinstance(version, tuple | list)
        or len(version) != 2
        or not all(isinstance(v, int) and 0 <= v <= 255 for v in version)
    ):
        raise WireError(f"version must be two byte values, got {version!r}")
    return b"WA" + bytes(version)


def parse_header(data: bytes) -> tuple[int, int]:
    """The version bytes of a client's 4-byte connection header (lab server side)."""
    if len(data) != 4 or data[:2] != b"WA":
        raise WireError(f"not a WA connection header: {data[:4].hex()}")
    return data[2], data[3]


def frame(payload: bytes) -> bytes:
    """One frame: 3-byte big-endian length, then the payload."""
    if len(payload) >= 1 << 24:
        raise WireError("frame payload longer than a 3-byte length can say")
    return len(payload).to_bytes(3, "big") + payload


def decode_frame_length(data: bytes, max_len: int = MAX_FRAME) -> int:
    """The payload length announced by a 3-byte frame header."""
    if len(data) != 3:
        raise WireError(f"frame header must be 3 bytes, got {len(data)}")
    length = int.from_bytes(data, "big")
    if length == 0:
        raise WireError("empty frame where a handshake message belongs")
    if length > max_len:
        raise WireError(f"frame length {length} exceeds the {max_len}-byte bound")
    return length


# ---------------------------------------------------------------- protobuf subset


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise WireError("negative varint")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a varint at ``pos``; return (value, position after it)."""
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(data):
            raise WireError("truncated varint")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise WireError("varint longer than 10 bytes")


def _bytes_field(number: int, value: bytes) -> bytes:
    return encode_varint(number << 3 | _WT_LEN) + encode_varint(len(value)) + value


def _fields(data: bytes) -> dict[int, bytes]:
    """Length-delimited fields of one message by number; other wire types are skipped.

    A known field seen twice is rejected: protobuf would merge, but no real
    server sends that, and accepting it would let garbage look well-formed.
    """
    found: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        key, pos = decode_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("protobuf field number 0")
        if wire_type == _WT_VARINT:
            _, pos = decode_varint(data, pos)
        elif wire_type in (_WT_I64, _WT_I32):
            pos += 8 if wire_type == _WT_I64 else 4
        elif wire_type == _WT_LEN:
            length, pos = decode_varint(data, pos)
            if pos + length > len(data):
                raise WireError(f"field {number} of {length} bytes overruns the message")
            if number in found:
                raise WireError(f"field {number} repeated")
            found[number] = data[pos : pos + length]
            pos += length
        else:
            raise WireError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(data):
            raise WireError("fixed-width field overruns the message")
    return found


# ---------------------------------------------------------------- handshake messages


def client_hello(ephemeral: bytes) -> bytes:
    """``HandshakeMessage{clientHello{ephemeral}}`` as protobuf bytes."""
    if len(ephemeral) != KEY_LEN:
        raise WireError(f"ephemeral key must be {KEY_LEN} bytes, got {len(ephemeral)}")
    hello = _bytes_field(_HELLO_EPHEMERAL, ephemeral)
    return _bytes_field(_HS_CLIENT_HELLO, hello)


def client_hello_packet(ephemeral: bytes, version: tuple[int, int] = DEFAULT_VERSION) -> bytes:
    """Everything a client sends first: the header and one framed ClientHello."""
    return header(version) + frame(client_hello(ephemeral))


def parse_client_hello(payload: bytes) -> bytes:
    """The client's ephemeral key from a framed ClientHello payload (lab server side)."""
    outer = _fields(payload)
    if _HS_CLIENT_HELLO not in outer:
        raise WireError("HandshakeMessage without clientHello")
    ephemeral = _fields(outer[_HS_CLIENT_HELLO]).get(_HELLO_EPHEMERAL)
    if ephemeral is None or len(ephemeral) != KEY_LEN:
        raise WireError("clientHello.ephemeral missing or not 32 bytes")
    return ephemeral


def parse_server_hello(payload: bytes) -> ServerHello:
    """Parse and structurally validate a ServerHello frame payload.

    We cannot decrypt static and payload without finishing the handshake (which
    we must not do), so we check what a real server always sends: a 32-byte
    ephemeral key, a 48-byte encrypted static key and a non-empty encrypted
    certificate (longer than the bare 16-byte tag).
    """
    outer = _fields(payload)
    if _HS_SERVER_HELLO not in outer:
        present = sorted(outer)
        raise WireError(f"HandshakeMessage without serverHello (fields {present})")
    inner = _fields(outer[_HS_SERVER_HELLO])
    ephemeral = inner.get(_HELLO_EPHEMERAL, b"")
    static = inner.get(_HELLO_STATIC, b"")
    encrypted_payload = inner.get(_HELLO_PAYLOAD, b"")
    if len(ephemeral) != KEY_LEN:
        raise WireError(f"serverHello.ephemeral is {len(ephemeral)} bytes, not {KEY_LEN}")
    if len(static) != STATIC_ENCRYPTED_LEN:
        raise WireError(
            f"serverHello.static is {len(static)} bytes, not {STATIC_ENCRYPTED_LEN} (key + tag)"
        )
    if len(encrypted_payload) <= _TAG_LEN:
        raise WireError(f"serverHello.payload is {len(encrypted_payload)} bytes: no certificate")
    return ServerHello(ephemeral, static, encrypted_payload)


def encode_server_hello(hello: ServerHello) -> bytes:
    """``HandshakeMessage{serverHello{...}}`` as protobuf bytes (for the lab stub)."""
    inner = (
        _bytes_field(_HELLO_EPHEMERAL, hello.ephemeral)
        + _bytes_field(_HELLO_STATIC, hello.static)
        + _bytes_field(_HELLO_PAYLOAD, hello.payload)
    )
    return _bytes_field(_HS_SERVER_HELLO, inner)
