"""The module's terminology (standard codes of the nine segments) in Slicer, on every supported version.

- :func:`ensure_terminology_loaded`: Slicer's ``LoadTerminologyFromFile`` returns an empty context name
  on failure instead of raising, so the result is checked here; the module calls this at startup and
  again before its first segmentation (an extension added without restarting Slicer never saw
  ``startupCompleted()``).
- :func:`set_segment_terminology`: ``vtkSegment.SetTerminology`` exists from Slicer 5.10; Slicer 5.8
  stores the same string under the tag ``vtkSegment.GetTerminologyEntryTagName()``, which 5.10+ still
  reads and writes (``SetTerminology`` is a wrapper around that tag).

MRML/VTK only; no Qt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import anatomy
from .errors import ParaspinalSegError
from .resources import resource

#: The module's own terminology file (Slicer loads it at startup; headless scenes on request).
TERMINOLOGY_FILE = resource("SegmentationCategoryTypeModifier-ParaspinalSeg.term.json")


class TerminologyError(ParaspinalSegError, RuntimeError):
    """The module's terminology file is missing or Slicer could not load it."""


def loaded_terminology_names(terminologies_logic: Any) -> list[str]:
    """Names of the terminology contexts the logic has loaded."""
    import vtk

    names = vtk.vtkStringArray()
    terminologies_logic.GetLoadedTerminologyNames(names)
    return [names.GetValue(i) for i in range(names.GetNumberOfValues())]


def ensure_terminology_loaded(
    terminologies_logic: Any, path: str | Path = TERMINOLOGY_FILE, context: str = anatomy.TERMINOLOGY_CONTEXT
) -> bool:
    """Load ``path`` into Slicer's terminologies logic unless ``context`` is loaded already.

    Returns True if it was loaded now, False if it was there before. Raises :class:`TerminologyError`
    when the file is missing or the load returns another name than ``context`` (Slicer returns "" on
    a parse error).
    """
    if context in loaded_terminology_names(terminologies_logic):
        return False
    path = Path(path)
    if not path.is_file():
        raise TerminologyError(f"terminology file not found: {path}")
    name = terminologies_logic.LoadTerminologyFromFile(str(path))
    if name != context:
        raise TerminologyError(
            f"Slicer could not load the terminology file {path} (it returned {name!r}, expected {context!r}); "
            "segments keep their names and colours but have no standard codes"
        )
    return True


def set_segment_terminology(segment: Any, entry: str) -> None:
    """Give ``segment`` the terminology ``entry`` string, with or without ``vtkSegment.SetTerminology``."""
    setter = getattr(segment, "SetTerminology", None)
    if setter is not None:  # Slicer >= 5.10
        setter(entry)
    else:  # Slicer 5.8: the tag that SetTerminology wraps
        segment.SetTag(segment.GetTerminologyEntryTagName(), entry)
