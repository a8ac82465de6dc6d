"""Read image volumes from disk for the command line, and write label volumes on their grid.

Volumes come back as a numpy array in Slicer/SimpleITK order ``arr[k, j, i]`` plus the 4×4 IJK-to-RAS
matrix Slicer would give the same file. ITK works in LPS, Slicer (and this library) in RAS: the first two
rows of ITK's index-to-physical matrix change sign.

Every problem a user can cause (missing file, unreadable file, colour or vector image, 4-D series, a DICOM
folder with several series) raises :class:`~ParaspinalSegLib.errors.InputError` with one clear sentence.
Needs numpy, scipy and SimpleITK only (all three exist in Slicer's Python; scipy through the geometry checks of
:mod:`preprocessing`).
"""

from __future__ import annotations

import contextlib
import errno
import locale
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import InputError
from .file_integrity import check_file_complete, read_nifti_header
from .preprocessing import check_perpendicular_axes

#: File name endings SimpleITK reads that we accept as a single-file volume (lower case).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")

#: ITK (LPS) → Slicer (RAS) physical coordinates.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A scalar volume read from disk.

    ``array`` is ``arr[k, j, i]`` (axis 0 = slices); ``ijk_to_ras`` maps ``(i, j, k, 1)`` to RAS mm.
    ``itk_origin``, ``itk_spacing`` and ``itk_direction`` keep ITK's own (LPS, 3-D) geometry so label
    volumes are written back on exactly the same grid; ``dimension`` is the file's own dimension (2 or 3).
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    path: Path
    name: str
    dimension: int = 3
    itk_origin: tuple[float, ...] = (0.0, 0.0, 0.0)
    itk_spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    itk_direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_slices(self) -> int:
        """Number of slices along k (array axis 0)."""
        return int(self.array.shape[0])

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along (i, j, k) in mm."""
        return tuple(float(np.linalg.norm(self.ijk_to_ras[:3, c])) for c in range(3))  # type: ignore[return-value]


def volume_name(path: str | os.PathLike) -> str:
    """The volume's name for output files: the file name without its volume suffix (folder name for DICOM)."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name or "volume"
    name = p.name
    lower = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)] or "volume"
    return p.stem or "volume"


def ijk_to_ras_from_itk(origin, spacing, direction) -> np.ndarray:
    """4×4 IJK-to-RAS matrix from ITK 3-D geometry (LPS origin, spacing, row-major 3×3 direction)."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d * np.asarray(spacing, dtype=float)[None, :]
    m[:3, 3] = np.asarray(origin, dtype=float)
    return LPS_TO_RAS @ m


def itk_geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """Inverse of :func:`ijk_to_ras_from_itk`: (origin LPS, spacing, row-major direction) for SimpleITK."""
    m = LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError("the IJK-to-RAS matrix has a zero-length axis")
    direction = m[:3, :3] / spacing[None, :]
    return tuple(m[:3, 3].tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def _embed_2d_geometry(image) -> tuple[tuple, tuple, tuple]:
    """3-D ITK geometry of a 2-D image: the slice normal is the cross product of its two axes, 1 mm thick."""
    o = list(image.GetOrigin()) + [0.0]
    s = list(image.GetSpacing()) + [1.0]
    d2 = np.asarray(image.GetDirection(), dtype=float).reshape(2, 2)
    d = np.eye(3)
    d[:2, :2] = d2
    d[:, 2] = np.cross(d[:, 0], d[:, 1])
    return tuple(o), tuple(s), tuple(d.ravel().tolist())


@contextlib.contextmanager
def preserved_locale() -> Iterator[None]:
    """Restore the process's C locale afterwards: GDCM (SimpleITK's DICOM I/O) switches it to "C", which
    turns Python's default text encoding into ASCII for the rest of the process (and Slicer's)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        try:
            locale.setlocale(locale.LC_ALL, saved)
        except locale.Error:  # pragma: no cover - a composite locale string the C library refuses
            for category in (locale.LC_CTYPE, locale.LC_NUMERIC):
                locale.setlocale(category, "")


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """Keep ITK's own warnings (several lines with source paths, e.g. "unexpected scales in sform") off
    stderr: the command line reports each problem once, in its own words."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_dicom_folder(folder: Path, what: str = "an image volume"):
    with preserved_locale():
        return _read_dicom_series(folder, what)


def _read_dicom_series(folder: Path, what: str = "an image volume"):
    import SimpleITK as sitk

    # GDCM warns on stderr ("No Series were found") for folders without DICOM; we say it in one line.
    try:
        with quiet_itk():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:  # pragma: no cover - GDCM error on odd folders
        raise InputError(f"cannot read DICOM folder {folder}: {_first_line(exc)}") from None
    if not series:
        raise InputError(f"{folder} is a folder without DICOM images, not {what} (give {what} file or a DICOM "
                         "series folder)")
    if len(series) > 1:
        raise InputError(
            f"{folder} holds {len(series)} DICOM series ({', '.join(series)}); put one series per folder"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    check_series_layout(files, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with quiet_itk():
            return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read the DICOM series in {folder}: {_first_line(exc)}") from None


def _dicom_slice_info(path: str) -> tuple[tuple[int, ...], Optional[np.ndarray], Optional[np.ndarray]]:
    """(size, position, row/column direction cosines) of one DICOM file, from its header only."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read DICOM file {Path(path).name}: {_first_line(exc)}") from None

    def numbers(tag: str, n: int) -> Optional[np.ndarray]:
        if not reader.HasMetaDataKey(tag):
            return None
        try:
            values = np.array([float(v) for v in reader.GetMetaData(tag).split("\\")], float)
        except ValueError:
            return None
        return values if values.size == n and np.all(np.isfinite(values)) else None

    return tuple(reader.GetSize()), numbers("0020|0032", 3), numbers("0020|0037", 6)


