"""What a file is, from its first bytes: for errors that say "a PNG image, not a checkpoint".

Readers that fail on a user's file name what they found instead of what they expected; this
module owns the guess, so every reader words it the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

#: bytes a file is judged by
HEAD_BYTES = 4096

ZIP_MAGIC = b"PK\x03\x04"

# first bytes of formats a user may hand a reader by mistake, and what to call them
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
          (b"GIF8", "a GIF image"), (b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"),
          (b"MM\x00*", "a TIFF image"), (b"RIFF", "a RIFF file (WebP image or audio)"),
          (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"),
          (b"\x89HDF", "an HDF5 file"), (b"\x7fELF", "a program (ELF)"),
          (ZIP_MAGIC, "a zip archive (a PyTorch checkpoint?)"))


def read_head(path: Union[str, Path]) -> bytes:
    """The first bytes of `path` (OSError when it cannot be read)."""
    with open(path, "rb") as handle:
        return handle.read(HEAD_BYTES)


def text_kind(head: bytes) -> Optional[str]:
    """'a JSON text file', 'a text file' or None when `head` holds binary bytes."""
    if not head or b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        # a multi-byte character cut by the end of the sample is still text
        if error.start < len(head) - 4:
            return None
        text = head[:error.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text)
    if not text or printable < 0.95 * len(text):
        return None
    return "a JSON text file" if text.lstrip()[:1] in ("{", "[") else "a text file"


def describe(head: bytes) -> Optional[str]:
    """'a PNG image', 'a text file', … or None when the bytes match nothing known."""
    if not head:
        return "an empty file"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return text_kind(head)
