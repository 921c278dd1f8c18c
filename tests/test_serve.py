"""`liteasr serve` end to end: real servers on real sockets (uvicorn in a thread, or the CLI in a subprocess),
driven by the official `openai` client, with the real tiny.en (and base for translation).

Every check compares with what `liteasr transcribe` (transcribe()) gives on the same file. CPU time is kept
small: a pool of short speech-dev clips, one ~45-s clip made by concatenating clips, and references computed
once per session. A 30-s window costs about the same however short the clip, so the test counts windows.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

openai = pytest.importorskip("openai")  # the dev extra installs it, with fastapi/uvicorn
uvicorn = pytest.importorskip("uvicorn")

from liteasr.audio import SAMPLE_RATE, load_audio  # noqa: E402
from liteasr.serve import BatchOptions, ServeOptions, build_app  # noqa: E402
from liteasr.transcribe import render, transcribe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# a live server


class LiveServer:
    """build_app(models, options) served by uvicorn on a free port of 127.0.0.1, in a thread."""

    def __init__(self, models, options: ServeOptions = ServeOptions()) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = build_app(models, options)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        wait_healthy(self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def client(self, api_key: str = "unused", **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=300, **kw)

    def health(self) -> dict:
        return get_json(self.url + "/health")[1]


def get_json(url: str, headers: dict | None = None) -> tuple[int, dict]:
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/" + url.split("//")[1].split("/", 1)[1], headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, json.loads(body) if body.startswith(b"{") else body.decode()


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if get_json(url + "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}/health not 200 after {timeout} s")


def metric(url: str, name: str) -> dict[tuple, float]:
    """{label tuple: value} of one metric family's samples on /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = get_json(url + "/metrics")[1]
    return {(s.name, *sorted(s.labels.items())): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith(name)}


class Wrapped:
    """`model` whose decode first calls before(mel (B, n_mels, 3000)): to count windows, be slow, or fail."""

    def __init__(self, model, before) -> None:
        self.model, self.before = model, before

    def __getattr__(self, name):
        return getattr(self.model, name)

    def decode(self, mel, options, languages, *rest):  # rest: per-window prompts, where decode takes them
        from liteasr.decoding import decode

        self.before(mel)
        return decode(self.model, mel, options, languages, *rest)


def slow(model, seconds: float) -> Wrapped:
    """Every decoder call takes at least `seconds` longer: timing-dependent tests behave alike on any CPU."""
    return Wrapped(model, lambda mel: time.sleep(seconds))


# ---------------------------------------------------------------------------------------------------
# clips and references


@pytest.fixture(scope="module")
def clips(speech_dev, tmp_path_factory) -> dict[str, Path]:
    """4 short speech-dev clips (2-6 s), a ~45-s wav made of consecutive clips ("long", 2 windows) and the
    same twice ("longer", 3-4 windows)."""
    short = [r for r in speech_dev if 1.5 <= r["duration_s"] <= 6.0][::50][:4]
    out = {r["id"]: Path(r["path"]) for r in short}
    parts, total = [], 0.0
    for r in speech_dev:
        if r["id"].startswith("ls_other") and total < 45:
            parts.append(load_audio(r["path"]))
            total += r["duration_s"]
    folder = tmp_path_factory.mktemp("serve")
    sf.write(folder / "long.wav", np.concatenate(parts), SAMPLE_RATE, subtype="PCM_16")
    sf.write(folder / "longer.wav", np.concatenate(parts + parts), SAMPLE_RATE, subtype="PCM_16")
    out["long"] = folder / "long.wav"
    assert len(out) == 5
    return out


def short_names(clips) -> list[str]:
    return [n for n in clips if not n.startswith("long")]


@pytest.fixture(scope="module")
def refs(tiny_en, clips) -> dict[str, dict]:
    """transcribe() of every clip (json/text decoding) in one batched call."""
    names = short_names(clips) + ["long"]
    return dict(zip(names, transcribe(tiny_en, [str(clips[n]) for n in names], batch_size=8)))