def check_series_layout(files: Sequence[str], folder: Path) -> None:
    """Refuse a DICOM series whose slices do not form one evenly spaced stack.

    Every file must have the same image size and orientation; the positions along the slice normal must
    all differ (a duplicated slice, or several echoes/times at one position, would be stacked as extra
    slices) and be evenly spaced (a missing slice would silently stretch the geometry). Series without
    position tags pass: ITK reports what it can.
    """
    if len(files) < 2:
        return
    infos = [_dicom_slice_info(f) for f in files]
    sizes = {i[0][:2] for i in infos}
    if len(sizes) > 1:
        raise InputError(f"the DICOM series in {folder} mixes image sizes {sorted(sizes)}; give one series of equal slices")
    if any(i[1] is None or i[2] is None for i in infos):
        return
    orient = np.array([i[2] for i in infos])
    if np.abs(orient - orient[0]).max() > 1e-3:
        raise InputError(f"the slices of the DICOM series in {folder} have different orientations; give one stack")
    normal = np.cross(orient[0][:3], orient[0][3:])
    if np.linalg.norm(normal) < 1e-6:
        return
    normal /= np.linalg.norm(normal)
    positions = np.array([float(np.dot(i[1], normal)) for i in infos])
    order = np.argsort(positions)
    gaps = np.diff(positions[order])
    names = [Path(files[n]).name for n in order]
    dup = int(np.argmin(gaps))
    if gaps[dup] < 1e-3:
        raise InputError(
            f"the DICOM series in {folder} has two slices at one position ({names[dup]} and {names[dup + 1]} at "
            f"{positions[order][dup]:.2f} mm along the slice normal): a duplicated slice, or several echoes or "
            "time points in one series; give one image per position"
        )
    step = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - step)))
    if abs(gaps[worst] - step) > max(0.1 * step, 0.01):
        missing = gaps[worst] / step - 1
        what = f"about {missing:.0f} slice(s) missing" if missing >= 0.5 else "uneven slice spacing"
        raise InputError(
            f"the DICOM series in {folder} is not evenly spaced: {gaps[worst]:.2f} mm between {names[worst]} and "
            f"{names[worst + 1]} where the other slices are {step:.2f} mm apart ({what}); {len(files)} files read"
        )


