"""GPU runtime: the same model rearranged for speed, and replayed from CUDA graphs.

Nothing here changes `model.py`: modules are wrapped or swapped in copies that share the model's
weights, and model.py's forward stays the reference every fast path is checked against.

Encoder (`fast_encoder`, `EncoderRunner`):
- q/k/v become one projection: one (d, 3d) matmul for dense layers; for factored layers one
  (d, r_q + r_k + r_v) down-projection — the three thin matmuls that run at a fraction of the GPU's
  rate become one wider one — followed by the three small up-projections;
- attention in the reduced dimension (liteasr.cuda.kernels, Triton) where the ranks are small enough for
  it to win on measured hardware (`lowrank_attention_wins`), SDPA otherwise;
- biases ride in cuBLAS epilogues (addmm); fc1's bias + GELU too with `gelu_epilogue` (LinearGelu);
  residual add + LayerNorm as one Triton pass each with `fused_norm` (FusedNormEncoder, liteasr.cuda.norm),
  or `torch.compile` fusing LayerNorm / GELU / residual adds; linears in FP8 E4M3 with `fp8`
  (liteasr.cuda.fp8); `EncoderRunner` captures one CUDA graph per input shape.

Decoder (`DecoderRunner`): one decode step — embedding, every layer against a static
448-slot KV cache under a mask (TextDecoder's Tensor-offset path), logits, Whisper's suppression
and timestamp rules, then the selection: argmax, a seeded sample (counter-based Gumbel noise: no
generator state in the graph) or openai-whisper's beam update followed by the reorder of the
static self-attention cache by beam (index_select + copy back into the same buffers) — captured in
one CUDA graph per (batch size, rules, search). Token selection and the beam bookkeeping stay on the
device; the host replays the graph and looks at the all-finished flag once per chunk of steps, one
chunk behind, so no step waits for the host. The token rules and selections are liteasr.decoding's
(`select_tokens`, `beam_select`), the same code the eager reference runs; the temperature fallback
(liteasr.decoding.decode_with_fallback) re-runs only the failing windows through the same graphs. With
`compile_decoder` the decoder forward is compiled before capture.

`CudaRuntime` owns all of it for one model: the caller builds it explicitly and passes it wherever a model is taken
(`liteasr.transcribe(runtime, …)`); it holds no global state, so a server can keep one per model and
GPU.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decoding import (BeamState, DecodingOptions, DecodingResult, GreedyState, RuleTensors, Search, TokenRules,
                        beam_select, decode, decode_features, detect_language, finish_beams, select_tokens)
from ..model import Attention, AudioEncoder, KVCache, LowRankLinear, TextDecoder, Whisper
from .kernels import lowrank_attention_wins


# ---------------------------------------------------------------------------------------------------
# encoder


class Addmm(nn.Module):
    """x (M, K) -> bias + x @ weight (M, N): the bias in cuBLAS's epilogue. weight (K, N)."""

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.weight)


def _matmul(weight: Tensor, bias: Tensor, fp8: bool, out_dtype: torch.dtype | None) -> nn.Module:
    """x (M, K) -> x @ weight + bias for weight (K, N): Addmm, or Fp8Linear when `fp8`."""
    if fp8:
        from .fp8 import Fp8Linear

        return Fp8Linear(weight.T, bias, out_dtype)
    return Addmm(weight, bias)


