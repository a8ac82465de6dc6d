"""Shared pytest fixtures: real headless MRML scenes (PyPI ``slicer-core``, no Slicer GUI) and tiny weights.

Tests that do not use a fixture are unaffected: ``slicer`` and ``torch`` are imported lazily, so a
missing slicer-core or torch skips only the tests that ask for a scene or for weights.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import numpy as np
import pytest

# The whole session (and every subprocess it starts) uses a temporary folder of its own, so that the
# check at the end sees only what this test run left, not other programs on the machine.
SESSION_TMP = tempfile.mkdtemp(prefix="pytest-session-tmp-")
os.environ["TMPDIR"] = SESSION_TMP
tempfile.tempdir = SESSION_TMP


def leftover_temp_entries(folder: str = SESSION_TMP) -> list[str]:
    """``paraspinalseg*`` entries in ``folder`` (what the library's temporary files are called)."""
    return sorted(n for n in os.listdir(folder) if n.lower().startswith(("paraspinalseg", ".paraspinalseg")))


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fail the run if any test (or the code it ran) left a ``paraspinalseg*`` entry in the temp folder."""
    gc.collect()  # headless scenes made without a cache folder remove theirs when collected
    left = leftover_temp_entries()
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"temporary entries left behind in {SESSION_TMP}: {', '.join(left)}"
        if reporter is not None:
            reporter.write_line(f"ERROR: {message}", red=True)
        else:  # pragma: no cover
            print(message)
    elif exitstatus == 0:
        shutil.rmtree(SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def load_tool() -> Callable[[str], Any]:
    """Factory: ``load_tool("make_golden")`` → the module ``tools/make_golden.py`` of this checkout (the
    ``tools/`` scripts are not a package, so tests load them by path)."""
    import importlib.util
    from pathlib import Path

    tools = Path(__file__).resolve().parents[3] / "tools"

    def factory(name: str) -> Any:
        spec = importlib.util.spec_from_file_location(name, tools / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return factory


#: A tiny BS-ESNet (base width 4): random weights stand in for trained ones in tests that check
#: plumbing (geometry, files, scene), never accuracy.
TINY_NETWORK = dict(base_width=4, depth=4, prelim_width=8, detector_width=4, detector_hidden=8, detector_pool=2)


@pytest.fixture(scope="session")
def save_tiny_weights() -> Callable[..., Any]:
    """Factory: ``save_tiny_weights(stem, preset="bsesnet", spacing_mm=3.0, size=64, structures_learned=range(1, 10))``
    → the ``.json`` path of randomly initialised (seed 0) tiny weights saved in the library format."""
    torch = pytest.importorskip("torch")
    from ParaspinalSegLib.network import NetworkConfig, build_network
    from ParaspinalSegLib.preprocessing import ModelInput
    from ParaspinalSegLib.weights import save_weights

    def factory(stem, preset: str = "bsesnet", spacing_mm: float = 3.0, size: int = 64, structures_learned=range(1, 10)):
        torch.manual_seed(0)
        model = build_network(getattr(NetworkConfig, preset)(**TINY_NETWORK))
        return save_weights(model, stem, model_input=ModelInput(spacing_mm=spacing_mm, size=size), structures_learned=structures_learned)

    return factory


@pytest.fixture
def tampered_weights(tmp_path) -> Callable[[Any], Any]:
    """Factory: a copy of weights ``json_path`` (JSON + tensors) in ``tmp_path/bad`` with one tensor byte
    changed (same size, same layout, wrong checksum: refused when the model loads); returns the JSON path."""

    def factory(json_path):
        from pathlib import Path

        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        for suffix in (".json", ".safetensors"):
            (bad / f"tiny{suffix}").write_bytes(Path(json_path).with_suffix(suffix).read_bytes())
        data = bytearray((bad / "tiny.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (bad / "tiny.safetensors").write_bytes(bytes(data))
        return bad / "tiny.json"

    return factory


@pytest.fixture
def mrml_headless(tmp_path) -> Iterator[tuple[Any, Any]]:
    """``(scene, app_logic)``: a fresh headless MRML scene per test.

    ``slicer.mrmlScene``/``slicer.modules`` point at it during the test (for ``slicer.util`` helpers)
    and are put back afterwards, so tests never see each other's scenes.
    """
    pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")
    from ParaspinalSegLib import headless

    scene, app_logic = headless.create_headless_scene(cache_dir=tmp_path / "mrml-cache")
    restore = headless.install_slicer_shims(scene, app_logic)
    try:
        yield scene, app_logic
    finally:
        restore()
        scene.Clear(True)


@pytest.fixture
def mrml_scene(mrml_headless) -> Any:
    """A fresh headless ``vtkMRMLScene`` per test (see ``mrml_headless``)."""
    return mrml_headless[0]


def _ijk_to_ras(directions: np.ndarray, spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.asarray(directions, float) * np.asarray(spacing, float)
    m[:3, 3] = origin
    return m


@pytest.fixture
def make_volume() -> Callable[..., Any]:
    """Factory: ``make_volume(scene, shape=(K, J, I), directions=3x3, spacing=(si, sj, sk), origin=None,
    name="T2", array=None, components=1)`` → a scalar volume node in the scene.

    ``origin=None`` centres the volume on RAS (0, 0, 0). ``array`` (K, J, I) sets the voxels (random
    int16 otherwise). ``components=3`` makes an RGB-like vector volume for negative tests.
    """

    def factory(
        scene,
        shape: Sequence[int] = (4, 24, 28),
        directions: Any = ((-1, 0, 0), (0, -1, 0), (0, 0, 1)),
        spacing: Sequence[float] = (0.8, 0.7, 4.0),
        origin: Any = None,
        name: str = "T2",
        array: Any = None,
        components: int = 1,
    ):
        import vtk
        from vtk.util import numpy_support

        k, j, i = (int(v) for v in shape)
        directions = np.asarray(directions, float)
        if origin is None:
            centre_offset = directions * np.asarray(spacing, float) @ (np.array([i, j, k], float) - 1) / 2
            origin = -centre_offset
        m = _ijk_to_ras(directions, spacing, origin)
        class_name = "vtkMRMLScalarVolumeNode" if components == 1 else "vtkMRMLVectorVolumeNode"
        node = scene.AddNewNodeByClass(class_name, name)
        image = vtk.vtkImageData()
        image.SetDimensions(i, j, k)
        image.AllocateScalars(vtk.VTK_SHORT, components)
        if array is None:
            array = np.random.default_rng(0).integers(0, 500, size=(k, j, i, components) if components > 1 else (k, j, i))
        values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        values[:] = np.asarray(array, dtype=np.int16).reshape(values.shape)
        node.SetAndObserveImageData(image)
        node.SetIJKToRASMatrix(vtk_matrix(m))
        node.CreateDefaultDisplayNodes()
        return node

    return factory


def vtk_matrix(m: np.ndarray):
    """numpy 4x4 → vtkMatrix4x4."""
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r][c]))
    return out
