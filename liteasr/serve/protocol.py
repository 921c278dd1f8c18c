"""The OpenAI audio API as liteasr speaks it: the multipart fields a request may carry, their checks, the
response bodies (json, text, srt, vtt, verbose_json), the streaming events and the error shape.

Field names and shapes follow the `openai` Python client's types (openai.types.audio: Transcription,
TranscriptionVerbose, TranscriptionSegment, TranscriptionWord, TranscriptionTextDeltaEvent/DoneEvent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from ..transcribe import TranscribeOptions, render

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


class APIError(Exception):
    """An error answered as HTTP `status` with {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_field(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class AudioRequest:
    """The checked fields of one transcription or translation request (the file travels separately)."""

    model: str
    task: str  # "transcribe" or "translate" (the endpoint)
    language: str | None
    prompt: str | None
    response_format: str
    temperature: float
    granularities: tuple[str, ...]
    stream: bool

    def transcribe_options(self) -> TranscribeOptions:
        """The TranscribeOptions this request decodes with. srt, vtt and verbose_json need timestamped segments,
        as `liteasr transcribe -f srt` decodes them; json and text decode as `liteasr transcribe` does."""
        timestamps = True if self.response_format in ("srt", "vtt", "verbose_json") else None
        # Only what the request sets is passed: an absent or zero temperature keeps the library's default
        # (OpenAI's 0 means "raise the temperature when decoding fails", which is what a fallback chain does).
        extra = {}
        if self.prompt:
            extra["initial_prompt"] = self.prompt
        if self.temperature > 0:
            extra["temperature"] = self.temperature
        if "word" in self.granularities:
            extra["word_timestamps"] = True
        supported = {f.name for f in fields(TranscribeOptions)}
        for name in extra:  # options the decoder of this build does not know are refused, not ignored
            if name not in supported:
                param = {"initial_prompt": "prompt", "word_timestamps": "timestamp_granularities[]"}.get(name, name)
                raise bad_field(param, f"{param}: not supported by this liteasr build (greedy decoding only)",
                                "unsupported_value")
        return TranscribeOptions(language=self.language, task=self.task, timestamps=timestamps, **extra)


def parse_fields(form, task: str) -> AudioRequest:
    """AudioRequest from a multipart form (a starlette FormData: get/getlist); raises APIError on a bad field."""
    model = _text(form, "model")
    if not model:
        raise bad_field("model", "model: required (the name of a served model, see GET /v1/models)", "missing")
    fmt = _text(form, "response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise bad_field("response_format", f"response_format: {fmt!r} is not one of {', '.join(RESPONSE_FORMATS)}")
    language = _text(form, "language") if task == "transcribe" else None
    granularities = tuple(form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities"))
    for g in granularities:
        if g not in GRANULARITIES:
            raise bad_field("timestamp_granularities[]", f"timestamp_granularities[]: {g!r} is not one of "
                            f"{', '.join(GRANULARITIES)}")
    if granularities and fmt != "verbose_json":
        raise bad_field("timestamp_granularities[]", "timestamp_granularities[]: only with response_format "
                        "verbose_json", "unsupported_value")
    stream = _bool(form, "stream") if task == "transcribe" else False
    if stream and fmt not in ("json", "text"):
        raise bad_field("stream", f"stream: streams text events; response_format {fmt!r} cannot be streamed "
                        "(use json or text)", "unsupported_value")
    return AudioRequest(model, task, language.lower() if language else None, _text(form, "prompt") or None, fmt,
                        _temperature(form), granularities, stream)


def _text(form, name: str) -> str | None:
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_field(name, f"{name}: expected a text field, got a file")
    return value.strip() if value is not None else None


def _bool(form, name: str) -> bool:
    value = (_text(form, name) or "").lower()
    if value not in TRUE + FALSE:
        raise bad_field(name, f"{name}: expected true or false, got {value!r}")
    return value in TRUE


def _temperature(form) -> float:
    value = _text(form, "temperature")
    if not value:
        return 0.0
    try:
        t = float(value)
    except ValueError:
        raise bad_field("temperature", f"temperature: expected a number in [0, 1], got {value!r}") from None
    if not 0.0 <= t <= 1.0:
        raise bad_field("temperature", f"temperature: {t} is outside [0, 1]")
    return t


def check_language(req: AudioRequest, tokenizer, multilingual: bool) -> None:
    """The language must be one the model knows; English-only models transcribe English and do not translate."""
    if req.language is not None and req.language not in (tokenizer.languages if multilingual else {"en"}):
        raise bad_field("language", f"language: {req.language!r} is not a language of model {req.model!r} "
                        f"({'ISO-639-1 codes Whisper knows' if multilingual else 'English-only: en'})")
    if req.task == "translate" and not multilingual:
        raise bad_field("model", f"model {req.model!r} is English-only and cannot translate", "unsupported_value")


# ---------------------------------------------------------------------------------------------------
# responses


def usage(duration: float) -> dict:
    return {"type": "duration", "seconds": duration}


def response_body(result: dict, req: AudioRequest) -> tuple[str, str]:
    """(body, media type) of a finished result in req.response_format."""
    fmt = req.response_format
    if fmt in ("text", "srt", "vtt"):
        media = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}[fmt]
        return render(result, "txt" if fmt == "text" else fmt), f"{media}; charset=utf-8"
    body: dict = {"text": result["text"]}
    if fmt == "verbose_json":
        body = {"task": req.task,
                "language": result["language"], "duration": result["duration"], "text": result["text"]}
        # segments always (verbose_json's default); words on request, since timing them costs an alignment pass
        body["segments"] = [_segment(i, seg) for i, seg in enumerate(result["segments"])]
        if "word" in req.granularities:
            body["words"] = [{"word": w["word"], "start": w["start"], "end": w["end"]}
                             for seg in result["segments"] for w in seg.get("words", [])]
    if req.task == "transcribe":  # translations carry no usage in OpenAI's shapes
        body["usage"] = usage(result["duration"])
    return json.dumps(body, ensure_ascii=False), "application/json"


def _segment(i: int, seg: dict) -> dict:
    return {"id": i, "seek": seg["seek"], "start": seg["start"], "end": seg["end"], "text": seg["text"],
            "tokens": seg["tokens"], "temperature": seg["temperature"], "avg_logprob": seg["avg_logprob"],
            "compression_ratio": seg["compression_ratio"], "no_speech_prob": seg["no_speech_prob"]}


def sse(event: dict) -> str:
    """One server-sent event carrying `event` as JSON."""
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def delta_event(delta: str) -> dict:
    return {"type": "transcript.text.delta", "delta": delta}


def done_event(result: dict) -> dict:
    return {"type": "transcript.text.done", "text": result["text"], "usage": usage(result["duration"])}
