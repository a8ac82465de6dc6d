"""Does a volume file hold exactly the bytes its header promises?

ITK's NIfTI reader fills the missing part of a truncated file with zeros and every reader ignores bytes
after the image data, so a file cut off by a failed copy reads as a plausible volume with wrong areas.
:func:`check_file_complete` compares the header's promise (dimensions × voxel size) with what the file
holds — for compressed files by decompressing to the end (the stream must end where the data ends; a
gzip stream must be complete and pass its CRC) — before anything reads the voxels, so a header that
claims a huge volume is refused without allocating it.

Formats: NIfTI-1/2 (``.nii``, ``.nii.gz``, ``.hdr``/``.img`` pairs), NRRD (``.nrrd``, ``.nhdr`` with
its data file; raw, gzip and bzip2 encodings) and MetaImage (``.mha``, ``.mhd``; raw and zlib). Other
files pass unchecked. The NIfTI header is read at its fixed byte offsets with the standard library
because Slicer's Python (where this also runs) has no nibabel. Standard library and numpy only.
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from .errors import InputError

_CHUNK = 1 << 20

# NIfTI datatype codes with their bits per voxel (nifti1.h); bitpix is checked against these.
_NIFTI_BITS = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32,
               1024: 64, 1280: 64, 1536: 128, 1792: 128, 2048: 256, 2304: 32}

_NRRD_TYPE_BYTES: dict[str, int] = {}
for _names, _n in (
    (("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    (("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
      "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    (("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    (("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
      "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"), 8),
):
    for _name in _names:
        _NRRD_TYPE_BYTES[_name] = _n

_MET_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                   "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                   "MET_DOUBLE": 8}

#: Largest header text read from an NRRD/MetaImage file (real headers are a few kB).
_MAX_TEXT_HEADER = 1 << 20


def _mismatch(path: Path, have: int, want: int, what: str = "image data") -> InputError:
    if have < want:
        pct = 100.0 * have / want if want else 0.0
        return InputError(
            f"{path.name} is truncated: it holds {have} bytes of {what} where its header promises {want} "
            f"({pct:.0f} %); the file is incomplete (interrupted copy or download?)"
        )
    return InputError(
        f"{path.name} is corrupt: it holds {have - want} bytes more {what} than its header describes "
        f"({want}); the header does not match the data"
    )


def _count_stream(path: Path, read: Callable[[int], bytes], limit: int) -> int:
    """Bytes a decompressing reader yields, stopping one chunk past ``limit`` (no zip bomb is read out)."""
    total = 0
    while True:
        chunk = read(_CHUNK)
        if not chunk:
            return total
        total += len(chunk)
        if total > limit:
            return total


def _decompressed_size(path: Path, f: BinaryIO, kind: str, offset: int, limit: int) -> int:
    """Size of the compressed stream of ``kind`` (gzip, bzip2, zlib) starting at ``offset`` in ``f``."""
    f.seek(offset)
    try:
        if kind == "gzip":
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                return _count_stream(path, g.read, limit)
        if kind == "bzip2":
            with bz2.BZ2File(f, mode="rb") as b:
                return _count_stream(path, b.read, limit)
        d = zlib.decompressobj()
        total = 0
        while not d.eof:
            chunk = f.read(_CHUNK)
            if not chunk:
                raise EOFError("compressed data ended before the end-of-stream marker")
            total += len(d.decompress(chunk))
            if total > limit:
                return total
        if d.unused_data.strip(b"\0\n\r ") or f.read(1).strip(b"\0\n\r "):
            raise InputError(f"{path.name} is corrupt: bytes follow the end of its compressed image data")
        return total
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(
            f"{path.name} is truncated or corrupt: its {kind} data cannot be read to the end ({exc}); "
            "the file is incomplete (interrupted copy or download?)"
        ) from None


def _check_size(path: Path, data_path: Path, offset: int, nbytes: int, compression: Optional[str],
                exact: bool = True) -> None:
    if compression is None:
        have = data_path.stat().st_size - offset
        if have < nbytes or (exact and have != nbytes):
            raise _mismatch(path, max(have, 0), nbytes)
        return
    with open(data_path, "rb") as f:
        have = _decompressed_size(path, f, compression, offset, nbytes)
    if have != nbytes:
        raise _mismatch(path, have, nbytes, "decompressed image data")


# ----------------------------------------------------------------------------------------------------
# NIfTI


class NiftiHeader:
    """The NIfTI-1/2 header fields this library reads: endianness, dimensions, datatype, data offset."""

    def __init__(self, endian: str, version: int, dims: tuple[int, ...], datatype: int, bitpix: int,
                 vox_offset: float, single_file: bool, pixdim: tuple[float, ...] = (),
                 qform: Optional[tuple[float, ...]] = None, sform: Optional[tuple[float, ...]] = None) -> None:
        self.endian, self.version, self.dims = endian, version, dims
        self.datatype, self.bitpix, self.vox_offset, self.single_file = datatype, bitpix, vox_offset, single_file
        #: Voxel sizes of the spatial axes; the quaternion + offset and the affine rows when their code is set.
        self.pixdim, self.qform, self.sform = pixdim, qform, sform

    @property
    def data_bytes(self) -> int:
        """Bytes of voxel data the header promises."""
        return math.prod(self.dims) * self.bitpix // 8


def read_nifti_header(raw: bytes, name: str = "file") -> Optional[NiftiHeader]:
    """Parse the first 540 bytes of a NIfTI file; None when they are not a NIfTI header."""
    for endian in ("<", ">"):
        if len(raw) < 4:
            return None
        size = struct.unpack(endian + "i", raw[:4])[0]
        if size == 348 and len(raw) >= 348:
            dim = struct.unpack(endian + "8h", raw[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", raw[70:74])
            pixdim = struct.unpack(endian + "8f", raw[76:108])
            vox_offset = struct.unpack(endian + "f", raw[108:112])[0]
            qcode, scode = struct.unpack(endian + "2h", raw[252:256])
            quatern, srow = struct.unpack(endian + "6f", raw[256:280]), struct.unpack(endian + "12f", raw[280:328])
            magic = raw[344:348]
            version = 1
            break
        if size == 540 and len(raw) >= 540:
            magic = raw[4:8]
            datatype, bitpix = struct.unpack(endian + "2h", raw[12:16])
            dim = struct.unpack(endian + "8q", raw[16:80])
            pixdim = struct.unpack(endian + "8d", raw[104:168])
            vox_offset = struct.unpack(endian + "q", raw[168:176])[0]
            qcode, scode = struct.unpack(endian + "2i", raw[344:352])
            quatern, srow = struct.unpack(endian + "6d", raw[352:400]), struct.unpack(endian + "12d", raw[400:496])
            version = 2
            break
    else:
        return None
    n = dim[0]
    if not 1 <= n <= 7 or any(d < 1 for d in dim[1 : n + 1]):
        raise InputError(f"{name} has a corrupt NIfTI header: dimensions {list(dim[1:max(1, min(n, 7)) + 1])} (dim[0] = {n})")
    if bitpix <= 0 or bitpix % 8 or _NIFTI_BITS.get(datatype, bitpix) != bitpix:
        raise InputError(f"{name} has a corrupt NIfTI header: datatype {datatype} with {bitpix} bits per voxel")
    if not math.isfinite(vox_offset) or vox_offset < 0:
        raise InputError(f"{name} has a corrupt NIfTI header: data offset {vox_offset}")
    single = magic[:3] in (b"n+1", b"n+2")
    spatial = tuple(float(v) for v in pixdim[1 : min(n, 3) + 1])
    if not all(math.isfinite(v) and v != 0 for v in spatial):
        raise InputError(
            f"{name} has a corrupt NIfTI header: voxel sizes {[round(v, 6) for v in spatial]} mm (pixdim) "
            "are not all finite and non-zero, so no area can be measured"
        )
    for code, values, what in ((qcode, quatern, "qform"), (scode, srow, "sform")):
        if code > 0 and not all(math.isfinite(v) for v in values):
            raise InputError(f"{name} has a corrupt NIfTI header: its {what} (orientation) holds NaN or infinite values")
    return NiftiHeader(endian, version, tuple(int(d) for d in dim[1 : n + 1]), int(datatype), int(bitpix),
                       float(vox_offset), single, spatial,
                       tuple(quatern) if qcode > 0 else None, tuple(srow) if scode > 0 else None)


def _check_nifti(path: Path, gz: bool) -> None:
    # Trust the bytes, not the name: ITK reads a gzip stream whatever the file is called.
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    try:
        if gz:
            with gzip.open(path, "rb") as f:
                head = f.read(540)
        else:
            with open(path, "rb") as f:
                head = f.read(540)
    except (EOFError, OSError, zlib.error):
        return  # not even a header: the image reader refuses it with its own message
    header = read_nifti_header(head, path.name)
    if header is None:
        return  # not NIfTI after all: the image reader says what it is
    min_offset = 352 if header.version == 1 else 544
    if header.single_file:
        offset = max(int(header.vox_offset), min_offset)
        if gz:  # the decompressed stream is header, extensions and voxels
            _check_size(path, path, 0, offset + header.data_bytes, "gzip")
        else:
            _check_size(path, path, offset, header.data_bytes, None)
        return
    # A .hdr/.img pair: the voxels are in the .img next to it.
    stem = path.name[: -len(".hdr.gz")] if path.name.lower().endswith(".gz") else path.stem
    for img in (path.with_name(stem + ".img"), path.with_name(stem + ".img.gz")):
        if img.is_file():
            _check_size(path, img, 0 if img.name.endswith(".gz") else int(header.vox_offset), header.data_bytes,
                        "gzip" if img.name.endswith(".gz") else None)
            return
    raise InputError(f"{path.name} is a NIfTI header whose image file {stem}.img is missing")


# ----------------------------------------------------------------------------------------------------
# NRRD and MetaImage (text headers)


def _text_header(path: Path, nrrd: bool) -> tuple[dict[str, str], int]:
    """(fields in lower case, byte offset where the header ends) of an NRRD or MetaImage header."""
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        text = f.read(_MAX_TEXT_HEADER)
    pos = 0
    first = True
    while pos < len(text):
        end = text.find(b"\n", pos)
        if end < 0:
            end = len(text)
        line = text[pos:end].decode("latin-1").rstrip("\r")
        pos = end + 1
        if nrrd:
            if first:
                first = False
                if not line.startswith("NRRD"):
                    return {}, 0
                continue
            if not line:
                return fields, pos
            if line.startswith("#") or ":=" in line:
                continue
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        else:
            key, sep, value = line.partition("=")
            if not sep:
                return {}, 0
            fields[key.strip().lower()] = value.strip()
            if key.strip().lower() == "elementdatafile":
                return fields, pos
    return fields, len(text) if nrrd else 0


def _ints(text: str, name: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split()]
    except ValueError:
        raise InputError(f"{name} has a corrupt header: {what} {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise InputError(f"{name} has a corrupt header: {what} {text!r}")
    return values


def _check_nrrd(path: Path) -> None:
    fields, data_start = _text_header(path, nrrd=True)
    if not fields or "sizes" not in fields or "type" not in fields:
        return  # not an NRRD we can judge: the reader says what is wrong with it
    item = _NRRD_TYPE_BYTES.get(fields["type"].lower())
    encoding = fields.get("encoding", "raw").lower()
    if item is None or encoding not in ("raw", "gzip", "gz", "bzip2", "bz2"):
        return  # block type, text encodings: no byte count to compare
    nbytes = math.prod(_ints(fields["sizes"], path.name, "sizes")) * item
    compression = {"gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}.get(encoding)
    data_file = fields.get("data file", fields.get("datafile"))
    byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")) or 0)
    line_skip = int(fields.get("line skip", fields.get("lineskip", "0")) or 0)
    if data_file is not None:
        if data_file.upper().startswith("LIST") or len(data_file.split()) > 1:
            return  # several data files: not checked
        target = path.with_name(data_file) if not os.path.isabs(data_file) else Path(data_file)
        if not target.is_file():
            raise InputError(f"{path.name} names the data file {data_file}, which does not exist")
        offset = 0
    else:
        target, offset = path, data_start
    if line_skip:
        return  # data start depends on line contents: not checked
    if byte_skip == -1:  # the data are the last bytes of the file
        if compression is None:
            _check_size(path, target, offset, nbytes, None, exact=False)
        return
    _check_size(path, target, offset + max(byte_skip, 0), nbytes, compression)


def _check_metaimage(path: Path) -> None:
    fields, data_start = _text_header(path, nrrd=False)
    if not fields or "dimsize" not in fields or "elementtype" not in fields:
        return
    item = _MET_TYPE_BYTES.get(fields["elementtype"].upper())
    if item is None:
        return
    channels = int(fields.get("elementnumberofchannels", "1") or 1)
    nbytes = math.prod(_ints(fields["dimsize"], path.name, "DimSize")) * item * channels
    compressed = fields.get("compresseddata", "false").lower() == "true"
    data_file = fields.get("elementdatafile", "")
    if data_file.upper() == "LOCAL":
        target, offset = path, data_start
    elif data_file and len(data_file.split()) == 1 and not data_file.upper().startswith("LIST"):
        target, offset = path.with_name(data_file), 0
        if not target.is_file():
            raise InputError(f"{path.name} names the data file {data_file}, which does not exist")
    else:
        return
    _check_size(path, target, offset, nbytes, "zlib" if compressed else None)


def check_file_complete(path: str | os.PathLike) -> None:
    """Raise :class:`InputError` when a NIfTI/NRRD/MetaImage file holds fewer or more bytes of image data
    than its header promises (or its compressed stream does not end properly); other files pass."""
    p = Path(path)
    name = p.name.lower()
    try:
        if name.endswith((".nii", ".hdr", ".nii.gz", ".hdr.gz")):
            _check_nifti(p, gz=name.endswith(".gz"))
        elif name.endswith((".nrrd", ".nhdr")):
            _check_nrrd(p)
        elif name.endswith((".mha", ".mhd")):
            _check_metaimage(p)
    except (OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"cannot check {p.name}: {exc}") from None
