"""GPU runtime: the same model rearranged for speed, and replayed from CUDA graphs.

Nothing here changes `model.py`: modules are wrapped or swapped in copies that share the model's
weights, and model.py's forward stays the reference every fast path is checked against.

Encoder (`fast_encoder`, `EncoderRunner`):
- q/k/v become one projection: one (d, 3d) matmul for dense layers; for factored layers one
  (d, r_q + r_k + r_v) down-projection — the three thin matmuls that run at a fraction of the GPU's
  rate become one wider one — followed by the three small up-projections;
- attention in the reduced dimension (liteasr.kernels, Triton) where the ranks are small enough for
  it to win on measured hardware (`lowrank_attention_wins`), SDPA otherwise;
- biases ride in cuBLAS epilogues (addmm); optionally `torch.compile` fuses LayerNorm / GELU /
  residual adds; `EncoderRunner` captures one CUDA graph per input shape.

Decoder (`DecoderRunner`): one greedy decode step — embedding, every layer against a static
448-slot KV cache under a mask (TextDecoder's Tensor-offset path), logits, Whisper's suppression
and timestamp rules, argmax, log-probability, bookkeeping — captured in one CUDA graph per batch
size. Token selection stays on the device; the host replays the graph and looks at the
all-finished flag once per chunk of steps, one chunk behind, so no step waits for the host.
`fast_decode` is what `liteasr.decoding.decode` calls for CUDA models.
"""

from __future__ import annotations

import copy
import os
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import Attention, AudioEncoder, KVCache, LowRankLinear, TextDecoder, Whisper


# ---------------------------------------------------------------------------------------------------
# encoder


