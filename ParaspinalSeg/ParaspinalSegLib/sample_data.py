"""The shipped sample slice as a Slicer Sample Data source (category "ParaspinalSeg").

A first-time user opens Sample Data, clicks the ParaspinalSeg thumbnail and has an axial lumbar slice to
segment, without their own data and without network: the file ships with the extension, so the URI is a
``file://`` URI of the installed copy (Sample Data's own tests register local files the same way), and the
recorded SHA-256 makes Sample Data refuse a damaged copy. :func:`registration_arguments` returns the
keyword arguments of ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` (Slicer 5.8–5.12 take
the same ones); the module passes them on at startup.
"""

from __future__ import annotations

import hashlib
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

RESOURCES = Path(__file__).resolve().parent.parent / "Resources"
SAMPLE_FILE = RESOURCES / "Sample" / "TUM01_sample_inphase.nrrd"
#: Thumbnail shown in the Sample Data module: the sample slice itself (grey values only).
THUMBNAIL_FILE = RESOURCES / "Icons" / "SampleTUM01.png"
#: SHA-256 of SAMPLE_FILE as shipped (tests check it against the file).
SAMPLE_SHA256 = "d06ad91c73943e75af0240e6cc978afaaef0817079578226dc28e978f39d88fc"
CATEGORY = "ParaspinalSeg"
SAMPLE_NAME = "ParaspinalSeg lumbar slice (TUM01, in-phase Dixon)"
NODE_NAME = "TUM01_sample_inphase"


def file_uri(path: str | Path) -> str:
    """``file:`` URI of a local path (what ``urllib.request.urlretrieve`` in Sample Data can open)."""
    return urllib.parse.urljoin("file:", urllib.request.pathname2url(str(Path(path).resolve())))


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def registration_arguments(sample_file: str | Path = SAMPLE_FILE, thumbnail: str | Path = THUMBNAIL_FILE) -> dict[str, Any]:
    """Keyword arguments for ``SampleDataLogic.registerCustomSampleDataSource``."""
    return dict(
        category=CATEGORY,
        sampleName=SAMPLE_NAME,
        uris=[file_uri(sample_file)],
        fileNames=[Path(sample_file).name],
        nodeNames=[NODE_NAME],
        thumbnailFileName=str(thumbnail),
        loadFileTypes=["VolumeFile"],
        checksums=[f"SHA256:{SAMPLE_SHA256}"],
    )