def _first_line(exc: Exception) -> str:
    """ITK exception texts span several lines with source paths; keep the one that says what went wrong."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for n in range(len(lines) - 1, -1, -1):
        # "… .cxx:410: itk::ERROR: NrrdImageIO(0x55fa…): ReadImageInformation: Error reading x.nrrd:" → "Error …"
        m = re.search(r"(?:^|\s)(?:sitk::ERROR|itk::ERROR|Description)\s*:\s*(.+)$", lines[n], re.IGNORECASE)
        if m:
            text = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*(?:ReadImageInformation:\s*)?", "", m.group(1)).strip()
            if text.endswith(":") and n + 1 < len(lines):  # the reader's own last word follows ("[nrrd] f: …")
                text += " " + re.sub(r"^\[\w+\]\s*\w+:\s*", "", lines[-1])
            return text or type(exc).__name__
    return lines[-1] if lines else type(exc).__name__


def _restore_nifti_non_finite(path: Path, array: np.ndarray) -> np.ndarray:
    """Put back the NaN/inf voxels ITK's NIfTI reader silently turns into 0 (so they are refused later).

    Reads the raw voxels of a float NIfTI-1/NIfTI-2 file with numpy (header:
    :func:`file_integrity.read_nifti_header`); any other case returns ``array`` unchanged.
    """
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        header = read_nifti_header(raw[:540], path.name)
    except (OSError, EOFError, InputError):
        return array
    if header is None or not header.single_file:
        return array
    dtype = {16: f"{header.endian}f4", 64: f"{header.endian}f8"}.get(header.datatype)
    offset = int(header.vox_offset)
    if dtype is None or len(raw) < offset + array.size * np.dtype(dtype).itemsize:
        return array
    values = np.frombuffer(raw, dtype=dtype, count=array.size, offset=offset)
    bad = ~np.isfinite(values.reshape(array.shape))
    if not bad.any():
        return array
    restored = array.copy()
    restored[bad] = values.reshape(array.shape)[bad]
    return restored


def read_image(path: str | os.PathLike, what: str = "an image volume"):
    """The SimpleITK image of a file or a DICOM series folder, every failure an :class:`InputError` of one line.

    The one place the command line opens image files (volumes, label images, Dixon images): a missing path,
    a folder without a DICOM series (``what`` names what was expected, e.g. ``"a label image"``), a truncated
    file (:func:`file_integrity.check_file_complete`) and a file ITK cannot read are refused in one sentence.
    Folders are never handed to ``sitk.ReadImage``: ITK's HDF5 reader probes them and prints its C error
    stack (27 ``HDF5-DIAG`` lines) on stderr, which no warning switch turns off.
    """
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file or folder: {p}")
    if p.is_dir():
        return _read_dicom_folder(p, what)
    if not p.is_file():
        raise InputError(f"{p} is not a regular file (a device or pipe?); give {what} file")
    check_file_complete(p)  # before ITK reads: it pads a truncated NIfTI with zeros
    try:
        with quiet_itk():
            return sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise InputError(f"cannot read {p} as {what} ({_first_line(exc)})") from None


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a NIfTI, NRRD (or any SimpleITK-readable) file or a DICOM series folder as a scalar volume.

    Returns a :class:`Volume` whose array is ``arr[k, j, i]`` (a 2-D image becomes one slice) and whose
    ``ijk_to_ras`` is in RAS. Raises :class:`InputError` for a missing or unreadable file, a colour/vector
    or complex image, and a 4-D (time/sequence) image.
    """
    import SimpleITK as sitk

    if not str(path):
        raise InputError("no volume given")
    p = Path(path)
    image = read_image(p)

    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(
            f"{p.name} is a colour/vector image ({image.GetNumberOfComponentsPerPixel()} components per pixel, "
            f"{image.GetPixelIDTypeAsString()}); give a greyscale (scalar) MRI volume"
        )
    if "complex" in image.GetPixelIDTypeAsString().lower():
        raise InputError(f"{p.name} has complex pixels; give a magnitude (scalar) MRI volume")

    dim = image.GetDimension()
    if dim == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise InputError(
                f"{p.name} is a 4-D volume ({size[3]} frames/time points); give one 3-D volume "
                "(extract the frame first)"
            )
        image = sitk.Extract(image, list(size[:3]) + [0], [0, 0, 0, 0])
        dim = 3
    if dim not in (2, 3):
        raise InputError(f"{p.name} is a {dim}-D image; give a 2-D slice or a 3-D volume")

    if dim == 2:
        origin, spacing, direction = _embed_2d_geometry(image)
        array = sitk.GetArrayFromImage(image)[None]
    else:
        origin, spacing, direction = image.GetOrigin(), image.GetSpacing(), image.GetDirection()
        array = sitk.GetArrayFromImage(image)

    if array.dtype.kind == "f" and p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")):
        array = _restore_nifti_non_finite(p, array)

    metadata = {}
    for key in ("Modality", "0008|0060", "0018|0050"):
        if image.HasMetaDataKey(key):
            metadata[key] = image.GetMetaData(key)
    return Volume(
        array=array,
        ijk_to_ras=ijk_to_ras_from_itk(origin, spacing, direction),
        path=p,
        name=volume_name(p),
        dimension=dim,
        itk_origin=tuple(origin),
        itk_spacing=tuple(spacing),
        itk_direction=tuple(direction),
        metadata=metadata,
    )


