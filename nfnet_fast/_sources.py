"""The digest of the extension's C++ sources (csrc/), which the build compiles into ``nfnet_fast._C`` as
``SOURCES_DIGEST``. On loading the extension from a checkout (``pip install -e .``), nfnet_fast compares it
with the digest of csrc/ as it is now: an extension built from other sources (a ``git pull`` or an edit
without a rebuild, a prebuilt ``_C.so`` carried from an older commit) could register ops with other schemas
or other semantics, so it is refused with a line that says to rebuild, rather than run.

This module imports nothing from nfnet_fast or torch: setup.py loads it by path, before torch's build
machinery, and bench/gpu_report.sh to check a prebuilt ``_C.so``."""
from __future__ import annotations

import hashlib
import os
from typing import Optional

CHECKOUT_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")  # what setup.py compiles and includes; editors' files are not


def digest(csrc: str = CHECKOUT_CSRC) -> Optional[str]:
    """16 hex digits of SHA-256 over the C++ and CUDA sources of ``csrc`` (names and bytes, in name order; not
    hidden files, editor backups or swap files), or None where there is no such folder with the extension's
    module source (an installed wheel ships no csrc/)."""
    if not os.path.isfile(os.path.join(csrc, "module.cpp")):
        return None
    h = hashlib.sha256()
    for name in sorted(os.listdir(csrc)):
        if name.startswith(".") or not name.endswith(SOURCE_SUFFIXES):
            continue
        try:
            with open(os.path.join(csrc, name), "rb") as f:
                data = f.read()
        except (FileNotFoundError, IsADirectoryError):  # (gone between the listing and the read: not a source)
            continue
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def mismatch(extension, csrc: str = CHECKOUT_CSRC) -> str:
    """Why ``extension`` (the loaded ``nfnet_fast._C``) must not run with the sources of ``csrc``, or ""
    where it may: it was built from them, or there are none to compare with."""
    here = digest(csrc)
    built = getattr(extension, "SOURCES_DIGEST", None)
    if here is None or built == here:
        return ""
    return (f"nfnet_fast._C was built from other C++ sources than {csrc} holds now (built from {built}, the "
            f"sources are {here}); rebuild it with `pip install --no-build-isolation -e .`")