class FusedQKV(nn.Module):
    """q, k, v of one attention block from a single down-projection. x (B, T, d) -> 3 × (B, T, d).

    Dense parts put their final outputs (with bias) in the shared matmul; factored parts put their
    rank-r intermediates there and add bias in the epilogue of their small up-projection.
    fp8: None, "dense" (the shared matmul in FP8 when every part is dense) or "all" (every matmul in FP8)."""

    def __init__(self, attn: Attention, fp8: str | None = None, fp8_out: torch.dtype | None = None) -> None:
        super().__init__()
        parts = (attn.q_proj, attn.k_proj, attn.v_proj)
        d = attn.out_proj.out_features if isinstance(attn.out_proj, LowRankLinear) else attn.out_proj.weight.shape[0]
        kw = dict(dtype=_dtype(attn.q_proj), device=_device(attn.q_proj))
        down, down_bias, self.splits, self.factored = [], [], [], []
        self.up = nn.ModuleList()
        for m in parts:
            bias = m.bias.detach() if m.bias is not None else torch.zeros(d, **kw)
            if isinstance(m, LowRankLinear):
                down.append(m.weight1)
                down_bias.append(torch.zeros(m.rank, **kw))
                self.up.append(_matmul(m.weight2, bias, fp8 == "all", fp8_out))
            else:
                down.append(m.weight.T)
                down_bias.append(bias)
            self.splits.append(down[-1].shape[1])
            self.factored.append(isinstance(m, LowRankLinear))
        fp8_down = fp8 == "all" or (fp8 == "dense" and not any(self.factored))
        self.down = _matmul(torch.cat(down, 1).detach(), torch.cat(down_bias), fp8_down, fp8_out)  # (d, Σ r_i)

    def project(self, x: Tensor) -> tuple[Tensor, ...]:
        """The shared down-projection: x (B, T, d) -> per part (B·T, r_i) (factored) or (B·T, d) (dense, final)."""
        return self.down(x.flatten(0, 1)).split(self.splits, dim=-1)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        h = self.project(x)  # (B·T, r_i)
        ups = iter(self.up)
        outs = []
        for part, factored in zip(h, self.factored):
            if factored:
                part = next(ups)(part)  # (B·T, d)
            outs.append(part.view(*x.shape[:2], -1))
        return tuple(outs)


def _dtype(m: nn.Module) -> torch.dtype:
    return next(m.parameters()).dtype


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


class FastSelfAttention(nn.Module):
    """Encoder self-attention with fused q/k/v; same math as model.Attention (checked in tests).

    With factored q, k and v whose ranks pass `lowrank_attention_wins`, on a CUDA device with Triton, the
    attention core runs in the reduced dimension (liteasr.kernels.lowrank_attention) on the rank-r slices of
    the fused down-projection; otherwise SDPA on the up-projected (B, H, T, d_h) heads."""

    def __init__(self, attn: Attention, allow_lowrank: bool = True, fp8: str | None = None,
                 fp8_out: torch.dtype | None = None) -> None:
        super().__init__()
        self.n_head = attn.n_head
        self.qkv = FusedQKV(attn, fp8, fp8_out)
        self.out_proj = _fp8_or_same(attn.out_proj, fp8, fp8_out)
        self.lowrank: dict | None = None
        parts = (attn.q_proj, attn.k_proj, attn.v_proj)
        if allow_lowrank and all(isinstance(m, LowRankLinear) for m in parts):
            d_h = attn.q_proj.out_features // attn.n_head
            low_precision = _dtype(attn.q_proj) in (torch.float16, torch.bfloat16)  # what the kernel takes
            if (lowrank_attention_wins(attn.k_proj.rank, attn.v_proj.rank, d_h) and low_precision
                    and _device(attn.q_proj).type == "cuda"):
                from .kernels import HAS_TRITON, factors_from_attention

                if not HAS_TRITON:
                    warnings.warn("FastSelfAttention: ranks are small enough for the reduced-rank attention kernel "
                                  "but Triton is not installed; using SDPA on up-projected heads", RuntimeWarning)
                else:
                    f = factors_from_attention(attn)
                    self.lowrank = {k: f[k] for k in ("m_qk", "bias_qk", "b_v_heads", "bias_v", "n_head", "scale")}

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d)
        if self.lowrank is not None:
            from .kernels import lowrank_attention

            b, t = x.shape[:2]
            x_q, x_k, x_v = (h.view(b, t, -1) for h in self.qkv.project(x))  # (B, T, r_*) column slices
            return self.out_proj(lowrank_attention(x_q, x_k, x_v, **self.lowrank))
        q, k, v = (t.unflatten(-1, (self.n_head, -1)).transpose(1, 2) for t in self.qkv(x))  # (B, H, T, d_h)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).flatten(2))


def _shallow(m: nn.Module) -> nn.Module:
    """A new module object sharing m's parameters, buffers and children; its own child table, so swapping a
    child in the copy leaves m untouched."""
    c = copy.copy(m)
    c._modules = dict(m._modules)
    c._parameters = dict(m._parameters)
    c._buffers = dict(m._buffers)
    return c


