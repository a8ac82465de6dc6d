"""A wheel (``pip install .``, not editable) carries the shipped model, terminology, sample and the trainer's
configs, and the library finds them there: ``paraspinalseg segment`` runs from the installed files alone.

The wheel is built here with the test environment's setuptools (no network: ``--no-build-isolation``);
``.ci/run`` additionally installs it into a fresh virtual environment and runs the console script.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SHIPPED = ("ParaspinalSegLib/Resources/Models/bsesnet_default.json",
           "ParaspinalSegLib/Resources/Models/bsesnet_default.safetensors",
           "ParaspinalSegLib/Resources/SegmentationCategoryTypeModifier-ParaspinalSeg.term.json",
           "ParaspinalSegLib/Resources/Sample/TUM01_sample_inphase.nrrd",
           "training/configs/bsesnet.json", "training/configs/unet.json")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    if not (REPO / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    source = tmp_path_factory.mktemp("source")
    # A copy, so the build's build/ and *.egg-info never land in the checkout.
    skip = shutil.ignore_patterns(".git", ".venv", "runs", "out", "build", "dist", "__pycache__", "*.egg-info",
                                  ".pytest_cache", "Testing", "docs")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    for folder in ("ParaspinalSeg", "training"):
        shutil.copytree(REPO / folder, source / folder, ignore=skip)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), "."],
                   cwd=source, check=True, capture_output=True, text=True)
    (built,) = dist.glob("paraspinalseg-*.whl")
    return built


def test_wheel_carries_model_and_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in SHIPPED if n not in names]
    assert not missing, f"not in the wheel: {missing}"


def test_installed_files_alone_segment_the_sample(wheel, tmp_path):
    """Unpacked (what pip install does), the wheel loads the shipped weights and segments the sample."""
    pytest.importorskip("torch")
    pytest.importorskip("slicer")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    check = (
        "import ParaspinalSegLib, training.config as c; from ParaspinalSegLib.weights import read_weights_config;"
        f"assert ParaspinalSegLib.__file__.startswith({str(site)!r}), ParaspinalSegLib.__file__;"
        "print(read_weights_config(None).weights_path); print(c.load_config('bsesnet')['epochs'])"
    )
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert str(site) in out.stdout
    sample = site / "ParaspinalSegLib/Resources/Sample/TUM01_sample_inphase.nrrd"
    run = subprocess.run([sys.executable, "-m", "ParaspinalSegLib.cli", "segment", str(sample), "--out", str(tmp_path / "out"),
                          "--device", "cpu", "--threads", "1"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out/TUM01_sample_inphase.seg.nrrd").is_file()
    assert "structures found" in run.stdout