@pytest.fixture(scope="module")
def long_ts(tiny_en, clips) -> dict:
    """transcribe(long, timestamps=True): what srt, vtt and verbose_json decode; "windows": how many it took."""
    rows: list[int] = []
    out = transcribe(Wrapped(tiny_en, lambda mel: rows.append(mel.shape[0])), str(clips["long"]), timestamps=True)
    assert sum(rows) >= 2
    return {**out, "windows": sum(rows)}


@pytest.fixture(scope="module")
def short_ts(tiny_en, clips) -> dict:
    """transcribe(short clip, timestamps=True): what srt and vtt decode for a short clip."""
    return transcribe(tiny_en, str(clips[short_names(clips)[0]]), timestamps=True)


@pytest.fixture(scope="module")
def live(tiny_en):
    options = ServeOptions(max_upload_mb=4, max_audio_s=100,
                           batch=BatchOptions(max_batch_size=8, max_wait_ms=200, max_queue=64))
    with LiveServer({"tiny.en": tiny_en}, options) as server:
        yield server


def create(client, path: Path, **kw):
    with open(path, "rb") as f:
        return client.audio.transcriptions.create(file=f, model=kw.pop("model", "tiny.en"), **kw)


# ---------------------------------------------------------------------------------------------------
# the API


def test_json_and_text_equal_transcribe(live, clips, refs):
    client = live.client()
    name = next(iter(clips))
    out = create(client, clips[name])
    assert out.text == refs[name]["text"] and out.text
    assert out.usage.type == "duration" and out.usage.seconds == pytest.approx(refs[name]["duration"])
    text = create(client, clips[name], response_format="text")
    assert text == render(refs[name], "txt")
    # OpenAI's alias answers with the first served model
    assert create(client, clips[name], model="whisper-1").text == refs[name]["text"]


def test_timestamped_formats_equal_transcribe(live, clips, long_ts, short_ts):
    client = live.client()
    short = clips[short_names(clips)[0]]
    assert create(client, short, response_format="srt") == render(short_ts, "srt")
    assert create(client, short, response_format="vtt") == render(short_ts, "vtt")
    v = create(client, clips["long"], response_format="verbose_json", timestamp_granularities=["segment"])
    assert (v.text, v.language, v.duration) == (long_ts["text"], "en", long_ts["duration"])
    assert v.usage.seconds == pytest.approx(long_ts["duration"])
    assert len(v.segments) == len(long_ts["segments"]) > 1
    for i, (s, ref) in enumerate(zip(v.segments, long_ts["segments"])):
        assert (s.id, s.start, s.end, s.text, s.tokens) == (i, ref["start"], ref["end"], ref["text"], ref["tokens"])
        assert s.avg_logprob == pytest.approx(ref["avg_logprob"]) and s.temperature == 0.0
        assert 0 <= s.no_speech_prob <= 1 and s.compression_ratio > 0
        assert s.seek * 0.01 <= s.start + 1e-6  # a segment lies in the window that starts at `seek` frames
    assert [s.seek for s in v.segments] == sorted(s.seek for s in v.segments) and v.segments[-1].seek > 0


def test_stream_deltas_add_up(live, clips, refs):
    stream = create(live.client(), clips["long"], stream=True)
    events = list(stream)
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert [e.type for e in events] == ["transcript.text.delta"] * len(deltas) + ["transcript.text.done"]
    assert len(deltas) > 1  # one per window that closed segments: the long clip has several windows
    assert "".join(d.delta for d in deltas) == events[-1].text == refs["long"]["text"]


