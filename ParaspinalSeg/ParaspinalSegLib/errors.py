"""The library's exception classes.

Every error the library raises on purpose derives from :class:`ParaspinalSegError`, so callers (the
Slicer module, the command line) can show its message as it is and treat anything else as a bug.
The classes also derive from the matching built-in exception (``ValueError``, ``ImportError``) so
ordinary ``except ValueError`` code keeps working.

This module imports nothing heavy: the Slicer module imports it in a Python without torch.
"""

from __future__ import annotations

#: The torch version the project is developed and tested with (CPU wheel).
TORCH_VERSION_HINT = "2.13.0"

TORCH_INSTALL_HINT = (
    "PyTorch is needed to run the segmentation network. "
    "In 3D Slicer, install the 'PyTorch' extension (Extensions Manager) and use its installer "
    "(PyTorch Utils module), then restart Slicer. "
    f"Outside Slicer: pip install torch=={TORCH_VERSION_HINT} "
    "--index-url https://download.pytorch.org/whl/cpu (CPU build)."
)


class ParaspinalSegError(Exception):
    """Base class of every error ParaspinalSeg raises on purpose (its message is meant for users)."""


class InputError(ParaspinalSegError, ValueError):
    """The image or geometry given to the library cannot be processed (empty, NaN, wrong shape, ...)."""


class NonAxialSliceError(InputError):
    """The slice is not (close to) axial: its normal is not closest to the patient's S axis."""


class SceneWriteError(InputError):
    """Bad input to a scene writer (segmentation, ROI boxes, measurement table); raised before the scene is modified."""


class WeightsError(ParaspinalSegError, ValueError):
    """A weights file or its JSON config is missing, corrupt, tampered with or does not fit the code."""


class TorchMissingError(ParaspinalSegError, ImportError):
    """PyTorch is not installed; the message says how to install it."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or TORCH_INSTALL_HINT)


SCIKIT_IMAGE_REQUIREMENT = "scikit-image>=0.23"

SCIKIT_IMAGE_INSTALL_HINT = (
    "scikit-image is needed for this step (fat thresholds, clean-up of the segments, overlay contours). "
    "In 3D Slicer, the module offers to install it on first use (or run "
    f"slicer.util.pip_install('{SCIKIT_IMAGE_REQUIREMENT}') in the Python console). "
    f"Outside Slicer: pip install '{SCIKIT_IMAGE_REQUIREMENT}'."
)


class ScikitImageMissingError(ParaspinalSegError, ImportError):
    """scikit-image is not installed; the message says how to install it."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or SCIKIT_IMAGE_INSTALL_HINT)


def import_skimage():
    """Import and return ``skimage`` (with ``filters``, ``measure``, ``morphology`` loaded), or raise
    :class:`ScikitImageMissingError` with an install hint.

    Library modules that the Slicer module imports at load call this inside their functions, never at
    import time: Slicer's Python has no scikit-image until the module installs it (after asking).
    """
    try:
        import skimage
        import skimage.filters
        import skimage.measure
        import skimage.morphology
    except ImportError as exc:
        raise ScikitImageMissingError(f"{SCIKIT_IMAGE_INSTALL_HINT} (import failed: {exc})") from exc
    return skimage


def import_torch():
    """Import and return ``torch``, raising :class:`TorchMissingError` with an install hint if absent."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is installed in the development env
        raise TorchMissingError(f"{TORCH_INSTALL_HINT} (import failed: {exc})") from exc
    return torch


class OutputExistsError(ParaspinalSegError):
    """An output file or folder already exists and the user did not ask to replace it (``--overwrite``)."""


class OutputFolderLockedError(ParaspinalSegError):
    """Another run holds the lock on the output folder; the message names the holder."""


class Interrupted(BaseException):
    """SIGINT / SIGTERM arrived. A ``BaseException`` (like ``KeyboardInterrupt``) so that no
    ``except Exception`` records it as a failed row; :attr:`exit_code` is ``128 + signal number``."""

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = int(signum)
        try:
            self.signal_name = signal.Signals(self.signum).name
        except ValueError:  # pragma: no cover - a signal number this platform does not name
            self.signal_name = f"signal {self.signum}"
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 130 for SIGINT (Ctrl-C), 143 for SIGTERM."""
        return 128 + self.signum
