"""The verdict engine: one round's observations in, per-endpoint and per-service verdicts out.

Pure functions, no I/O, in layers that import only downwards:

- `observations`: any result (a `ProbeResult`, a lab `Observation`, a JSON record of a
  control vantage's ``/api/results``) normalised into an `Observation`;
- `vocabulary`: the closed `Verdict` vocabulary, the confidence scale, `Finding`, and the
  `EndpointVerdict` / `ServiceVerdict` handed out;
- `context`: what a rule may consult for one endpoint, and the comparison with the control;
- `rules`: the table of which rule judges a failed attempt; the rules themselves in
  `handshake_rules` (TLS/QUIC handshakes), `udp_rules` and `tcp_rules`; `dns`: what the
  resolvers' answers mean;
- `aggregate`: attempts -> path -> endpoint -> service -> round (`judge_round`), and the
  control vantage's own verdicts (`as_control_vantage`).

The rules and the evidence that triggers each are in ``docs/verdicts.md``.
"""
