"""Where the shipped files (model, terminology, sample slice) are, in a checkout, in Slicer and in a wheel.

In the Slicer extension and a source checkout they sit in ``ParaspinalSeg/Resources`` next to this package;
a wheel (``pip install .``) carries the same folder inside the package as ``ParaspinalSegLib/Resources``
(``pyproject.toml`` maps it as package data). :func:`resource` looks in both, so the shipped model is
found however the library was installed.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RESOURCE_DIRS", "resource"]

_HERE = Path(__file__).resolve().parent

#: Checkout / Slicer extension first, then the copy inside an installed wheel.
RESOURCE_DIRS: tuple[Path, ...] = (_HERE.parent / "Resources", _HERE / "Resources")


def resource(relative: str) -> Path:
    """The path of a shipped file (e.g. ``"Models/bsesnet_default.json"``): the first that exists, else the
    checkout's (so a message can name where it was expected)."""
    for folder in RESOURCE_DIRS:
        candidate = folder / relative
        if candidate.exists():
            return candidate
    return RESOURCE_DIRS[0] / relative