def test_models_health_metrics(live):
    status, models = get_json(live.url + "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [("tiny.en", "model")]
    assert [m.id for m in live.client().models.list()] == ["tiny.en"]
    health = live.health()
    assert health["status"] == "ok" and {"queued", "active", "admitted"} <= set(health)
    assert metric(live.url, "liteasr_requests_total")  # requests of earlier tests are counted


def test_health_503_while_loading(tiny_en, clips):
    gate = threading.Event()

    def slow_load():
        gate.wait(60)
        return {"tiny.en": tiny_en}

    server = LiveServer(slow_load)
    server.thread.start()
    try:
        t0 = time.monotonic()
        while True:
            try:
                status, body = get_json(server.url + "/health")
                break
            except OSError:  # not listening yet
                assert time.monotonic() - t0 < 30
                time.sleep(0.05)
        assert (status, body["status"]) == (503, "loading")
        err = expect_error(503, None, create, server.client(), next(iter(clips.values())))
        assert err["code"] == "not_ready"
        gate.set()
        wait_healthy(server.url)
    finally:
        gate.set()
        server.__exit__()


# ---------------------------------------------------------------------------------------------------
# errors


def expect_error(status: int, param, fn, *args, **kw) -> dict:
    """Run fn, expect an APIStatusError with `status` and OpenAI's error shape; returns the error object."""
    with pytest.raises(openai.APIStatusError) as info:
        fn(*args, **kw)
    e = info.value
    assert e.status_code == status, e
    body = e.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and body["error"]["param"] == param
    return body["error"]


def test_bad_requests(live, clips, tmp_path):
    client = live.client()
    clip = next(iter(clips.values()))
    junk = tmp_path / "junk.wav"
    junk.write_bytes(os.urandom(5000))
    err = expect_error(400, "file", create, client, junk)
    assert "junk.wav" in err["message"] and err["code"] == "invalid_audio"
    empty = tmp_path / "empty.flac"
    empty.write_bytes(b"")
    assert expect_error(400, "file", create, client, empty)["code"] == "empty_file"
    big = tmp_path / "big.wav"
    big.write_bytes(os.urandom(5 * 2 ** 20))
    assert expect_error(413, None, create, client, big)["code"] == "request_too_large"
    too_long = tmp_path / "too_long.wav"
    sf.write(too_long, np.tile(load_audio(clips["long"]), 3)[: 101 * SAMPLE_RATE], SAMPLE_RATE, subtype="PCM_16")
    assert expect_error(400, "file", create, client, too_long)["code"] == "audio_too_long"
    assert expect_error(404, "model", create, client, clip, model="gpt-9")["code"] == "model_not_found"
    expect_error(400, "response_format", create, client, clip, response_format="xml")
    expect_error(400, "temperature", create, client, clip, temperature=3.5)
    expect_error(400, "language", create, client, clip, language="de")  # tiny.en is English-only
    expect_error(400, "timestamp_granularities[]", create, client, clip, timestamp_granularities=["syllable"])
    expect_error(400, "timestamp_granularities[]", create, client, clip, response_format="json",
                 timestamp_granularities=["word"])
    expect_error(400, "stream", create, client, clip, response_format="srt", stream=True)
    with open(clip, "rb") as f:  # English-only models do not translate
        expect_error(400, "model", client.audio.translations.create, file=f, model="tiny.en")
    assert live.health()["admitted"] == 0  # every refused request gave its queue slot back
    errors = metric(live.url, "liteasr_errors_total")
    assert errors[("liteasr_errors_total", ("code", "invalid_audio"), ("type", "invalid_request_error"))] >= 1


def test_api_key(tiny_en, clips):
    with LiveServer({"tiny.en": tiny_en}, ServeOptions(api_key="s3cret")) as server:
        with pytest.raises(openai.AuthenticationError) as e:
            server.client(api_key="wrong").models.list()
        assert e.value.response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            create(server.client(api_key="wrong"), next(iter(clips.values())))
        status, body = get_json(server.url + "/v1/models")  # no Authorization header at all
        assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
        assert [m.id for m in server.client(api_key="s3cret").models.list()] == ["tiny.en"]
        assert get_json(server.url + "/health")[0] == 200  # probes need no key


def test_queue_full_and_timeout(tiny_en, clips, long_ts):
    """max_queue=1: a second request while the first decodes gets 429 with Retry-After; the first outlives
    its 1-s timeout (504: every decoder call takes 2 s here) and its later windows are dropped."""
    options = ServeOptions(request_timeout_s=1.0, retry_after_s=2, batch=BatchOptions(max_queue=1))
    with LiveServer({"tiny.en": slow(tiny_en, 2.0)}, options) as server:
        first = {}

        def long_request():
            try:
                create(server.client(), clips["long"])
            except openai.APIStatusError as e:
                first["error"] = e

        t = threading.Thread(target=long_request)
        t.start()
        while server.health()["admitted"] == 0:
            time.sleep(0.01)
        err = expect_error(429, None, create, server.client(), next(iter(clips.values())))
        assert err["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError) as e:
            create(server.client(), next(iter(clips.values())))
        assert e.value.response.headers["retry-after"] == "2"
        t.join(120)
        assert first["error"].status_code == 504
        assert first["error"].response.json()["error"]["code"] == "request_timeout"
        t0 = time.monotonic()
        while server.health()["admitted"]:  # the worker drops the request after its current batch
            assert time.monotonic() - t0 < 60
            time.sleep(0.05)
        assert sum(metric(server.url, "liteasr_windows_total").values()) < long_ts["windows"]


# ---------------------------------------------------------------------------------------------------
# batching across requests


def test_32_concurrent_clients(live, clips, refs):
    """32 clients at once, short clips and 4 long ones: every answer equals transcribe()'s, none lost, and the
    scheduler formed batches of more than one window."""
    names = short_names(clips)
    jobs = [names[i % len(names)] for i in range(30)] + ["long"] * 2
    before = metric(live.url, "liteasr_batch_size")
    client = live.client()

    def one(name):
        return name, create(client, clips[name]).text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, jobs))
    assert len(answers) == 32
    assert [text for _, text in answers] == [refs[name]["text"] for name in jobs]
    after = metric(live.url, "liteasr_batch_size")
    batches = after[("liteasr_batch_size_count",)] - before.get(("liteasr_batch_size_count",), 0)
    windows = after[("liteasr_batch_size_sum",)] - before.get(("liteasr_batch_size_sum",), 0)
    assert windows >= 32 and batches < windows  # batches larger than one window were formed
    assert after[("liteasr_batch_size_bucket", ("le", "1.0"))] < after[("liteasr_batch_size_count",)]
    assert live.health()["admitted"] == 0


