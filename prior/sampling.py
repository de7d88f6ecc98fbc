"""Sampling token grids from a ``Prior``: KV-cached or full-prefix, with temperature, top-k, top-p and CFG.

The cached path runs vqgen's decoding step (``prior.decoding.StaticDecoder``: the transformers model's weights, a
static KV cache, optionally compiled and captured as a CUDA graph) or, with ``decoder=transformers``, the model's
own forward with a ``StaticCache``.

Randomness is drawn per *sample*, not per batch: sample ``i`` of a run with seed ``s`` takes its uniforms
from a generator seeded by ``(s, i)`` and turns them into tokens by inverse-CDF sampling. So a sample does
not depend on the batch size, on how many processes share the work, or on whether the KV cache is used
(the cached and uncached paths compute the same logits up to float rounding and consume the same uniforms).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from transformers import StaticCache

from vqgen.core.errors import UserError

from .decoding import StaticDecoder, UnsupportedModelError
from .model import Prior

DECODERS = ("vqgen", "transformers")


class SamplingError(UserError, ValueError):
    """Sampling options that cannot work with this prior; the message says what to change."""


@dataclass
class SamplingConfig:
    """How to draw samples.

    ``temperature`` 0 means greedy decoding (argmax). ``top_k`` 0 and ``top_p`` 1 disable those filters.
    ``cfg_scale`` is the classifier-free guidance scale (1 = plain conditional sampling; only for
    class-conditional priors). ``labels`` are cycled over the samples; empty means classes
    ``0, 1, 2, ...`` in turn (class-conditional) or no class (unconditional, label -1).

    ``use_cache``: a static KV cache (allocated once for the whole sequence, so no step allocates memory that
    grows with the length); false re-runs the whole prefix each step (slow; for checks).
    ``decoder`` (with the cache): ``vqgen``, the decoding step of ``prior.decoding`` (the transformers model's
    weights, vqgen's own cache and step, several times less overhead per token), or ``transformers``, the model's
    own forward with its ``StaticCache``. The two give the same logits up to float rounding.
    ``compile``: run each decoding step through ``torch.compile`` (fixed shapes, so it compiles once per batch
    size; the first batch pays the compilation, a minute or two on a CPU). Where compilation fails (no C++
    compiler, an unsupported platform) sampling warns once and runs uncompiled.
    ``cuda_graph`` (``decoder=vqgen``, CUDA only; elsewhere the step runs eagerly): capture the decoding step as
    one CUDA graph per batch size, so a step is one launch and allocates nothing. Where capture fails, sampling
    warns once and runs the step without the graph.
    """

    num_samples: int = 64
    batch_size: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    labels: list[int] = field(default_factory=list)
    use_cache: bool = True
    decoder: str = "vqgen"
    compile: bool = False
    cuda_graph: bool = False
    seed: int = 0

    cli_aliases = {"--no-cache": ("use_cache", False)}  # pipelines.sample: re-run the whole prefix each step

    def validate(self) -> None:
        """Reject values that cannot be sampled with."""
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("num_samples and batch_size must be >= 1")
        if not (math.isfinite(self.temperature) and math.isfinite(self.cfg_scale) and math.isfinite(self.top_p)):
            raise ValueError(f"temperature, cfg_scale and top_p must be finite numbers, got {self.temperature}, "
                             f"{self.cfg_scale}, {self.top_p}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_k must be >= 0 (0 = off) and top_p in (0, 1] (1 = off)")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.cuda_graph and (self.decoder != "vqgen" or not self.use_cache):
            raise ValueError("cuda_graph needs decoder=vqgen and use_cache=true (the graph is vqgen's cached step)")


def sample_labels(prior: Prior, cfg: SamplingConfig, indices: torch.Tensor) -> torch.Tensor:
    """Class label (B,) of each global sample index in ``indices`` (B,); -1 when unconditional."""
    vocab = prior.vocab
    if not vocab.class_conditional:
        if any(label != -1 for label in cfg.labels):
            raise SamplingError("this prior is unconditional; drop the class labels (or train with class_conditional)")
        return torch.full_like(indices, -1)
    if cfg.labels:
        bad = [label for label in cfg.labels if not -1 <= label < vocab.num_classes]
        if bad:
            raise SamplingError(f"labels {bad} are not classes of this prior; use 0..{vocab.num_classes - 1} or -1")
        table = torch.tensor(cfg.labels, dtype=torch.long)
        return table[indices % len(cfg.labels)]
    return indices % vocab.num_classes


def per_sample_uniforms(seed: int, indices: torch.Tensor, steps: int) -> torch.Tensor:
    """Uniforms (B, steps) in [0, 1); row ``b`` depends only on ``(seed, indices[b])``."""
    rows = []
    for index in indices.tolist():
        # SeedSequence mixes (seed, index) into a well-spread 64-bit seed, so nearby pairs don't collide.
        state = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)
        gen = torch.Generator().manual_seed(state)
        rows.append(torch.rand(steps, generator=gen, dtype=torch.float64))
    return torch.stack(rows)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf. ``logits`` (B, V) float32."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the most likely token always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, u: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Next token (B,) from masked logits (B, V) and uniforms ``u`` (B,) by inverse-CDF sampling."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    cdf = logits.double().softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    # Rounding can put the target past the last nonzero entry; step back to the last allowed token.
    last_allowed = (cdf < cdf[:, -1:]).sum(dim=1)
    return torch.minimum(idx, last_allowed)


def decode_step(prior: Prior) -> Callable:
    """``decoder=transformers``: the prior's transformer compiled for one cached decoding step (made once per prior,
    then reused)."""
    compiled = prior.__dict__.get("_compiled_decode")
    if compiled is None:
        compiled = torch.compile(prior.transformer, dynamic=False)
        prior.__dict__["_compiled_decode"] = compiled  # not a submodule: stays out of state_dict and saves

    def step(**kwargs):
        if prior.__dict__.get("_compile_failed"):
            return prior.transformer(**kwargs)
        try:
            return compiled(**kwargs)
        except Exception as err:  # noqa: BLE001 - any compiler failure: fall back to eager, which is exact
            prior.__dict__["_compile_failed"] = True
            warnings.warn(f"torch.compile of the decoding step failed ({type(err).__name__}: {str(err)[:200]}); "
                          "sampling without compilation", RuntimeWarning, stacklevel=2)
            return prior.transformer(**kwargs)

    return step


_CACHE_IGNORED = (
    "the transformer ignored the KV cache it was given (transformers < 5.24 names it past_key_values): every step "
    "would see one token and the samples would be noise; install transformers>=5.24 as pyproject.toml requires, or "
    "sample with use_cache=false")


def owned_decoder(prior: Prior, rows: int, cfg: SamplingConfig) -> StaticDecoder:
    """The ``StaticDecoder`` for ``rows`` sequences, set up as ``cfg`` asks (compiled, captured).

    Decoders are kept on the prior (outside its state_dict) per (rows, autocast dtype, compile, graph), so that
    compilation and capture happen once per batch size; they are rebuilt when the prior's weights move (another
    device, new tensors).
    """
    model = prior.transformer
    device = next(model.parameters()).device
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    graph = cfg.cuda_graph and device.type == "cuda"
    weights = tuple(p.data_ptr() for p in model.parameters())
    store = prior.__dict__.setdefault("_decoders", {})
    key = (rows, autocast, cfg.compile, graph)
    entry = store.get(key)
    if entry is not None and entry[0] == weights:
        entry[1].refresh()  # the weights may have been trained in place since
        return entry[1]
    try:
        decoder = StaticDecoder(model, rows, prior.vocab.seq_len)
    except UnsupportedModelError as err:
        raise SamplingError(str(err)) from None
    if cfg.compile and not prior.__dict__.get("_compile_failed"):
        try:
            decoder.compile()
        except Exception as err:  # noqa: BLE001 - any compiler failure: the eager step is exact
            prior.__dict__["_compile_failed"] = True
            warnings.warn(f"torch.compile of the decoding step failed ({type(err).__name__}: {str(err)[:200]}); "
                          "sampling without compilation", RuntimeWarning, stacklevel=2)
    if graph and not prior.__dict__.get("_graph_failed"):
        try:
            decoder.capture()
        except Exception as err:  # noqa: BLE001 - a failed capture leaves the (exact) uncaptured step
            prior.__dict__["_graph_failed"] = True
            warnings.warn(f"CUDA graph capture of the decoding step failed ({type(err).__name__}: {str(err)[:200]}); "
                          "sampling without the graph", RuntimeWarning, stacklevel=2)
    if len(store) >= 4:  # a few batch sizes at most; each holds a KV cache
        store.pop(next(iter(store)))
    store[key] = (weights, decoder)
    return decoder


def _sample_owned(prior: Prior, first: torch.Tensor, uniforms: torch.Tensor, cfg: SamplingConfig,
                  guided: bool) -> torch.Tensor:
    """``sample_batch`` through vqgen's decoding step: first tokens (B,) -> sequences (B, seq_len)."""
    vocab = prior.vocab
    batch, seq_len = first.shape[0], vocab.seq_len
    decoder = owned_decoder(prior, 2 * batch if guided else batch, cfg)
    step = decoder.step_at if decoder.compiled or decoder.captured else decoder.step
    ids = torch.empty(batch, seq_len, dtype=torch.long, device=first.device)  # filled position by position
    ids[:, 0] = first
    tokens = torch.cat([first, torch.full_like(first, vocab.null_class)]) if guided else first  # (B or 2B,)
    for t in range(1, seq_len):
        logits = step(tokens, t - 1).float()  # (B or 2B, V)
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg.cfg_scale * (cond - uncond)
        logits = logits.masked_fill(~vocab.allowed(ids[:, :t]), float("-inf"))
        nxt = choose_tokens(logits, uniforms[:, t - 1], cfg)  # (B,)
        ids[:, t] = nxt
        tokens = torch.cat([nxt, nxt]) if guided else nxt
    return ids