def _fp8_or_same(m: nn.Module, fp8: str | None, out_dtype: torch.dtype | None) -> nn.Module:
    if fp8 is None:
        return m
    from .fp8 import fp8_linear

    return fp8_linear(m, factored=fp8 == "all", out_dtype=out_dtype)


class LinearGelu(nn.Module):
    """GELU(fc1(x)) with fc1's bias and the GELU in the cuBLASLt epilogue of its (last) matmul
    (torch._addmm_activation): the (B·T, 5120) pre-activation is never written. x (..., in) -> (..., out).

    cuBLASLt's GELU is the tanh approximation (|error| < 4e-4 against the exact erf GELU Whisper uses, below
    fp16's rounding of the activations it feeds); the encoder-level error is checked against fp32 in the tests."""

    def __init__(self, fc1: nn.Module) -> None:
        super().__init__()
        self.factored = isinstance(fc1, LowRankLinear)
        if self.factored:
            self.weight1 = fc1.weight1
            self.weight2 = fc1.weight2  # (r, out)
        else:
            self.weight2 = nn.Parameter(fc1.weight.detach().T, requires_grad=False)  # (in, out) view: no copy
        self.bias = fc1.bias
        self.out_features = self.weight2.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(-1, x.shape[-1])
        if self.factored:
            h = h @ self.weight1  # (B·T, r)
        return torch._addmm_activation(self.bias, h, self.weight2, use_gelu=True).view(*x.shape[:-1], self.out_features)


class Gelu(nn.Module):
    """GELU(fc1(x)) as two steps (the reference's order), for fc1 without an epilogue (FP8)."""

    def __init__(self, fc1: nn.Module) -> None:
        super().__init__()
        self.fc1 = fc1

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.fc1(x))


class FastEncoderLayer(nn.Module):
    """model.EncoderLayer with the runtime's modules swapped in (FastSelfAttention; fc1+GELU as one module, in the
    GEMM epilogue when `gelu_epilogue`; FP8 linears when `fp8`); the same forward, sharing the layer's weights."""

    def __init__(self, layer: nn.Module, allow_lowrank: bool = True, gelu_epilogue: bool = False,
                 fp8: str | None = None, fp8_out: torch.dtype | None = None) -> None:
        super().__init__()
        self.self_attn = (FastSelfAttention(layer.self_attn, allow_lowrank, fp8, fp8_out)
                          if isinstance(layer.self_attn, Attention) else layer.self_attn)
        self.self_attn_layer_norm = layer.self_attn_layer_norm
        if fp8 is not None and isinstance(layer.fc1, nn.Linear) and isinstance(layer.fc2, nn.Linear):
            from .fp8 import Fp8Mlp

            # both FP8: fc1's bias + GELU + fc2's input quantization in one pass (Fp8Mlp); fc2 is then identity
            self.fc1_gelu, self.fc2 = Fp8Mlp(layer.fc1, layer.fc2, fp8_out), nn.Identity()
        else:
            fc1 = _fp8_or_same(layer.fc1, fp8, fp8_out)
            use_epilogue = gelu_epilogue and fc1 is layer.fc1  # an FP8 fc1 has no GELU epilogue
            self.fc1_gelu = LinearGelu(fc1) if use_epilogue else Gelu(fc1)
            self.fc2 = _fp8_or_same(layer.fc2, fp8, fp8_out)
        self.final_layer_norm = layer.final_layer_norm

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d)
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(self.fc1_gelu(self.final_layer_norm(x)))


