"""Choices the module panel makes, as data the Slicer shell applies: where the table is shown, which
volume is picked by default, whether an installed PyTorch and the running Slicer are recent enough.

No Qt and no ``slicer.app``: the shell passes in what it reads from Slicer (layout ids, layout
descriptions, nodes) and applies what comes back, so the headless tests check the choice itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

#: vtkMRMLLayoutNode.SlicerLayoutFourUpTableView: the Red view, the 3-D view, Green and a table (the
#: fallback when Slicer's own choice would hide the Red view).
FOUR_UP_TABLE_VIEW = 34

#: Oldest PyTorch the network code runs with (``torch.load(weights_only=True)`` defaults, SDPA, ...).
MINIMUM_TORCH_VERSION = "2.2"


@dataclass(frozen=True)
class TablePresentation:
    """How the shell shows the measurement table: switch to ``layout`` (if it is not the current
    one), make ``table_id`` the active table, show column titles (with units) as headers."""

    layout: int
    table_id: str
    change_layout: bool
    use_column_titles_as_headers: bool = True


def layout_shows(description: str, view: str) -> bool:
    """Whether a layout description (Slicer's layout XML) holds ``view``: "Red" or "table"."""
    if view == "table":
        return 'class="vtkMRMLTableViewNode"' in description
    return re.search(rf'class="vtkMRMLSliceNode"[^>]*singletontag="{re.escape(view)}"', description) is not None


def table_presentation(
    current_layout: int,
    table_id: str,
    describe_layout: Callable[[int], str],
    slicer_layout_with_table: Callable[[int], int],
) -> TablePresentation:
    """Where to show the measurement table without losing the Red view (the slice being segmented).

    ``describe_layout(id)`` is the layout node's ``GetLayoutDescription``; ``slicer_layout_with_table``
    is the Tables logic's ``GetLayoutWithTable`` (what Segment Statistics switches to). Slicer's choice
    is kept when it shows both the table and the Red view; the 3-D-only layout would become "3D +
    table" there, so the four-up table layout is used instead.
    """
    current = describe_layout(current_layout)
    if layout_shows(current, "table") and layout_shows(current, "Red"):
        return TablePresentation(current_layout, table_id, change_layout=False)
    candidate = slicer_layout_with_table(current_layout)
    description = describe_layout(candidate)
    if not (layout_shows(description, "table") and layout_shows(description, "Red")):
        candidate = FOUR_UP_TABLE_VIEW
    return TablePresentation(candidate, table_id, change_layout=candidate != current_layout)


def is_listed_input_volume(node: Any) -> bool:
    """Whether the input selector lists ``node``: exactly a scalar volume (the selector shows no child
    classes: labelmaps, vector/RGB, diffusion volumes), with one component per voxel."""
    if node is None or node.GetClassName() != "vtkMRMLScalarVolumeNode":
        return False
    image = node.GetImageData()
    return image is None or image.GetNumberOfScalarComponents() == 1


def default_input_volume(nodes: Iterable[Any]) -> Optional[Any]:
    """The first node the input selector lists (None if there is none), for a panel opened with no input."""
    return next((node for node in nodes if is_listed_input_volume(node)), None)


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\s*(\d+(?:\.\d+)*)", str(version))
    if match is None:
        raise ValueError(f"not a version number: {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def torch_version_problem(installed: str, minimum: str = MINIMUM_TORCH_VERSION) -> str:
    """Why an installed PyTorch cannot be used ("" if it can): older than ``minimum`` or unreadable.

    Local version labels (``2.4.1+cu121``) and pre-releases (``2.6.0a0``) count by their release number.
    """
    try:
        ok = _release(installed) >= _release(minimum)
    except ValueError:
        return f"PyTorch reports an unreadable version {installed!r}; reinstall it with the PyTorch Utils module."
    if ok:
        return ""
    return (
        f"PyTorch {installed} is installed, but ParaspinalSeg needs {minimum} or newer. Open the PyTorch Utils "
        f"module, uninstall PyTorch, install it with the version requirement '>={minimum}', then restart Slicer."
    )


#: Oldest Slicer the module supports: every Slicer API it calls exists there (README "Supported versions").
MINIMUM_SLICER_VERSION = (5, 8)


def slicer_version_problem(major: int, minor: int, minimum: tuple[int, int] = MINIMUM_SLICER_VERSION) -> str:
    """Why this Slicer is too old for the module ("" if it is supported)."""
    if (int(major), int(minor)) >= tuple(minimum):
        return ""
    return (f"ParaspinalSeg needs 3D Slicer {minimum[0]}.{minimum[1]} or newer; this is Slicer {major}.{minor}. "
            "Install a current Slicer release to use the module.")
