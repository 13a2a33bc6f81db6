"""Sans-IO DNS codec helpers: build queries, parse replies, read their answers.  No
sockets, no asyncio, no judgement.

dnspython does the message codec; this module draws the line around it so that bytes
from a censor or a broken resolver can only ever raise `WireError`.  What an answer
*means* (a bogon, two resolvers disagreeing) is judged in `probe.dnsjudge`, and what an
rcode means as a failure in `probe.classify`.
"""

from __future__ import annotations

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from . import WireError

__all__ = [
    "EDNS_PAYLOAD",
    "MAX_MESSAGE",
    "addresses",
    "build_query",
    "matches_query",
    "parse_message",
    "rcode_text",
]

# A DNS message is at most 65535 bytes (the TCP length prefix); nothing longer is parsed.
MAX_MESSAGE = 65535
# The DNS Flag Day 2020 default: big enough for a few dozen addresses, small enough
# to avoid IP fragmentation (fragments are what censors and middleboxes drop).
EDNS_PAYLOAD = 1232
# A CNAME chain longer than this is a loop or an attack, not a CDN.
_MAX_CNAME_HOPS = 16


def build_query(qname: str, rdtype: str, *, qid: int | None = None) -> dns.message.QueryMessage:
    """A recursive (RD) query with EDNS0; ``qid`` None = a random ID from dnspython.

    Raises ValueError for a name that cannot be encoded (a config error, not a network one).
    """
    try:
        query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
    except Exception as exc:  # dnspython raises assorted DNSException subclasses here
        raise ValueError(f"cannot build a DNS query for {qname!r} {rdtype}: {exc}") from exc
    if qid is not None:
        query.id = qid & 0xFFFF
    return query


def parse_message(data: bytes) -> dns.message.Message:
    """Decode one DNS message; anything malformed raises `WireError` and nothing else."""
    if len(data) > MAX_MESSAGE:
        raise WireError(f"DNS message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    try:
        return dns.message.from_wire(data)
    except Exception as exc:
        # dnspython's rdata parsers raise DNSException subclasses, but also plain
        # ValueError, struct.error, UnicodeError ... on hostile input; one type out.
        raise WireError(f"unparsable DNS message: {type(exc).__name__}") from exc


def matches_query(query: dns.message.Message, reply: dns.message.Message) -> bool:
    """Is ``reply`` an answer to ``query`` (QR set, same ID, opcode and question)?"""
    try:
        return bool(query.is_response(reply))
    except Exception:  # a parsed-but-odd question section must not escape as a crash
        return False


def rcode_text(message: dns.message.Message) -> str:
    """The response code as text (NOERROR, NXDOMAIN, ...), or its number if unknown."""
    try:
        return dns.rcode.to_text(message.rcode())
    except Exception:
        return str(message.rcode())


def addresses(message: dns.message.Message, qname: str, rdtype: str) -> tuple[str, ...]:
    """The A or AAAA addresses that answer ``qname``, following its CNAME chain.

    Records for names outside the chain are ignored: a resolver (or an injector)
    stuffing unrelated records into the answer section does not get them counted.
    Order is kept as sent, duplicates are dropped.
    """
    wanted = dns.rdatatype.from_text(rdtype)
    try:
        name = dns.name.from_text(qname)
    except Exception:
        return ()
    found: list[str] = []
    seen: set[dns.name.Name] = set()
    for _ in range(_MAX_CNAME_HOPS):
        if name in seen:
            break
        seen.add(name)
        next_name: dns.name.Name | None = None
        for rrset in message.answer:
            if rrset.name != name or rrset.rdclass != dns.rdataclass.IN:
                continue
            if rrset.rdtype == wanted:
                found.extend(rd.address for rd in rrset if rd.address not in found)
            elif rrset.rdtype == dns.rdatatype.CNAME and len(rrset) > 0:
                next_name = next(iter(rrset)).target
        if next_name is None:
            break
        name = next_name
    return tuple(found)