@torch.inference_mode()
def sample_batch(prior: Prior, labels: torch.Tensor, uniforms: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Generate one batch of full sequences (B, seq_len) for class ``labels`` (B,) with ``uniforms`` (B, T-1)."""
    vocab, model = prior.vocab, prior.transformer
    device = next(model.parameters()).device
    guided = vocab.class_conditional and cfg.cfg_scale != 1.0
    batch = labels.shape[0]
    first = vocab.condition_tokens(labels.to(device), batch, device)  # (B,)
    if cfg.use_cache and cfg.decoder == "vqgen":
        return _sample_owned(prior, first, uniforms.to(device), cfg, guided)
    ids = first[:, None]  # (B, 1)
    if guided:
        null = torch.full_like(ids, vocab.null_class)
    cache = StaticCache(config=model.config, max_cache_len=vocab.seq_len) if cfg.use_cache else None
    step = decode_step(prior) if cfg.use_cache and cfg.compile else model
    step_input = torch.cat([ids, null]) if guided else ids  # (B or 2B, t)
    uniforms = uniforms.to(device)
    for t in range(1, vocab.seq_len):
        if cfg.use_cache:
            out = step(input_ids=step_input, cache=cache, use_cache=True, logits_to_keep=1)
            if t == 1 and cache.get_seq_length() != step_input.shape[1]:
                raise SamplingError(_CACHE_IGNORED)
        else:
            out = model(input_ids=step_input, use_cache=False, logits_to_keep=1)
        logits = out.logits[:, -1].float()  # (B or 2B, V)
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg.cfg_scale * (cond - uncond)
        logits = logits.masked_fill(~vocab.allowed(ids), float("-inf"))
        nxt = choose_tokens(logits, uniforms[:, t - 1], cfg)[:, None]  # (B, 1)
        ids = torch.cat([ids, nxt], dim=1)
        if guided:
            null = torch.cat([null, nxt], dim=1)
        new_tokens = torch.cat([nxt, nxt]) if guided else nxt
        # With a cache only the new token is fed; without, the whole prefix is re-run.
        step_input = new_tokens if cfg.use_cache else (torch.cat([ids, null]) if guided else ids)
    return ids


def sample_tokens(
    prior: Prior,
    cfg: SamplingConfig,
    indices: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the token grids of global sample ``indices`` (default ``0..num_samples-1``).

    Returns ``(codes (N, h, w) int64, labels (N,) int64)`` on the CPU. ``progress(n)`` is called after
    each batch with the number of samples just finished.
    """
    cfg.validate()
    if cfg.cfg_scale != 1.0 and not prior.vocab.class_conditional:
        raise SamplingError("cfg_scale needs a class-conditional prior; use cfg_scale=1 for this one")
    if indices is None:
        indices = torch.arange(cfg.num_samples)
    was_training = prior.training
    prior.eval()
    codes, labels = [], []
    try:
        for chunk in indices.split(cfg.batch_size):
            chunk_labels = sample_labels(prior, cfg, chunk)
            uniforms = per_sample_uniforms(cfg.seed, chunk, prior.vocab.seq_len - 1)
            ids = sample_batch(prior, chunk_labels, uniforms, cfg)
            codes.append(prior.vocab.decode(ids).cpu())
            labels.append(chunk_labels)
            if progress is not None:
                progress(len(chunk))
    finally:
        prior.train(was_training)
    h, w = prior.vocab.grid
    if not codes:
        return torch.empty(0, h, w, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(codes), torch.cat(labels)