#: In-plane pixel size (mm) and field of view (mm) outside which a slice cannot be a lumbar MRI slice.
PIXEL_MM_LIMITS = (0.05, 10.0)
FOV_MM_LIMITS = (20.0, 1000.0)
#: Inside the limits but unusual for an axial lumbar slice: measured, with a warning.
PIXEL_MM_USUAL = (0.2, 3.0)
FOV_MM_USUAL = (80.0, 600.0)
MAX_PIXEL_ASPECT = 3.0


def check_slice_geometry(volume: Volume) -> list[str]:
    """Refuse (:class:`InputError`) a volume whose slices cannot be an MRI slice of the lumbar spine;
    return warnings (with the numbers) for unusual but possible geometry.

    Judged on the slice plane (the i and j axes): pixel size and field of view. A 100 mm pixel or a 3 mm
    field of view is a broken header, and areas computed from it would be wrong by orders of magnitude.
    Axes that are not perpendicular (a sheared direction matrix) are refused too
    (:func:`preprocessing.check_perpendicular_axes`): pixel areas here are products of the axes' lengths.
    """
    m = np.asarray(volume.ijk_to_ras, float)
    if not np.all(np.isfinite(m)):
        raise InputError(f"{volume.name} has a geometry with NaN or infinite entries: it cannot be measured")
    # All three axes: the label volume is written back through ITK, whose NIfTI writer replaces a sheared
    # direction matrix by another, rotated one (the labels would land elsewhere than the .seg.nrrd's).
    check_perpendicular_axes(m, volume.name, columns=(0, 1, 2), names=("i", "j", "k"))
    k, j, i = volume.array.shape
    pixel = (float(np.linalg.norm(m[:3, 0])), float(np.linalg.norm(m[:3, 1])))
    fov = (pixel[0] * i, pixel[1] * j)
    where = f"{volume.name}: pixels of {pixel[0]:.3g} x {pixel[1]:.3g} mm, field of view {fov[0]:.3g} x {fov[1]:.3g} mm"
    if min(pixel) < PIXEL_MM_LIMITS[0] or max(pixel) > PIXEL_MM_LIMITS[1]:
        raise InputError(
            f"{where}: pixel size outside {PIXEL_MM_LIMITS[0]}-{PIXEL_MM_LIMITS[1]} mm cannot be an MRI slice "
            "(a wrong or missing spacing in the header?); areas would be wrong, so nothing is measured"
        )
    if min(fov) < FOV_MM_LIMITS[0] or max(fov) > FOV_MM_LIMITS[1]:
        raise InputError(
            f"{where}: a field of view outside {FOV_MM_LIMITS[0]:.0f}-{FOV_MM_LIMITS[1]:.0f} mm cannot hold a "
            "lumbar cross-section (a wrong spacing in the header, or a crop?); nothing is measured"
        )
    warnings = []
    if min(pixel) < PIXEL_MM_USUAL[0] or max(pixel) > PIXEL_MM_USUAL[1]:
        warnings.append(f"{where}: unusual pixel size for a lumbar MRI (usually {PIXEL_MM_USUAL[0]}-{PIXEL_MM_USUAL[1]} mm); check the header")
    if min(fov) < FOV_MM_USUAL[0] or max(fov) > FOV_MM_USUAL[1]:
        warnings.append(f"{where}: unusual field of view for an axial lumbar slice (usually {FOV_MM_USUAL[0]:.0f}-{FOV_MM_USUAL[1]:.0f} mm)")
    if max(pixel) / min(pixel) > MAX_PIXEL_ASPECT:
        warnings.append(f"{where}: pixels {max(pixel) / min(pixel):.1f} times longer than wide; check the header")
    return warnings