class FusedQKV(nn.Module):
    """q, k, v of one attention block from a single down-projection. x (B, T, d) -> 3 × (B, T, d).

    Dense parts put their final outputs (with bias) in the shared matmul; factored parts put their
    rank-r intermediates there and add bias in the epilogue of their small up-projection."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        parts = (attn.q_proj, attn.k_proj, attn.v_proj)
        d = attn.out_proj.out_features if isinstance(attn.out_proj, LowRankLinear) else attn.out_proj.weight.shape[0]
        kw = dict(dtype=_dtype(attn.q_proj), device=_device(attn.q_proj))
        down, down_bias, self.splits, self.factored = [], [], [], []
        self.up, self.up_bias = nn.ParameterList(), nn.ParameterList()
        for m in parts:
            bias = m.bias.detach() if m.bias is not None else torch.zeros(d, **kw)
            if isinstance(m, LowRankLinear):
                down.append(m.weight1)
                down_bias.append(torch.zeros(m.rank, **kw))
                self.up.append(nn.Parameter(m.weight2.detach().contiguous(), requires_grad=False))
                self.up_bias.append(nn.Parameter(bias, requires_grad=False))
            else:
                down.append(m.weight.T)
                down_bias.append(bias)
            self.splits.append(down[-1].shape[1])
            self.factored.append(isinstance(m, LowRankLinear))
        self.down = nn.Parameter(torch.cat(down, 1).detach().contiguous(), requires_grad=False)  # (d, Σ r_i)
        self.down_bias = nn.Parameter(torch.cat(down_bias), requires_grad=False)

    def project(self, x: Tensor) -> tuple[Tensor, ...]:
        """The shared down-projection: x (B, T, d) -> per part (B·T, r_i) (factored) or (B·T, d) (dense, final)."""
        return torch.addmm(self.down_bias, x.flatten(0, 1), self.down).split(self.splits, dim=-1)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        h = self.project(x)  # (B·T, r_i)
        ups = iter(zip(self.up, self.up_bias))
        outs = []
        for part, factored in zip(h, self.factored):
            if factored:
                w, b = next(ups)
                part = torch.addmm(b, part, w)  # (B·T, d)
            outs.append(part.view(*x.shape[:2], -1))
        return tuple(outs)


def _dtype(m: nn.Module) -> torch.dtype:
    return next(m.parameters()).dtype


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


def lowrank_attention_wins(r_k: int, r_v: int, d_h: int) -> bool:
    """Whether the reduced-rank Triton kernel beats SDPA, by the measured table in
    docs/gpu-attention-kernel-h200-graph.log (H200, large-v3 heads, T = 1500, CUDA-graph replay): at
    r_k = r_v = 16 / 32 it took 0.74-0.94× SDPA's time at batch 8 and 32 and tied at batch 1, at 64 / 64 it
    was 1.0-1.2× slower, at 128 / 128 1.6-1.8× slower. So: r_k + r_v <= d_h (the FLOP cost model alone,
    r_k + r_v < 2 d_h, is necessary but not sufficient: both paths compute the same T² H exponentials)."""
    return r_k + r_v <= d_h


class FastSelfAttention(nn.Module):
    """Encoder self-attention with fused q/k/v; same math as model.Attention (checked in tests).

    With factored q, k and v whose ranks pass `lowrank_attention_wins`, on a CUDA device with Triton, the
    attention core runs in the reduced dimension (liteasr.kernels.lowrank_attention) on the rank-r slices of
    the fused down-projection; otherwise SDPA on the up-projected (B, H, T, d_h) heads."""

    def __init__(self, attn: Attention, allow_lowrank: bool = True) -> None:
        super().__init__()
        self.n_head = attn.n_head
        self.qkv = FusedQKV(attn)
        self.out_proj = attn.out_proj
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


@torch.no_grad()
def fast_encoder(encoder: AudioEncoder, compile: bool | str = False, allow_lowrank: bool = True) -> AudioEncoder:
    """A copy of `encoder` that shares its weights, with FastSelfAttention in every layer; `encoder` is unchanged.

    compile: False, True (torch.compile's default mode) or a torch.compile mode name, e.g.
    "max-autotune-no-cudagraphs"; each layer is compiled (layers with the same ranks share one compiled graph)."""
    enc = _shallow(encoder)
    enc.layers = nn.ModuleList()
    if compile:
        import torch._dynamo

        # every layer with a distinct rank combination is its own specialisation
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    mode = compile if isinstance(compile, str) else None
    for layer in encoder.layers:
        new = _shallow(layer)
        if isinstance(layer.self_attn, Attention):
            new.self_attn = FastSelfAttention(layer.self_attn, allow_lowrank)
        if compile:
            new.forward = torch.compile(new.forward, dynamic=False, mode=mode)
        enc.layers.append(new)
    return enc


@torch.no_grad()
def optimize_encoder(model: Whisper, compile: bool = False) -> Whisper:
    """Swap the encoder's attention blocks for FastSelfAttention, in place; optionally compile each layer.
    (Mutates `model`; `fast_encoder` makes a weight-sharing copy instead.)"""
    for layer in model.encoder.layers:
        if isinstance(layer.self_attn, Attention):
            layer.self_attn = FastSelfAttention(layer.self_attn)
    if compile:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        for layer in model.encoder.layers:
            layer.forward = torch.compile(layer.forward, dynamic=False)
    return model


class EncoderRunner:
    """Encoder calls replayed from one CUDA graph per input shape (captured on first use).

    `module` is an encoder (e.g. `fast_encoder(model.encoder)`) or, as before, a Whisper model (its encoder
    is used as is). `sdpa_backends` (a list of torch.nn.attention.SDPBackend) pins the attention kernels
    chosen at capture time."""

    def __init__(self, module: nn.Module, sdpa_backends: list | None = None) -> None:
        self.encoder = module.encoder if isinstance(module, Whisper) else module
        self.sdpa_backends = sdpa_backends
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}

    def _context(self):
        import contextlib

        if self.sdpa_backends is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(self.sdpa_backends)

    @torch.inference_mode()
    def _capture(self, mel: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        static_in = mel.clone()
        with self._context():
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


NEG_INF = float("-inf")


@dataclass(frozen=True)
class TokenRules:
    """The token ids greedy decoding needs (Whisper's rules, as in liteasr.decoding).

    suppress: never selected; begin_suppress: not selected as the first token; timestamp_begin: None when the
    window is decoded without timestamps, else <|0.00|>'s id (then no_timestamps is suppressed, timestamps come
    in (start, end) pairs that never go back, the first one at most max_initial steps in)."""

    suppress: tuple[int, ...]
    begin_suppress: tuple[int, ...]
    eot: int
    no_timestamps: int
    timestamp_begin: int | None = None
    max_initial: int = 50

    @classmethod
    def from_tokenizer(cls, tok, timestamps: bool, max_initial_timestamp: float = 1.0,
                       suppress_eot: bool = False) -> "TokenRules":
        """Rules for a liteasr Tokenizer. suppress_eot (benchmarks) forbids <|endoftext|> at every step, as
        transformers' min_new_tokens does, so that every window decodes the same number of tokens."""
        from .tokenizer import TIME_PRECISION

        suppress = tuple(tok.suppress_tokens) + ((tok.eot,) if suppress_eot else ())
        return cls(suppress, (tok.encode(" ")[0], tok.eot), tok.eot, tok.no_timestamps,
                   tok.timestamp_begin if timestamps else None, round(max_initial_timestamp / TIME_PRECISION))


class GreedyState:
    """Static per-batch buffers of one greedy decode (fixed addresses, so a captured step can update them).

    tokens (B, 1): the token fed to the next step, at position `offset` (0-dim); step (0-dim): index of the
    next token to select; history (B, max_steps); done (B,); sum_logprob (B,) float32; for the timestamp
    rules, per row: last and previous selected token, the latest timestamp token (-1: none) and the count."""

    def __init__(self, batch: int, max_steps: int, device: torch.device) -> None:
        kw = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, 1, **kw)
        self.offset = torch.zeros((), **kw)
        self.step = torch.zeros((), **kw)
        self.history = torch.zeros(batch, max_steps, **kw)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.sum_logprob = torch.zeros(batch, dtype=torch.float32, device=device)
        self.last = torch.full((batch,), -1, **kw)
        self.prev = torch.full((batch,), -1, **kw)
        self.last_stamp = torch.full((batch,), -1, **kw)
        self.n_gen = torch.zeros(batch, **kw)

    def reset(self, prompt_len: int) -> None:
        self.offset.fill_(prompt_len - 1)  # select() advances it to the first generated token's position
        self.step.zero_()
        self.done.zero_()
        self.sum_logprob.zero_()
        for t in (self.last, self.prev, self.last_stamp):
            t.fill_(-1)
        self.n_gen.zero_()


