"""The CUDA fast path: `CudaRuntime` (fused encoder, CUDA-graph replay, graph-captured greedy decoding) and the
Triton reduced-rank attention kernel (`kernels`). Build a runtime explicitly and pass it where a model is taken:

    rt = liteasr.cuda.CudaRuntime(liteasr.load_model("tiny.en", device="cuda"))
    liteasr.transcribe(rt, "audio.flac")
"""

from .runtime import CudaRuntime, RuntimeOptions

__all__ = ["CudaRuntime", "RuntimeOptions"]