def volume_from_array(
    array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "volume", path: Optional[str | os.PathLike] = None
) -> Volume:
    """Wrap an in-memory ``arr[k, j, i]`` and its IJK-to-RAS matrix as a :class:`Volume` (tests, scripts)."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise InputError(f"expected a 2-D or 3-D array, got shape {a.shape}")
    origin, spacing, direction = itk_geometry_from_ijk_to_ras(ijk_to_ras)
    return Volume(a, np.asarray(ijk_to_ras, float), Path(path or name), name, 3, origin, spacing, direction)


def itk_image_like(array: np.ndarray, volume: Volume):
    """A SimpleITK image of ``array`` (k, j, i) on ``volume``'s own grid (2-D for a 2-D file)."""
    import SimpleITK as sitk

    if volume.dimension == 2:
        image = sitk.GetImageFromArray(array[0])
        image.SetOrigin(volume.itk_origin[:2])
        image.SetSpacing(volume.itk_spacing[:2])
        d = np.asarray(volume.itk_direction).reshape(3, 3)
        image.SetDirection(tuple(d[:2, :2].ravel().tolist()))
    else:
        image = sitk.GetImageFromArray(array)
        image.SetOrigin(volume.itk_origin)
        image.SetSpacing(volume.itk_spacing)
        image.SetDirection(volume.itk_direction)
    return image


def write_label_volume(labels: np.ndarray, volume: Volume, path: str | os.PathLike) -> Path:
    """Write ``labels`` (``arr[k, j, i]`` of the volume's shape) as uint8 on the volume's grid and geometry.

    The format follows the file name (``.nii.gz`` → NIfTI, ``.nrrd`` → NRRD, compressed).
    """
    import SimpleITK as sitk

    lab = np.asarray(labels)
    if lab.shape != volume.array.shape:
        raise InputError(f"label array shape {lab.shape} does not match the volume {volume.array.shape}")
    if lab.size and (lab.min() < 0 or lab.max() > 255):
        raise InputError("label values must lie in 0..255")
    image = itk_image_like(lab.astype(np.uint8), volume)
    out = Path(path)
    _write_itk(image, out)
    return out


def write_scalar_volume(array: np.ndarray, volume: Volume, path: str | os.PathLike) -> Path:
    """Write any scalar ``arr[k, j, i]`` of the volume's shape on its grid (keeps the array's dtype)."""
    import SimpleITK as sitk

    a = np.asarray(array)
    if a.shape != volume.array.shape:
        raise InputError(f"array shape {a.shape} does not match the volume {volume.array.shape}")
    _write_itk(itk_image_like(a, volume), Path(path))
    return Path(path)


def _write_itk(image, path: Path) -> None:
    """``sitk.WriteImage`` (compressed) with ITK's failures (disk full, no permission) as an ``OSError``."""
    import SimpleITK as sitk

    try:
        sitk.WriteImage(image, str(path), True)
    except RuntimeError as exc:
        raise OSError(errno.EIO, f"could not write {path.name} ({_first_line(exc)})", str(path)) from None
