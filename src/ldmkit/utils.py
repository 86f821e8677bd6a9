"""Small helpers shared across ldmkit that belong to no one module.

`format_seconds` writes an estimated duration as a person reads it. `safe_filename` turns untrusted text (a caption, a prompt, a class name from a user's folder) into
one harmless file name, so that nothing derived from it can point outside the chosen output folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata

# Names Windows refuses for a file whatever its extension (CON.png is the console).
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}


def safe_filename(text: str, *, max_len: int = 80, default: str = "untitled") -> str:
    """One path component made of [A-Za-z0-9._-] only, for untrusted `text`.

    Separators, `..`, NUL and every other character outside that set become `_`; leading dots and
    dashes are dropped (no hidden files, no option-like names); text longer than `max_len` is cut
    and given an 8-hex-digit hash of the full text, so distinct long captions stay distinct.
    Empty results become `default`. Add your own extension after it.
    """
    if max_len < 16:
        raise ValueError(f"max_len must be at least 16, got {max_len}")
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_text)
    name = re.sub(r"\.{2,}", ".", name)  # no ".." anywhere
    name = name.lstrip(".-_").rstrip(". _") or default
    if name.split(".")[0].lower() in _RESERVED:
        name = "_" + name
    if len(name) > max_len:
        digest = hashlib.sha1(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:8]
        name = name[: max_len - 9].rstrip("._-") + "-" + digest
    return name


def format_seconds(seconds: float) -> str:
    """A duration as a person reads it: '40 s', '12 min', '3.5 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def hash_file(digest: hashlib._Hash, path: str | os.PathLike) -> None:
    """Feed a file's bytes to a hashlib digest, 1 MiB at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    hash_file(digest, path)
    return digest.hexdigest()