class _RuleTensors:
    """TokenRules as device tensors: index lists, the (V,) column index and scalars."""

    def __init__(self, rules: TokenRules, vocab: int, device: torch.device) -> None:
        self.rules = rules
        self.suppress = torch.tensor(rules.suppress, dtype=torch.long, device=device)
        self.begin_suppress = torch.tensor(rules.begin_suppress, dtype=torch.long, device=device)
        self.col = torch.arange(vocab, device=device)  # (V,)


def select_tokens(logits: Tensor, st: GreedyState, r: _RuleTensors, first: bool) -> Tensor:
    """One greedy step on the device, the same arithmetic as liteasr.decoding.decode: mask `logits` (B, V) float32
    in place by the rules, take the argmax, add its log-probability for rows not yet finished, record it in
    st.history[:, st.step], advance the rule state of unfinished rows, mark rows that chose <|endoftext|>, and
    feed the choice back as st.tokens at position st.offset + 1. No host synchronisation. Returns (B,) tokens."""
    rules = r.rules
    logits.index_fill_(1, r.suppress, NEG_INF)
    if first:
        logits.index_fill_(1, r.begin_suppress, NEG_INF)
    ts0 = rules.timestamp_begin
    if ts0 is not None:
        col = r.col[None, :]  # (1, V)
        logits[:, rules.no_timestamps] = NEG_INF
        if first:  # a window starts with a timestamp, no later than max_initial
            logits.masked_fill_((col < ts0) | (col > ts0 + rules.max_initial), NEG_INF)
        else:
            last_ts = (st.n_gen >= 1) & (st.last >= ts0)  # (B,)
            pen_ts = (st.n_gen < 2) | (st.prev >= ts0)
            closed, open_ = (last_ts & pen_ts)[:, None], (last_ts & ~pen_ts)[:, None]
            # never go back in time; an end may equal its own start
            floor = torch.where(last_ts & ~pen_ts, st.last_stamp, st.last_stamp + 1)[:, None]
            back = (st.last_stamp >= 0)[:, None] & (col >= ts0) & (col < floor)
            logits.masked_fill_((closed & (col >= ts0)) | (open_ & (col < rules.eot)) | back, NEG_INF)
            # when the timestamps together are likelier than any single text token, emit a timestamp
            logprobs = logits.log_softmax(-1)
            ts_mass = logprobs[:, ts0:].logsumexp(-1)
            text_best = logprobs[:, :ts0].max(-1).values
            logits.masked_fill_((ts_mass > text_best)[:, None] & (col < ts0), NEG_INF)
    nxt = logits.argmax(-1)  # (B,)
    logprob = logits.log_softmax(-1).gather(1, nxt[:, None])[:, 0]
    alive = ~st.done
    st.sum_logprob.add_(torch.where(alive, logprob, 0.0))
    st.history.index_copy_(1, st.step.view(1), nxt[:, None])
    if ts0 is not None:
        st.prev.copy_(torch.where(alive, st.last, st.prev))
        st.last_stamp.copy_(torch.where(alive & (nxt >= ts0), nxt, st.last_stamp))
    st.last.copy_(torch.where(alive, nxt, st.last))
    st.n_gen.add_(alive.long())
    st.done.logical_or_(nxt == rules.eot)
    st.tokens.copy_(nxt[:, None])
    st.offset.add_(1)
    st.step.add_(1)
    return nxt


