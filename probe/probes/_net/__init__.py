"""Shared transports for the probes: the socket-level code every probe used to write itself.

- `tcp`: one TCP connect to an IP literal, and what the kernel says about the connection
  (the SYN/SYN-ACK round trip from ``TCP_INFO``, address families, keepalive watch);
- `tls`: a client TLS state machine over memory BIOs with no IO inside (aioquic's
  ``QuicConnection`` split: bytes in with `TlsClient.feed`, bytes out with
  `TlsClient.data_to_send`), and `tls_pump`, the thin asyncio adapter that moves its
  bytes to and from a connected socket;
- `udp`: one connected-UDP channel: datagrams stamped on arrival, send times, ICMP errors
  (a connected socket is the only kind the kernel reports them to).

Probes record evidence from what these return; nothing here knows about results.
"""
