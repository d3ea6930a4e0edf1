"""Generated message payloads, hostile and valid, each labelled by construction.

The label (valid or not, and for a valid one the instance name) comes from how a payload
was built, never from mandrill's parser: the scenario compares the two. A seeded
``random.Random`` drives everything, so a scale and a seed name one set of payloads.

Left out on purpose, each with a test of its own that is expected to fail until the bug is
fixed (see ``test_reliability``): an ``instance_name`` ending in a newline (accepted as
valid) and a JSON integer of more than 4300 digits (crashes the daemon).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

#: mandrill's limit, restated rather than imported: the generator must not follow the code.
MAX_PAYLOAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Payload:
    kind: str
    data: bytes
    #: The instance name a valid payload names; ``None`` for an invalid one.
    instance_name: str | None

    @property
    def valid(self) -> bool:
        return self.instance_name is not None


#: Instance names a hostile publisher would try; none is one RFC 1123 label.
HOSTILE_NAMES = (
    "; rm -rf /",
    "$(reboot)",
    "`reboot`",
    "../../etc/passwd",
    "..",
    "-oProxyCommand=sh -c reboot",
    "-leading-dash",
    "trailing-dash-",
    "host.example.com",
    "under_score",
    "white space",
    "tab\there",
    "",
    " ",
    "cattle-1\r\nrestart: everything",
    "\ncattle-1",
    "cattle\x00nul",
    "{hostname}",
    "{instance_name.__class__}",
    "%s%s%n",
    "*",
    "cattle-1;cattle-2",
    "\uff43\uff41\uff54\uff54\uff4c\uff45",  # fullwidth "cattle"
    "cattle-ü",
    "\u202ecattle-1",  # right-to-left override
    "cattle\u200b1",  # zero-width space
    "\ud800",  # a lone surrogate, as a JSON escape
    "a" * 64,
    "a" * 300,
    "b" * 63 + "." + "c" * 63,
    "x" * 300 + ".example.net",
)


def _unicode_text(rng: random.Random, length: int) -> str:
    # At least one character outside ASCII letters, digits and '-', so never a valid label.
    pools = [
        "\u00e9\u00fc\u00df\u4e2d\u6587\u0627\u0644\u05e9\u0442\u0435\u0441\u0442",
        "\U0001f4a5\U0001f525\U0001f9e8",
        "\u0000\u0007\u001b\u007f\u2028\u2029\ufeff\ufffd",
        string.punctuation,
    ]
    chars = [rng.choice(rng.choice(pools)) for _ in range(max(1, length))]
    chars += rng.choices(string.ascii_letters, k=rng.randrange(0, length + 1))
    rng.shuffle(chars)
    return "".join(chars)


def _dump(obj: object, *, ascii_only: bool = False) -> bytes:
    # Raw UTF-8 or \u escapes: a lone surrogate or a NUL reaches the parser either as
    # bytes that are no UTF-8 (or JSON) or, escaped, as a string that is no host name.
    return json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


BadMaker = Callable[[random.Random], tuple[str, bytes]]


def _not_json(rng: random.Random) -> tuple[str, bytes]:
    return "not_json", rng.choice([
        b"{not json",
        b'{"instance_name": "cattle-1"',
        b"{'instance_name': 'cattle-1'}",
        b'{"instance_name": "cattle-1",}',
        b'{"instance_name": cattle-1}',
        b"instance_name=cattle-1",
        b"<xml>cattle-1</xml>",
        b"null null",
        _unicode_text(rng, rng.randrange(1, 40)).encode("utf-8", "surrogatepass"),
    ])


def _binary(rng: random.Random) -> tuple[str, bytes]:
    # A first byte that is no ASCII character: never UTF-8 JSON.
    head = bytes([rng.randrange(0x80, 0x100)])
    return "binary", head + rng.randbytes(rng.randrange(0, 512))


def _empty(rng: random.Random) -> tuple[str, bytes]:
    return "empty", rng.choice([b"", b" ", b"\n", b"\t\r\n"])


def _huge(rng: random.Random) -> tuple[str, bytes]:
    # A valid-looking message made too large: it must be refused by size, unparsed.
    size = rng.choice([MAX_PAYLOAD_BYTES + 1, MAX_PAYLOAD_BYTES + 4096, 100_000])
    body = _dump({"instance_name": "cattle-huge", "padding": ""})
    return "huge", body[:-2] + b"x" * (size - len(body)) + b'"}'


def _wrong_type(rng: random.Random) -> tuple[str, bytes]:
    return "wrong_type", _dump(rng.choice([
        ["cattle-1"], "cattle-1", 42, 3.5, None, True, [], [{"instance_name": "cattle-1"}],
    ]))


def _missing(rng: random.Random) -> tuple[str, bytes]:
    return "missing", _dump(rng.choice([
        {}, {"instance": "cattle-1"}, {"INSTANCE_NAME": "cattle-1"}, {"instance_name": None},
        {"hostname": "cattle-1.example.net"}, {"instance_name ": "cattle-1"},
    ]))


def _not_a_string(rng: random.Random) -> tuple[str, bytes]:
    return "not_a_string", _dump({"instance_name": rng.choice([
        1, 0, -1, 1.5, True, False, ["cattle-1"], {"name": "cattle-1"}, 10**30,
    ])})


def _hostile_name(rng: random.Random) -> tuple[str, bytes]:
    name = rng.choice(HOSTILE_NAMES)
    # Half of them hidden among plausible other fields.
    doc: dict[str, object] = {"instance_name": name}
    if rng.random() < 0.5:
        doc = {"zone": "europe-west1-b", **doc, "reason": "chaos"}
    return "hostile_name", _dump(doc, ascii_only=rng.random() < 0.5)


def _unicode_name(rng: random.Random) -> tuple[str, bytes]:
    name = _unicode_text(rng, rng.randrange(1, 80))
    return "unicode_name", _dump({"instance_name": name}, ascii_only=rng.random() < 0.5)


def _deep(rng: random.Random) -> tuple[str, bytes]:
    depth = rng.choice([1_500, 5_000, 12_000])
    if rng.random() < 0.5:
        return "deep", b"[" * depth + b"]" * depth
    inner = b"[" * depth + b"]" * depth
    return "deep", b'{"instance_name": "cattle-1", "x": ' + inner + b"}"


#: Weighted by repetition; huge ones are few (they cost the emulator most).
BAD_MAKERS: tuple[BadMaker, ...] = (
    *(_not_json, _binary, _empty, _wrong_type, _missing, _not_a_string) * 2,
    *(_hostile_name,) * 4,
    *(_unicode_name, _deep) * 2,
    _huge,
)


def _valid(rng: random.Random, serial: int) -> Payload:
    base = f"good-{serial}"
    style = rng.randrange(5)
    if style == 0:
        name = base.upper()  # a label is case-insensitive
    elif style == 1:
        name = (base + "-" + "a" * 63)[:63].rstrip("-")  # the longest label
    else:
        name = base
    doc: dict[str, object] = {"instance_name": name}
    if style == 3:
        doc = {"extra": [1, {"nested": None}], "instance_name": name, "note": "ünïcödé ✓"}
    data = json.dumps(doc, indent=rng.choice([None, 2])).encode()
    if style == 4:
        data = b" \n\t" + data + b"\n "
    return Payload("valid", data, name)


def generate(count: int, *, seed: int, valid_share: float = 0.25) -> list[Payload]:
    """``count`` payloads, about ``valid_share`` of them valid (each naming a host of its
    own), the rest invalid in every way above, in a seeded random order."""
    rng = random.Random(seed)
    payloads = []
    for serial in range(count):
        if rng.random() < valid_share:
            payloads.append(_valid(rng, serial))
        else:
            kind, data = rng.choice(BAD_MAKERS)(rng)
            payloads.append(Payload(kind, data, None))
    return payloads