class DecoderRunner:
    """Greedy decoding with one decode step per (batch size, rules) captured in a CUDA graph.

    Per batch size it keeps a static KVCache (self-attention 448 slots, cross-attention from the audio
    features, written in place) and a GreedyState; the captured step reads st.tokens / st.offset and writes
    the next ones, so replays chain on the device. use_graphs=False runs the very same step eagerly (CPU,
    tests, debugging). check_every: steps per chunk between looks at the all-finished flag."""

    def __init__(self, decoder: TextDecoder, use_graphs: bool = True, check_every: int = 8) -> None:
        self.decoder = decoder
        self.use_graphs = use_graphs
        self.check_every = check_every
        self.n_ctx = decoder.embed_positions.num_embeddings
        self.caches: dict[int, KVCache] = {}
        self.states: dict[int, GreedyState] = {}
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, _RuleTensors]] = {}
        self.rule_tensors: dict[tuple, _RuleTensors] = {}
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

    def _rules(self, rules: TokenRules, device: torch.device) -> _RuleTensors:
        key = (rules, str(device))
        if key not in self.rule_tensors:
            self.rule_tensors[key] = _RuleTensors(rules, self.decoder.embed_tokens.num_embeddings, device)
        return self.rule_tensors[key]

    # the step ---------------------------------------------------------------------------------
    def _step(self, cache: KVCache, st: GreedyState, r: _RuleTensors) -> None:
        logits = self.decoder(st.tokens, cache, st.offset)[:, -1]  # (B, V) float32; Tensor offset: static shapes
        select_tokens(logits, st, r, first=False)

    def _graph(self, cache: KVCache, st: GreedyState, r: _RuleTensors) -> torch.cuda.CUDAGraph:
        b = st.tokens.shape[0]
        key = (b, r.rules)
        if key not in self.graphs:
            # Warm-up on a side stream (as capture requires) runs real steps: park them in the last slots of the
            # self cache (never read before their own step rewrites them) so the prompt's keys/values survive;
            # callers reset the state afterwards.
            st.offset.fill_(self.n_ctx - 3)
            st.step.zero_()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(cache, st, r)
            torch.cuda.current_stream().wait_stream(stream)
            if self.pool is None:
                # one memory pool for every graph of this runner: they never run concurrently, and all of
                # their outputs go to buffers allocated outside the graphs
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._step(cache, st, r)
            self.graphs[key] = (graph, r)
        return self.graphs[key][0]

    @torch.inference_mode()
    def greedy(self, cache: KVCache, prompt_logits: Tensor, prompt_len: int, rules: TokenRules,
               max_new: int) -> tuple[list[list[int]], list[float]]:
        """Greedy tokens after a prompt already run through the decoder into `cache` (from `self.cache`).

        prompt_logits (B, V) float32: the logits at the prompt's last position. Returns per row the selected
        tokens up to and including the first <|endoftext|> (at most max_new) and the summed log-probability of
        those tokens — what liteasr.decoding.decode collects."""
        b = prompt_logits.shape[0]
        device = prompt_logits.device
        st = self.state(b, device)
        r = self._rules(rules, device)
        max_new = min(max_new, self.n_ctx - prompt_len)
        graph = self._graph(cache, st, r) if self.use_graphs else None
        st.reset(prompt_len)
        # after a graph's warm-up the self cache holds junk at positions >= prompt_len: every one of them is
        # written by its own step before any query can see it (the mask hides later slots)
        select_tokens(prompt_logits.clone(), st, r, first=True)
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
                        self._step(cache, st, r)
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
            # the extra chunk (at most check_every steps) after everyone finished only writes ignored history
        history = st.history[:, :steps].tolist()
        eot = rules.eot
        tokens = [row[: row.index(eot) + 1] if eot in row else row for row in history]
        return tokens, st.sum_logprob.tolist()


