"""A real MRML scene without Slicer's GUI (PyPI ``slicer-core``), for the command line and the tests.

Inside the Slicer application none of this is used: the application already owns the scene, the
module logics and ``slicer.mrmlScene``/``slicer.modules``. :func:`install_slicer_shims` refuses to run
there so it can never clobber the real globals.

The initialisation mirrors what Slicer's application does for the module logics the scene writers
need (see ``shared/notes/slicer.md`` section 5): application logic with its selection/interaction
singletons and colour nodes, then subject hierarchy, volumes, segmentations (registers the
segmentation converter rules), markups, tables and units logics. Data IO + cache managers are set so
``scene.ReadFromMRB`` works.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import types
import weakref
from collections.abc import Iterator
from typing import Any, Callable, Optional

from .terminology import TERMINOLOGY_FILE, ensure_terminology_loaded

#: Module logics created for every headless scene, in creation order (subject hierarchy first: it
#: creates the subject hierarchy node the others attach items to).
MODULE_LOGICS: tuple[tuple[str, str], ...] = (
    ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    ("Volumes", "vtkSlicerVolumesLogic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    ("Markups", "vtkSlicerMarkupsLogic"),
    ("Tables", "vtkSlicerTablesLogic"),
    ("Units", "vtkSlicerUnitsLogic"),
)



def running_in_slicer_app() -> bool:
    """True inside the Slicer application (``slicer.app`` exists), False with plain slicer-core."""
    try:
        import slicer
    except ImportError:
        return False
    return getattr(slicer, "app", None) is not None


def create_headless_scene(
    *, terminology: bool = False, cache_dir: Optional[str | os.PathLike] = None
) -> tuple[Any, Any]:
    """Create an MRML scene wired like Slicer's application does, minus Qt.

    Returns ``(scene, app_logic)``. The module logics are registered on ``app_logic``
    (``app_logic.GetModuleLogic("Segmentations")`` …) and kept alive by it (Python references are
    stored on the application logic object, because the C++ side holds them only weakly).

    ``terminology=True`` also creates the terminologies logic and loads ParaspinalSeg's own
    ``.term.json`` (slicer-core ships no terminology files, so the logic logs harmless errors about
    Slicer's default lists). ``cache_dir`` is the remote-cache folder needed by ``ReadFromMRB``; a
    private temporary folder is made when omitted and removed with the application logic (or at exit).
    """
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    # Adds the selection/interaction singletons; markups logic needs them.
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())
    # Volumes logic looks the "Colors" logic up to give new display nodes a colour table.
    app_logic.SetModuleLogic("Colors", app_logic.GetColorLogic())

    logics: dict[str, Any] = {}
    for name, class_name in MODULE_LOGICS:
        logic = getattr(slicer, class_name)()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic

    if terminology:
        term_logic = slicer.vtkSlicerTerminologiesModuleLogic()
        term_logic.SetModuleShareDirectory(str(TERMINOLOGY_FILE.parent))
        term_logic.SetMRMLScene(scene)
        term_logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic("Terminologies", term_logic)
        ensure_terminology_loaded(term_logic, TERMINOLOGY_FILE)
        logics["Terminologies"] = term_logic

    # ReadFromMRB needs a data IO manager with a cache manager ("cannot retrieve remote cache directory").
    if cache_dir is None:
        cache_dir = tempfile.mkdtemp(prefix="paraspinalseg-mrml-cache-")
        # Ours to remove: when the application logic goes, or at the latest when the process exits.
        weakref.finalize(app_logic, shutil.rmtree, cache_dir, True)
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(cache_dir))
    data_io = slicer.vtkDataIOManager()
    data_io.SetCacheManager(cache)
    scene.SetCacheManager(cache)
    scene.SetDataIOManager(data_io)

    # Keep the Python wrappers alive as long as the application logic is.
    app_logic.paraspinalseg_logics = logics
    app_logic.paraspinalseg_io = (cache, data_io)
    return scene, app_logic


def module_logics(app_logic: Any) -> dict[str, Any]:
    """The module logics created by :func:`create_headless_scene`, by module name."""
    return dict(getattr(app_logic, "paraspinalseg_logics", {}))


def install_slicer_shims(scene: Any, app_logic: Any) -> Callable[[], None]:
    """Point ``slicer.mrmlScene`` and ``slicer.modules`` at a headless scene; return a restore function.

    Some ``slicer.util`` helpers read these globals. Refuses inside the Slicer application, where the
    globals are real. Call the returned function (or use :func:`slicer_shims`) to put back exactly
    what was there before.
    """
    import slicer

    if running_in_slicer_app():
        raise RuntimeError("install_slicer_shims is for slicer-core (command line, tests), not the Slicer application")
    missing = object()
    previous = {name: getattr(slicer, name, missing) for name in ("mrmlScene", "modules")}
    modules = {
        name.lower(): types.SimpleNamespace(logic=(lambda lg=logic: lg))
        for name, logic in module_logics(app_logic).items()
    }
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**modules)

    def restore() -> None:
        for name, value in previous.items():
            if value is missing:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)

    return restore


@contextlib.contextmanager
def slicer_shims(scene: Any, app_logic: Any) -> Iterator[Any]:
    """Context manager form of :func:`install_slicer_shims`; yields the scene."""
    restore = install_slicer_shims(scene, app_logic)
    try:
        yield scene
    finally:
        restore()


class SceneSession:
    """One headless MRML scene for many slices (a batch): created on first use, cleared between slices.

    Building a scene and its module logics for every slice cost more than the slice's own scene work;
    :meth:`clear` removes every node the slice added (``Clear(0)`` keeps the singletons: colour tables,
    selection and interaction nodes), so each slice starts from the same empty scene. The remote-cache
    folder is private to the session and removed by :meth:`close` (or leaving the ``with`` block).
    """

    def __init__(self) -> None:
        self._scene: Any = None
        self._app_logic: Any = None
        self._cache: Optional[tempfile.TemporaryDirectory] = None

    def scene(self) -> Any:
        """The session's scene (created on the first call)."""
        if self._scene is None:
            self._cache = tempfile.TemporaryDirectory(prefix="paraspinalseg-mrml-cache-")
            self._scene, self._app_logic = create_headless_scene(cache_dir=self._cache.name)
        return self._scene

    def clear(self) -> None:
        """Remove every node a slice added; the scene and its logics stay for the next slice."""
        if self._scene is not None:
            self._scene.Clear(0)

    def close(self) -> None:
        """Clear the scene completely and drop it (a later :meth:`scene` call makes a new one)."""
        if self._scene is not None:
            self._scene.Clear(1)
        self._scene = self._app_logic = None
        if self._cache is not None:
            self._cache.cleanup()
            self._cache = None

    def __enter__(self) -> "SceneSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
