"""`probe.wire.tlsrec`: naming what a TLS server sent during a failed handshake."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from probe.wire.tlsrec import server_messages


def record(ctype: int, body: bytes) -> bytes:
    return bytes([ctype, 3, 3]) + len(body).to_bytes(2, "big") + body


def message(kind: int, body: bytes = b"\x00" * 10) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "big") + body


def test_tls13_flight_shows_the_server_hello_then_encrypted_records() -> None:
    flight = (
        record(22, message(2, b"\x03\x03" + b"\x00" * 60))
        + record(20, b"\x01")
        + record(23, b"\xaa" * 900)
        + record(23, b"\xbb" * 300)
    )
    assert server_messages(flight) == ["server_hello", "change_cipher_spec", "encrypted"]


def test_tls12_messages_in_one_record_are_each_named() -> None:
    flight = record(22, message(2) + message(11, b"\x00" * 500) + message(14, b""))
    assert server_messages(flight) == ["server_hello", "certificate", "server_hello_done"]


def test_a_message_split_across_records_is_named_once() -> None:
    body = message(11, b"\x00" * 100)
    assert server_messages(record(22, body[:50]) + record(22, body[50:])) == ["certificate"]


def test_nothing_an_alert_garbage_and_a_truncated_record() -> None:
    assert server_messages(b"") == []
    assert server_messages(record(21, b"\x02\x28")) == ["alert"]
    assert server_messages(b"HTTP/1.1 400 Bad Request\r\n") == ["not_tls"]
    assert server_messages(b"\x16\x03") == ["partial_record"]
    # the record header names its type even if the body did not all arrive
    assert server_messages(record(22, message(2, b"\x00" * 60))[:20]) == ["server_hello"]


@given(st.binary(max_size=2048))
def test_any_bytes_give_a_short_list_of_names_and_never_raise(data: bytes) -> None:
    names = server_messages(data)
    assert len(names) <= 12
    assert all(isinstance(n, str) and n for n in names)