class CudaRuntime:
    """The fast path of one model: `fast_encoder` + `EncoderRunner`, and `DecoderRunner`.

    Weight-sharing copies of the model's modules, so build a new one after changing the model's modules;
    `runtime_for` does that automatically when parameters are replaced or modified in place."""

    def __init__(self, model: Whisper, compile: bool | str = False, use_graphs: bool = True,
                 sdpa_backends: list | None = None) -> None:
        self.encoder = fast_encoder(model.encoder, compile=compile)
        self.encoder_runner = EncoderRunner(self.encoder, sdpa_backends) if use_graphs else None
        self.decoder = DecoderRunner(model.decoder, use_graphs=use_graphs)
        self.signature = _signature(model)

    def encode(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, 3000) -> audio features (B, 1500, d); from a graph's static buffer when graphs are on."""
        if self.encoder_runner is not None:
            return self.encoder_runner(mel)
        with torch.inference_mode():
            return self.encoder(mel)


def _signature(model: Whisper) -> tuple:
    # identity, storage and in-place version of every parameter: a changed module or weight makes it differ
    # (parameters made under inference_mode have no version counter: they cannot be modified in place anyway)
    return tuple((id(p), p.data_ptr(), 0 if p.is_inference() else p._version) for p in model.parameters())


_RUNTIMES: "weakref.WeakKeyDictionary[Whisper, CudaRuntime]" = weakref.WeakKeyDictionary()
_FAILED: "weakref.WeakKeyDictionary[Whisper, str]" = weakref.WeakKeyDictionary()


def runtime_for(model: Whisper) -> CudaRuntime:
    """The model's cached CudaRuntime, rebuilt when its parameters changed. LITEASR_COMPILE=1 (or a torch.compile
    mode name) compiles the encoder layers when the runtime is built."""
    rt = _RUNTIMES.get(model)
    if rt is None or rt.signature != _signature(model):
        flag = os.environ.get("LITEASR_COMPILE", "")
        compile: bool | str = flag if flag not in ("", "0", "1") else flag == "1"
        rt = _RUNTIMES[model] = CudaRuntime(model, compile=compile)
    return rt


def fast_path_disabled() -> str | None:
    """Why decode should not take the CUDA fast path: LITEASR_RUNTIME=eager asks for the reference."""
    if os.environ.get("LITEASR_RUNTIME", "").lower() == "eager":
        return "LITEASR_RUNTIME=eager"
    return None


@torch.inference_mode()
def fast_decode(model: Whisper, mel: Tensor, options, languages: list[str] | None = None):
    """liteasr.decoding.decode on a CUDA model through CudaRuntime: same arguments, same results (the encoder
    output of the fused layers differs from the reference in rounding only). If building or capturing fails
    it warns (RuntimeWarning naming the error) and returns the reference decode's result; the failure is
    remembered for this model, and the warning repeats on each call."""
    from . import decoding

    reason = _FAILED.get(model)
    if reason is None:
        try:
            return _fast_decode(model, mel, options, languages)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # capture or compile failures
            reason = _FAILED[model] = f"{type(e).__name__}: {e}"
            _RUNTIMES.pop(model, None)
    warnings.warn(f"liteasr: the CUDA fast path failed ({reason}); decoding with the eager reference instead "
                  "(much slower). Set LITEASR_RUNTIME=eager to choose that path explicitly.", RuntimeWarning,
                  stacklevel=3)
    return decoding.decode_reference(model, mel, options, languages)


@torch.inference_mode()
def _fast_decode(model: Whisper, mel: Tensor, options, languages: list[str] | None,
                 rt: CudaRuntime | None = None):
    """decode_reference's steps with rt's encoder and DecoderRunner (rt: the model's cached runtime by default;
    tests pass CudaRuntime(model, use_graphs=False) to run the same code on CPU)."""
    from .decoding import _no_speech_prob, _result, detect_language, prompt_batch

    tok = model.tokenizer
    rt = rt or runtime_for(model)
    mel = mel.to(next(model.parameters()).dtype)
    audio_features = rt.encode(mel)  # (B, 1500, d)
    cache = rt.decoder.cache(audio_features)
    languages, prompts, max_new = prompt_batch(model, options, languages, mel.shape[0],
                                               lambda: detect_language(model, audio_features, cache)[0])
    tokens = torch.tensor(prompts, device=mel.device)  # (B, P)
    logits = model.decoder(tokens, cache)  # (B, P, V) float32, eager: the prompt runs once
    no_speech_prob = _no_speech_prob(logits[:, 0], tok)
    rules = TokenRules.from_tokenizer(tok, options.timestamps, options.max_initial_timestamp)
    generated, sum_logprob = rt.decoder.greedy(cache, logits[:, -1], tokens.shape[1], rules, max_new)
    return [_result(g, lang, lp, nsp, tok) for g, lang, lp, nsp in
            zip(generated, languages, sum_logprob, no_speech_prob.tolist())]