def test_bad_window_fails_only_its_request(tiny_en, clips, refs, tmp_path):
    """A model that fails on one poisoned window: the batch is retried window by window, so the three good
    requests decoded in the same batch succeed and only the poisoned one gets a 500."""
    import torch

    from liteasr.transcribe import Job, TranscribeOptions

    tone = tmp_path / "tone.wav"  # a 440-Hz tone: loud, steady, never skipped as silence
    sf.write(tone, 0.5 * np.sin(np.arange(4 * SAMPLE_RATE) * 2 * np.pi * 440 / SAMPLE_RATE), SAMPLE_RATE,
             subtype="FLOAT")
    poison = Job(tiny_en, load_audio(tone), TranscribeOptions()).window().mel  # (n_mels, 3000)

    def fail_on_poison(mel):
        if any(torch.equal(m, poison) for m in mel):
            raise RuntimeError("poisoned window")

    options = ServeOptions(batch=BatchOptions(max_batch_size=4, max_wait_ms=3000))
    with LiveServer({"tiny.en": Wrapped(tiny_en, fail_on_poison)}, options) as server:
        names = short_names(clips)[:3]
        client = server.client()

        def one(path):
            try:
                return create(client, path).text
            except openai.APIStatusError as e:
                return e

        with ThreadPoolExecutor(4) as pool:
            out = list(pool.map(one, [clips[n] for n in names] + [tone]))
        assert out[:3] == [refs[n]["text"] for n in names]
        assert isinstance(out[3], openai.InternalServerError)
        error = out[3].response.json()["error"]
        assert error["code"] == "decode_failed" and "poisoned window" in error["message"]
        sizes = metric(server.url, "liteasr_batch_size")
        # one batch of 4 (failed before decoding), then the 3 good windows alone
        assert (sizes[("liteasr_batch_size_sum",)], sizes[("liteasr_batch_size_count",)]) == (4, 1)
        assert server.health()["status"] == "ok"


