"""Censorship lab: fake service endpoints and (with root) network namespaces with censor rules.

`probe.lab.servers` holds real protocol servers (DNS, TLS, QUIC, STUN, MTProto,
WhatsApp Noise, HTTPS bulk) used both by the test suite on loopback and by the
lab inside its namespaces: one implementation of each, never two.
"""
