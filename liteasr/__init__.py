"""liteasr: low-rank compressed Whisper encoders that run faster than the originals.

    import liteasr
    model = liteasr.load_model("tiny.en")
    print(model.transcribe("audio.flac")["text"])
"""

from .checkpoint import load_model, save
from .model import LowRankLinear, Whisper
from .transcribe import transcribe

__version__ = "0.1.0"
__all__ = ["load_model", "save", "transcribe", "LowRankLinear", "Whisper", "__version__"]


def _register_transformers() -> None:
    """With transformers installed, its Auto classes and pipeline() load lite-whisper directories (liteasr.hf)."""
    import importlib.util
    import warnings

    if importlib.util.find_spec("transformers") is None:
        return
    try:
        from .hf import register
    except ImportError as e:  # e.g. a transformers older than 4.49: liteasr itself still works
        warnings.warn(f"liteasr: transformers integration disabled ({e})", stacklevel=2)
        return
    register()


_register_transformers()
