"""The compressed file: a header, then each segment's coded bytes one after another.

    b"NLMZ" · format version (1 byte) · header length (4 bytes, little-endian)
    · header (UTF-8 JSON) · CRC-32 of the header (4 bytes) · segment payloads

The header holds what decompression needs and checks: the settings the predictor was built
with, the original's length and CRC-32, the segments' lengths and their payloads' sizes, the
prior model's weight hash (if any), and what the probabilities depend on beyond the settings
(torch's version, the thread count, the CPU's vector instructions).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

from neurallm.errors import NlmError

MAGIC = b"NLMZ"
VERSION = 2  # 2: counts read in float16, their normaliser left out (v1 files decode only with the nlm that wrote them)
_FIXED = len(MAGIC) + 1 + 4


@dataclass
class Header:
    length: int  # bytes of the original
    crc32: int  # of the original
    settings: dict
    segments: list[int]  # bytes of the original in each segment
    payloads: list[int]  # coded bytes of each segment
    prior: dict | None  # {"hash": sha256 of the weights, "name": what it was called}
    platform: dict  # {"torch": version, "threads": n, "cpu": vector instructions}

    def pack(self, payloads: list[bytes]) -> bytes:
        body = json.dumps({"length": self.length, "crc32": self.crc32, "settings": self.settings,
                           "segments": self.segments, "payloads": self.payloads, "prior": self.prior,
                           "platform": self.platform}, separators=(",", ":")).encode()
        return b"".join([MAGIC, bytes([VERSION]), struct.pack("<I", len(body)), body,
                         struct.pack("<I", zlib.crc32(body)), *payloads])


def unpack(blob: bytes, source: str) -> tuple[Header, list[bytes]]:
    """-> the header and each segment's payload; a clear error for another format, a newer version,
    a damaged header, or a file cut short or with bytes past its end."""
    if len(blob) < _FIXED or blob[:4] != MAGIC:
        raise NlmError(f"{source}: not a file written by nlm compress (no NLMZ signature)")
    if blob[4] != VERSION:
        raise NlmError(f"{source}: format version {blob[4]}; this nlm reads version {VERSION}")
    size = struct.unpack_from("<I", blob, 5)[0]
    end = _FIXED + size
    if len(blob) < end + 4:
        raise NlmError(f"{source}: cut short inside its header ({len(blob)} bytes)")
    body = blob[_FIXED:end]
    if struct.unpack_from("<I", blob, end)[0] != zlib.crc32(body):
        raise NlmError(f"{source}: the header is damaged (its CRC-32 does not match)")
    try:
        fields = json.loads(body)
        header = Header(**fields)
        segments, payloads = [int(n) for n in header.segments], [int(n) for n in header.payloads]
        if len(segments) != len(payloads) or sum(segments) != header.length or min(segments + payloads, default=0) < 0:
            raise ValueError("segment sizes do not add up")
        if not isinstance(header.settings, dict) or not isinstance(header.platform, dict):
            raise ValueError("settings and platform must be objects")
        threads = header.platform.get("threads")
        if not isinstance(threads, int) or not 1 <= threads <= 1024:
            raise ValueError(f"thread count {threads!r}")
        if header.prior is not None and not (isinstance(header.prior, dict) and isinstance(header.prior.get("hash"), str)):
            raise ValueError("prior must be null or name a weight hash")
    except (ValueError, TypeError) as e:
        raise NlmError(f"{source}: malformed header ({e})") from None
    start, parts = end + 4, []
    for n in payloads:
        parts.append(blob[start:start + n])
        start += n
    if start > len(blob):
        raise NlmError(f"{source}: cut short ({len(blob)} bytes; the header promises {start})")
    if start < len(blob):
        raise NlmError(f"{source}: {len(blob) - start} bytes past the end the header gives (altered or joined)")
    return header, parts


def crc32(data: bytes) -> int:
    return zlib.crc32(data)