class FusedNormEncoder(nn.Module):
    """An AudioEncoder whose residual adds and LayerNorms run as one Triton pass each (liteasr.cuda.norm): the sum
    after every sublayer is normalised in the same kernel for the next sublayer — the next layer's first
    LayerNorm, or the encoder's final one. Layers are FastEncoderLayer; same function as AudioEncoder."""

    def __init__(self, encoder: AudioEncoder, layers: list[FastEncoderLayer]) -> None:
        super().__init__()
        self.conv1, self.conv2 = encoder.conv1, encoder.conv2
        self.embed_positions = encoder.embed_positions
        self.layers = nn.ModuleList(layers)
        self.layer_norm = encoder.layer_norm

    def forward(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, 2T) -> audio features (B, T, d)."""
        from .norm import add_layer_norm

        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)  # (B, T, d)
        x = (x + self.embed_positions.weight[: x.shape[1]]).contiguous()
        norms = [m for layer in self.layers for m in (layer.self_attn_layer_norm, layer.final_layer_norm)]
        norms.append(self.layer_norm)
        x, h = add_layer_norm(x, None, norms[0].weight, norms[0].bias, norms[0].eps)
        for i, layer in enumerate(self.layers):
            n1, n2 = norms[2 * i + 1], norms[2 * i + 2]
            x, h = add_layer_norm(x, layer.self_attn(h), n1.weight, n1.bias, n1.eps)
            x, h = add_layer_norm(x, layer.fc2(layer.fc1_gelu(h)), n2.weight, n2.bias, n2.eps)
        return h


@torch.no_grad()
def fast_encoder(encoder: AudioEncoder, compile: bool | str = False, allow_lowrank: bool = True,
                 gelu_epilogue: bool = False, fp8: str | None = None, fused_norm: bool = False) -> nn.Module:
    """A copy of `encoder` that shares its weights, with FastEncoderLayer in every layer; `encoder` is unchanged.

    compile: False, True (torch.compile's default mode) or a torch.compile mode name, e.g.
    "max-autotune-no-cudagraphs"; each layer is compiled (layers with the same ranks share one compiled graph).
    Every distinct rank combination is its own specialisation of one code object: call the compiled encoder
    inside `compile_scope()` (EncoderRunner does), which raises dynamo's recompile limit for that call only.
    gelu_epilogue: fc1's bias + GELU in the cuBLASLt epilogue. fp8: None, "dense" (dense linears in FP8 E4M3) or
    "all" (factored linears' matmuls too); FP8 weights are quantized copies (extra memory: 1 byte per weight).
    fused_norm: residual add + LayerNorm in one Triton pass each (FusedNormEncoder); not with `compile` (Inductor
    fuses those itself)."""
    if fused_norm and compile:
        raise ValueError("fast_encoder: fused_norm and compile both fuse the LayerNorm passes; choose one")
    if fp8 not in (None, "dense", "all"):
        raise ValueError(f"fast_encoder: fp8 must be None, 'dense' or 'all', got {fp8!r}")
    fp8_out = None
    if fp8 is not None:
        from .fp8 import fp8_out_dtype

        fp8_out = fp8_out_dtype(_device(encoder), _dtype(encoder))
    layers = [FastEncoderLayer(layer, allow_lowrank, gelu_epilogue, fp8, fp8_out) for layer in encoder.layers]
    if fused_norm:
        return FusedNormEncoder(encoder, layers)
    enc = _shallow(encoder)
    enc.layers = nn.ModuleList()
    mode = compile if isinstance(compile, str) else None
    for new in layers:
        if compile:
            new.forward = torch.compile(new.forward, dynamic=False, mode=mode)
        enc.layers.append(new)
    return enc


def compile_scope(limit: int = 256):
    """A context in which torch.compile may specialise one code object `limit` times (a compressed encoder's
    layers differ in ranks); dynamo's global setting is restored on exit."""
    import torch._dynamo

    return torch._dynamo.config.patch(cache_size_limit=max(torch._dynamo.config.cache_size_limit, limit))


class EncoderRunner:
    """Encoder calls replayed from one CUDA graph per input shape (captured on first use).

    `encoder` is e.g. `fast_encoder(model.encoder)`; `sdpa_backends` (a list of
    torch.nn.attention.SDPBackend) pins the attention kernels chosen at capture time."""

    def __init__(self, encoder: nn.Module, sdpa_backends: list | None = None) -> None:
        self.encoder = encoder
        self.sdpa_backends = sdpa_backends
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}

    def _context(self):
        return sdpa_context(self.sdpa_backends)

    @torch.inference_mode()
    def _capture(self, mel: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        static_in = mel.clone()
        with self._context(), compile_scope():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up (and compilation) on a side stream, as capture requires
                for _ in range(2):
                    self.encoder(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.encoder(static_in)
        return graph, static_in, static_out

    @torch.inference_mode()
    def __call__(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, 3000) on the model's CUDA device -> audio features (B, 1500, d).

        The result is the graph's static output buffer: it is overwritten by the next call of the same shape."""
        key = tuple(mel.shape)
        if key not in self.graphs:
            self.graphs[key] = self._capture(mel)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(mel)
        graph.replay()
        return static_out


# ---------------------------------------------------------------------------------------------------
# greedy decoding


class DecoderRunner:
    """Greedy decoding with one decode step per (batch size, rules) captured in a CUDA graph.

    Per batch size it keeps a static KVCache (self-attention 448 slots, cross-attention from the audio
    features, written in place) and a GreedyState; the captured step reads st.tokens / st.offset and writes
    the next ones, so replays chain on the device. use_graphs=False runs the very same step eagerly (CPU,
    tests, debugging). check_every: steps per chunk between looks at the all-finished flag."""

    def __init__(self, decoder: TextDecoder, use_graphs: bool = True, check_every: int = 8,
                 compile: bool | str = False) -> None:
        self.decoder = decoder
        # compile (True or a torch.compile mode name): the step's decoder forward through torch.compile (static
        # shapes, one specialisation per batch size), so that the captured graph replays Inductor's fused kernels
        # instead of ~30 small ones per layer
        mode = compile if isinstance(compile, str) else None
        self.forward = torch.compile(decoder.forward, dynamic=False, mode=mode) if compile else decoder.forward
        self.use_graphs = use_graphs
        self.check_every = check_every
        self.n_ctx = decoder.embed_positions.num_embeddings
        self.caches: dict[int, KVCache] = {}
        self.states: dict[int, GreedyState] = {}
        self.beam_states: dict[tuple, BeamState] = {}
        self.samples: dict[tuple, Tensor] = {}
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, RuleTensors]] = {}
        self.rule_tensors: dict[tuple, RuleTensors] = {}
        self.pool = None

    # static buffers ---------------------------------------------------------------------------
    @torch.inference_mode()
    def cache(self, audio_features: Tensor) -> KVCache:
        """The static cache for this batch size with cross keys/values of `audio_features` (B, S, d) written in
        place, and an emptied self-attention part (zeros: the masked slots must hold finite values)."""
        b, s, d = audio_features.shape
        layers = self.decoder.layers
        cache = self.caches.get(b)
        if cache is None or cache.cross_k[0].shape[2] != s or cache.self_k[0].dtype != audio_features.dtype:
            h = layers[0].self_attn.n_head
            kw = dict(dtype=audio_features.dtype, device=audio_features.device)
            shape = (b, h, self.n_ctx, d // h)
            # cross k/v stored (B, S, d) so one matmul writes them; the cache holds (B, H, S, d_h) views, the
            # layout TextDecoder.new_cache produces with Attention.heads
            flat = [torch.empty(b, s, d, **kw) for _ in range(2 * len(layers))]
            cache = KVCache([torch.zeros(shape, **kw) for _ in layers], [torch.zeros(shape, **kw) for _ in layers],
                            [f.unflatten(-1, (h, -1)).transpose(1, 2) for f in flat[0::2]],
                            [f.unflatten(-1, (h, -1)).transpose(1, 2) for f in flat[1::2]])
            cache.flat = flat  # type: ignore[attr-defined]
            self.caches[b] = cache
            self.graphs = {k: v for k, v in self.graphs.items() if k[0] != b}  # captured against the old buffers
        x = audio_features.flatten(0, 1)  # (B·S, d)
        for i, layer in enumerate(layers):
            a = layer.encoder_attn
            for proj, out in ((a.k_proj, cache.flat[2 * i]), (a.v_proj, cache.flat[2 * i + 1])):
                if proj.bias is None:
                    torch.mm(x, proj.weight.T, out=out.view(-1, d))
                else:
                    torch.addmm(proj.bias, x, proj.weight.T, out=out.view(-1, d))
        for k, v in zip(cache.self_k, cache.self_v):
            k.zero_()
            v.zero_()
        return cache

    def state(self, batch: int, device: torch.device) -> GreedyState:
        if batch not in self.states:
            self.states[batch] = GreedyState(batch, self.n_ctx, device)
        return self.states[batch]

    def beam_state(self, batch: int, search: Search, device: torch.device) -> BeamState:
        key = (batch, search.group, search.max_candidates)
        if key not in self.beam_states:
            self.beam_states[key] = BeamState(batch // search.group, search.group, search.max_candidates, self.n_ctx,
                                              device)
        return self.beam_states[key]

    def _sample(self, batch: int, group: int, device: torch.device) -> Tensor:
        """Each row's sample number within its window (B,): a persistent buffer, since captured graphs read it."""
        key = (batch, group, str(device))
        if key not in self.samples:
            self.samples[key] = torch.arange(batch, device=device) % group
        return self.samples[key]

    def _rules(self, rules: TokenRules, device: torch.device) -> RuleTensors:
        key = (rules, str(device))
        if key not in self.rule_tensors:
            self.rule_tensors[key] = RuleTensors(rules, self.decoder.embed_tokens.num_embeddings, device)
        return self.rule_tensors[key]

    # the step ---------------------------------------------------------------------------------
    def _step(self, cache: KVCache, st: GreedyState, r: RuleTensors, search: Search, sample: Tensor,
              bs: BeamState | None) -> None:
        with compile_scope():
            logits = self.forward(st.tokens, cache, st.offset)[:, -1]  # (B, V) float32; Tensor offset: static shapes
        if bs is None:
            select_tokens(logits, st, r, False, search, sample)
            return
        src = beam_select(logits, st, bs, r, first=False)  # (B,) on the device: no host round trip
        self._reorder(cache, src)

    @staticmethod
    def _reorder(cache: KVCache, src: Tensor) -> None:
        """The static self-attention cache follows the beams: rows gathered by src (B,) and written back in place
        (the captured graph keeps reading the same buffers). Whole buffers: the filled length is not static."""
        for kv in (cache.self_k, cache.self_v):
            for t in kv:
                t.copy_(t.index_select(0, src))

    def _graph(self, cache: KVCache, st: GreedyState, r: RuleTensors, search: Search, sample: Tensor,
               bs: BeamState | None) -> torch.cuda.CUDAGraph:
        b = st.tokens.shape[0]
        key = (b, r.rules, search)
        if key not in self.graphs:
            # Warm-up on a side stream (as capture requires) runs real steps: park them in the last slots of the
            # self cache (never read before their own step rewrites them) so the prompt's keys/values survive
            # (a beam reorder only permutes the rows of one window, which hold the same prompt); callers reset
            # the state afterwards.
            st.offset.fill_(self.n_ctx - 3)
            st.step.zero_()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(cache, st, r, search, sample, bs)
            torch.cuda.current_stream().wait_stream(stream)
            if self.pool is None:
                # one memory pool for every graph of this runner: they never run concurrently, and all of
                # their outputs go to buffers allocated outside the graphs
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._step(cache, st, r, search, sample, bs)
            self.graphs[key] = (graph, r)
        return self.graphs[key][0]

    @torch.inference_mode()
    def greedy(self, cache: KVCache, prompt_logits: Tensor, prompt_len: int, rules: TokenRules,
               max_new: int, search: Search = Search()) -> tuple[list[list[int]], list[float]]:
        """Greedy (or seeded sampling) tokens after a prompt already run through the decoder into `cache` (from
        `self.cache`). prompt_logits (B, V) float32: the logits at the prompt's last position; rows are
        search.group samples per window. Returns per row the selected tokens up to and including the first
        <|endoftext|> (at most max_new) and their summed log-probability — what liteasr.decoding.greedy returns."""
        st, _ = self._run(cache, prompt_logits, prompt_len, rules, max_new, search)
        return st.tokens_per_row(rules.eot), st.sum_logprob.tolist()

    @torch.inference_mode()
    def beam_search(self, cache: KVCache, prompt_logits: Tensor, prompt_len: int, rules: TokenRules,
                    max_new: int, search: Search) -> list[list[tuple[list[int], float]]]:
        """Beam search after a prompt run into `cache`, rows = windows × search.group beams (window-major): the
        step, beam update and cache reorder replay from one graph. Returns what liteasr.decoding.beam_search
        returns: per window its hypotheses (tokens, score)."""
        st, bs = self._run(cache, prompt_logits, prompt_len, rules, max_new, search)
        return finish_beams(bs, st)

    def _run(self, cache: KVCache, prompt_logits: Tensor, prompt_len: int, rules: TokenRules, max_new: int,
             search: Search) -> tuple[GreedyState, BeamState | None]:
        b = prompt_logits.shape[0]
        device = prompt_logits.device
        st = self.state(b, device)
        bs = self.beam_state(b, search, device) if search.beam else None
        r = self._rules(rules, device)
        sample = self._sample(b, search.group, device)
        max_new = min(max_new, self.n_ctx - prompt_len + 1)
        graph = self._graph(cache, st, r, search, sample, bs) if self.use_graphs else None
        st.reset(prompt_len)
        # after a graph's warm-up the self cache holds junk at positions >= prompt_len: every one of them is
        # written by its own step before any query can see it (the mask hides later slots)
        if bs is not None:
            bs.reset()
            self._reorder(cache, beam_select(prompt_logits.clone(), st, bs, r, first=True))
        else:
            select_tokens(prompt_logits.clone(), st, r, True, search, sample)
        steps = 1
        if max_new > 1 and not bool(st.done.all()):
            # The all-finished flag of the previous chunk, copied to the host without waiting: the host looks at
            # it only after queueing the next chunk, so the GPU always has work and no step waits for the host.
            pending: tuple[Tensor, torch.cuda.Event | None] | None = None
            while steps < max_new:
                n = min(self.check_every, max_new - steps)
                for _ in range(n):
                    if graph is not None:
                        graph.replay()
                    else:
                        self._step(cache, st, r, search, sample, bs)
                steps += n
                if pending is not None:
                    flag, event = pending
                    if event is not None:
                        event.synchronize()  # the previous chunk is finished; this one is still running
                    if bool(flag):
                        break
                if device.type == "cuda":
                    flag = torch.empty((), dtype=torch.bool, pin_memory=True)
                    flag.copy_(st.done.all(), non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    pending = (flag, event)
                else:
                    pending = (st.done.all(), None)
            # the extra chunk (at most check_every steps) after everyone finished only writes ignored history, and
            # for beams changes nothing: a finished window's candidate set is full
        return st, bs


# ---------------------------------------------------------------------------------------------------
# the runtime of one model


SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


@dataclass(frozen=True)
class RuntimeOptions:
    """How a CudaRuntime runs its model."""

    compile: bool | str = False  # torch.compile the encoder layers: False, True or a mode name
    graphs: bool = True  # replay the encoder and the decode step from CUDA graphs (False: the same code, eager)
    sdpa: str | None = None  # pin the encoder's attention kernel (one of SDPA_BACKENDS); None: PyTorch's choice
    lowrank_attention: bool = True  # the reduced-rank Triton attention where `lowrank_attention_wins`
    check_every: int = 8  # decode steps between looks at the all-finished flag
    gelu_epilogue: bool = False  # fc1's bias + GELU (tanh form) in the cuBLASLt GEMM epilogue
    fused_norm: bool = False  # residual add + LayerNorm as one Triton pass (instead of `compile` fusing them)
    fp8: str | None = None  # encoder linears in FP8 E4M3 (Hopper+): None, "dense" or "all" (factored matmuls too)
    compile_decoder: bool | str = False  # torch.compile the greedy step's decoder forward before capture (or a mode)

    def __post_init__(self) -> None:
        if self.fused_norm and self.compile:
            raise ValueError("RuntimeOptions: fused_norm and compile both fuse the LayerNorm passes; choose one")
        if self.fp8 not in (None, "dense", "all"):
            raise ValueError(f"RuntimeOptions.fp8: {self.fp8!r} is not one of None, 'dense', 'all'")
        if self.sdpa is not None and self.sdpa not in SDPA_BACKENDS:
            raise ValueError(f"RuntimeOptions.sdpa: unknown attention backend {self.sdpa!r} "
                             f"(choose from {', '.join(SDPA_BACKENDS)})")


def sdpa_context(backends: list | None):
    """A context pinning SDPA to `backends` (torch.nn.attention.SDPBackend list), or a no-op for None."""
    if backends is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backends)


def _sdpa_backends(name: str | None) -> list | None:
    if name is None:
        return None
    from torch.nn.attention import SDPBackend

    return [{"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]]


class CudaRuntime:
    """The fast path of one model: `fast_encoder` + `EncoderRunner`, and `DecoderRunner`; use it wherever a
    model is taken (`transcribe(runtime, …)`, `runtime.decode(mel, …)`).

    It shares the model's weights (build a new one after changing the model's modules) and owns every buffer
    and graph it captures: nothing global, so a long-lived server can hold one per model and GPU. If capturing
    or compiling fails at a call, it warns (RuntimeWarning naming the error) and decodes with the eager
    reference instead, for that call and every later one (`self.failure` says why)."""

    def __init__(self, model: Whisper, options: RuntimeOptions = RuntimeOptions()) -> None:
        self.model = model
        self.options = options
        self.encoder = fast_encoder(model.encoder, compile=options.compile, allow_lowrank=options.lowrank_attention,
                                    gelu_epilogue=options.gelu_epilogue, fp8=options.fp8, fused_norm=options.fused_norm)
        backends = _sdpa_backends(options.sdpa)
        self.encoder_runner = EncoderRunner(self.encoder, backends) if options.graphs else None
        self.sdpa_backends = backends
        self.decoder = DecoderRunner(model.decoder, use_graphs=options.graphs, check_every=options.check_every,
                                     compile=options.compile_decoder)
        self.failure: str | None = None

    # what transcribe needs of a model
    @property
    def dims(self):
        return self.model.dims

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def is_multilingual(self) -> bool:
        return self.model.is_multilingual

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, 3000) -> audio features (B, 1500, d); from a graph's static buffer when graphs are on."""
        if self.encoder_runner is not None:
            return self.encoder_runner(mel)
        with torch.inference_mode(), sdpa_context(self.sdpa_backends), compile_scope():
            return self.encoder(mel)

    @torch.inference_mode()
    def decode_fast(self, mel: Tensor, options: DecodingOptions = DecodingOptions(),
                    languages: list[str | None] | None = None,
                    prompts: list[list[int]] | None = None) -> list[DecodingResult]:
        """liteasr.decoding.decode's steps with the fast encoder and the graph-captured decode step (raises on a
        capture or compile failure; `decode` falls back instead)."""
        mel = mel.to(next(self.model.parameters()).dtype)
        audio_features = self.encode(mel).clone()  # (B, 1500, d); a copy: the graph's buffer is reused
        languages = languages if languages is not None else [options.language] * mel.shape[0]
        return decode_features(self.model, _GraphEngine(self, audio_features), options, languages, prompts,
                               lambda: detect_language(self.model, audio_features)[0])

    def decode(self, mel: Tensor, options: DecodingOptions = DecodingOptions(),
               languages: list[str | None] | None = None,
               prompts: list[list[int]] | None = None) -> list[DecodingResult]:
        """Decode windows mel (B, n_mels, 3000) with the search and fallback of `options`: the same results as
        liteasr.decoding.decode (the fused encoder's output differs from the reference in rounding only)."""
        if self.failure is None:
            try:
                return self.decode_fast(mel, options, languages, prompts)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # capture or compile failures
                self.failure = f"{type(e).__name__}: {e}"
        warnings.warn(f"liteasr: the CUDA fast path failed ({self.failure}); decoding with the eager reference "
                      "instead (much slower)", RuntimeWarning, stacklevel=2)
        return decode(self.model, mel, options, languages, prompts)

    def transcribe(self, audio, **options):
        """`liteasr.transcribe.transcribe` through this runtime."""
        from ..transcribe import transcribe

        return transcribe(self, audio, **options)


class _GraphEngine:
    """liteasr.decoding's Engine on a CudaRuntime: the runner's static cache for each pass (rows × samples or
    beams), the prompt through model.py's decoder, the search replayed from the runner's graphs."""

    def __init__(self, runtime: CudaRuntime, audio_features: Tensor) -> None:
        self.rt, self.features = runtime, audio_features  # (B, S, d)
        self.cache: KVCache | None = None

    def prefill(self, rows: list[int], repeat: int, tokens: Tensor) -> Tensor:
        idx = torch.tensor(rows, device=self.features.device).repeat_interleave(repeat)
        self.cache = self.rt.decoder.cache(self.features[idx])
        return self.rt.model.decoder(tokens.to(self.features.device), self.cache)

    def greedy(self, prompt_logits, prompt_len, rules, max_new, search):
        return self.rt.decoder.greedy(self.cache, prompt_logits, prompt_len, rules, max_new, search)

    def beam_search(self, prompt_logits, prompt_len, rules, max_new, search):
        return self.rt.decoder.beam_search(self.cache, prompt_logits, prompt_len, rules, max_new, search)
