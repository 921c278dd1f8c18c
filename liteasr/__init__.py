"""liteasr: low-rank compressed Whisper encoders that run faster than the originals.

    import liteasr
    model = liteasr.load_model("tiny.en")
    print(model.transcribe("audio.flac")["text"])
"""

import importlib.abc
import importlib.util
import sys

from .checkpoint import load_model, save
# `liteasr.compress` is the function (the subpackage's driver), bound after the subpackage is imported;
# the subpackage's other names come with `from liteasr.compress import CompressConfig, Plan, ...`.
from .compress import CompressConfig, compress
from .model import LowRankLinear, Whisper
from .transcribe import transcribe

__version__ = "0.1.0"
__all__ = ["load_model", "compress", "CompressConfig", "save", "transcribe", "LowRankLinear", "Whisper", "__version__"]


def _register_transformers() -> None:
    """With transformers installed, its Auto classes and pipeline() load lite-whisper directories (liteasr.hf)."""
    import warnings

    hf = sys.modules.get(__name__ + ".hf")
    if hf is not None and not hasattr(hf, "register"):
        return  # liteasr.hf is mid-import (it imported transformers first); it registers on its last line
    try:
        from .hf import register
    except ImportError as e:  # e.g. a transformers older than 4.49: liteasr itself still works
        warnings.warn(f"liteasr: transformers integration disabled ({e})", stacklevel=2)
        return
    register()


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Registers liteasr.hf right after `transformers` is first imported, so `import liteasr` stays
    fast (transformers takes seconds to import) and `AutoModel.from_pretrained(lite_dir)` still works."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module) -> None:
            exec_module(module)
            _register_transformers()

        spec.loader.exec_module = exec_and_register
        return spec


if "transformers" in sys.modules:
    _register_transformers()
elif importlib.util.find_spec("transformers") is not None:
    sys.meta_path.insert(0, _RegisterWhenImported())
