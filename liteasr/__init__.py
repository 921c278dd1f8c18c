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