def _multipart(path: Path, fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def slow_server(tiny_en):
    with LiveServer({"tiny.en": slow(tiny_en, 1.0)}) as server:
        yield server


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels(slow_server, clips, refs, stream):
    """A client that hangs up mid-request (~90 s of audio, at least 3 windows): its pending windows are dropped,
    the server stays healthy and serves the next request."""
    server = slow_server
    fields = {"model": "tiny.en", "stream": str(stream).lower()}
    body, ctype = _multipart(clips["long"].with_name("longer.wav"), fields)
    before = sum(metric(server.url, "liteasr_windows_total").values())
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/audio/transcriptions", body=body, headers={"Content-Type": ctype})
    t0 = time.monotonic()
    if stream:  # read the first event (the first window's text), then hang up
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
    else:
        while server.health()["active"] == 0:
            assert time.monotonic() - t0 < 60
            time.sleep(0.01)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    while server.health()["admitted"]:
        assert time.monotonic() - t0 < 60
        time.sleep(0.05)
    # the window in flight when the client left (and, streaming, the one started as the first event went out)
    decoded = sum(metric(server.url, "liteasr_windows_total").values()) - before
    assert decoded <= 2
    closed = metric(server.url, "liteasr_errors_total")
    assert closed[("liteasr_errors_total", ("code", "client_closed"), ("type", "client_closed"))] >= 1
    name = next(iter(clips))
    assert create(server.client(), clips[name]).text == refs[name]["text"]
    assert server.health()["status"] == "ok"


# ---------------------------------------------------------------------------------------------------
# translation and multi-model (base is multilingual), the CLI and graceful shutdown


def test_translation_and_two_models(tiny_en, base, multilingual, clips, refs):
    clip = min(multilingual["de"], key=lambda r: r["duration_s"])
    ref = transcribe(base, str(clip["path"]), task="translate")
    with LiveServer({"tiny.en": tiny_en, "base": base}) as server:
        client = server.client()
        with open(clip["path"], "rb") as f:
            out = client.audio.translations.create(file=f, model="base")
        assert out.text == ref["text"] and out.text.isascii()
        name = next(iter(clips))
        assert create(client, clips[name], model="tiny.en").text == refs[name]["text"]
        assert [m.id for m in client.models.list()] == ["tiny.en", "base"]


def test_cli_serve_and_graceful_shutdown(tiny_en, clips, refs):
    """`liteasr serve` in a subprocess; SIGTERM while a request is in flight: the request still completes,
    then the process exits."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "liteasr", "serve", "--model", "tiny.en", "--port", str(port),
                             "--max-batch-size", "4", "--log-level", "warning"], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        name = next(iter(clips))
        result = {}
        t = threading.Thread(target=lambda: result.update(text=create(client, clips[name]).text))
        t.start()
        t0 = time.monotonic()
        while get_json(url + "/health")[1]["admitted"] == 0:
            assert time.monotonic() - t0 < 60
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert result["text"] == refs[name]["text"]
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful exit
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.requires_cuda
def test_cuda_runtime_batches_across_requests(clips):
    """On the GPU: the CudaRuntime behind the server, batches padded to power-of-two buckets (few CUDA graphs);
    8 concurrent clients get what transcribe() gives through the same runtime."""
    from liteasr.serve import load_models, power_of_two_buckets

    runtime = load_models(["tiny.en"], "cuda")["tiny.en"]
    names = short_names(clips)
    jobs = [names[i % len(names)] for i in range(7)] + ["long"]
    ref = dict(zip(names + ["long"], transcribe(runtime, [str(clips[n]) for n in names + ["long"]], batch_size=8)))
    batch = BatchOptions(max_batch_size=8, max_wait_ms=200, buckets=power_of_two_buckets(8))
    with LiveServer({"tiny.en": runtime}, ServeOptions(batch=batch)) as server:
        client = server.client()
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda n: create(client, clips[n]).text, jobs))
        assert texts == [ref[n]["text"] for n in jobs]
        sizes = metric(server.url, "liteasr_batch_size")
        assert sizes[("liteasr_batch_size_sum",)] > sizes[("liteasr_batch_size_count",)]
