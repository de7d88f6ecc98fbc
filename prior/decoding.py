"""KV-cached decoding steps that vqgen owns, over the weights of the prior's ``transformers`` model.

:class:`StaticDecoder` runs one token per sequence through a ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` (the two
architectures ``prior.model`` builds) and returns the next-token logits. It reads the weights of the transformers
model (the same tensors; under autocast one cast copy of each matrix, made once), keeps its own static KV cache
(allocated once, for the whole sequence), and calls the model's own norms, activations and rotary tables, so each
step does the arithmetic of the transformers forward with a cache, minus the generic machinery (cache objects,
mask construction, output dataclasses) that makes that forward a few times slower per token than its matrix products.

Two ways to run a step:

- :meth:`StaticDecoder.step` with a Python position (eager): attention over the filled prefix only, no mask;
  the cheapest on a CPU.
- :meth:`StaticDecoder.step_at` through one fixed-shape function of device tensors (token buffer, position
  buffer; attention over the whole cache with a mask past the position), which ``torch.compile`` compiles
  once and which can be captured as one CUDA graph (:meth:`StaticDecoder.capture`): a replay launches the
  whole step at once and allocates nothing.

Exactness: both ways give the logits of the transformers forward up to float rounding (the tests compare them
with a full-prefix forward, and greedy tokens with the uncached sampler).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("gpt2", "llama")


class UnsupportedModelError(ValueError):
    """The transformers model is not one the owned decoding step implements (the sampler can use transformers')."""


def model_arch(model: nn.Module) -> str:
    """``gpt2`` or ``llama`` for the transformers models the prior builds; raises ``UnsupportedModelError`` else."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in ARCHS:
        raise UnsupportedModelError(f"no owned decoding step for model type {kind!r}; use decoder=transformers")
    cfg = model.config
    if kind == "gpt2" and getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError("GPT-2 with cross-attention has no owned decoding step; use decoder=transformers")
    return kind


@dataclass
class _Linear:
    """A matrix product ``x W^T + b`` (``nn.Linear``) or ``b + x W`` (transformers' ``Conv1D``), in one dtype."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    conv1d: bool
    source: nn.Module

    @classmethod
    def of(cls, module: nn.Module, dtype: torch.dtype | None) -> "_Linear":
        weight, bias = module.weight.detach(), module.bias.detach() if module.bias is not None else None
        if dtype is not None and weight.dtype != dtype:  # the cast autocast would make at every call, made once
            weight = weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return cls(weight, bias, not isinstance(module, nn.Linear), module)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the module's current weights into a cast copy (in place: a captured graph keeps reading it)."""
        if self.weight.data_ptr() != self.source.weight.data_ptr():
            self.weight.copy_(self.source.weight)
            if self.bias is not None:
                self.bias.copy_(self.source.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1d:  # transformers' Conv1D: addmm over the flattened rows, weight (in, out)
            out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
            return out.view(*x.shape[:-1], self.weight.shape[1])
        return F.linear(x, self.weight, self.bias)


class StaticDecoder:
    """One-token decoding steps with a static KV cache for ``rows`` sequences of up to ``max_len`` tokens.

    Args:
        model: the prior's ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` (eval mode; its weights are read, not
            copied, except for one cast copy per matrix when autocast is on at construction).
        rows: sequences decoded together (the batch, doubled under classifier-free guidance).
        max_len: positions the cache holds (the prior's sequence length).

    The compute dtype follows the autocast state at construction (as the transformers forward would under the
    same autocast): matrices and the cache in the autocast dtype, norms and the rest as autocast runs them.
    """

    def __init__(self, model: nn.Module, rows: int, max_len: int):
        self.arch = model_arch(model)
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        dev = self.device.type
        self.autocast_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        cast = self.autocast_dtype
        self.dtype = cast or param.dtype
        self.rows, self.max_len = rows, max_len
        cfg = model.config
        if self.arch == "gpt2":
            body = model.transformer
            self.blocks = body.h
            self.heads = self.kv_heads = cfg.n_head
            self.head_dim = cfg.n_embd // cfg.n_head
            self.layers = [
                {"qkv": _Linear.of(b.attn.c_attn, cast), "o": _Linear.of(b.attn.c_proj, cast),
                 "up": _Linear.of(b.mlp.c_fc, cast), "down": _Linear.of(b.mlp.c_proj, cast)}
                for b in self.blocks
            ]
            self.final_norm = body.ln_f
        else:
            body = model.model
            self.blocks = body.layers
            self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
            self.head_dim = self.blocks[0].self_attn.head_dim
            self.layers = [
                {"q": _Linear.of(b.self_attn.q_proj, cast), "k": _Linear.of(b.self_attn.k_proj, cast),
                 "v": _Linear.of(b.self_attn.v_proj, cast), "o": _Linear.of(b.self_attn.o_proj, cast),
                 "gate": _Linear.of(b.mlp.gate_proj, cast), "up": _Linear.of(b.mlp.up_proj, cast),
                 "down": _Linear.of(b.mlp.down_proj, cast)}
                for b in self.blocks
            ]
            self.final_norm = body.norm
            # the rotary table of every position, from the model's own rotary module (dtype of the embeddings, as
            # in the transformers forward): (1, max_len, head_dim) each
            embeds = body.embed_tokens.weight[:1].detach().unsqueeze(0)  # (1, 1, E): dtype and device only
            self.cos, self.sin = body.rotary_emb(embeds, torch.arange(max_len, device=self.device)[None])
        self.scaling = [self._attn(b).scaling for b in self.blocks]
        self.embed = body.wte if self.arch == "gpt2" else body.embed_tokens
        self.head = _Linear.of(model.lm_head, cast)
        shape = (rows, self.kv_heads, max_len, self.head_dim)
        # one tensor per layer (a compiled step then updates each in place; views of one tensor would be copied whole)
        # of zeros, not empty: masked attention multiplies the unfilled entries by exactly 0, which NaN would spoil
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        for cache in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(cache)  # fixed buffers, as transformers' StaticCache marks its own
        # buffers of the fixed-shape step (compiled / captured): inputs written in place, positions for the mask
        self.token_buffer = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.position_buffer = torch.zeros(1, dtype=torch.long, device=self.device)
        self.positions = torch.arange(max_len, device=self.device)
        self._compiled = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: torch.Tensor | None = None

    def refresh(self) -> None:
        """Bring the cast copies of the matrices (under autocast) up to the model's current weights, which an
        optimizer may have changed in place since; without autocast the step reads the weights themselves."""
        for linear in (*(w for layer in self.layers for w in layer.values()), self.head):
            linear.refresh()

    def _attn(self, block: nn.Module) -> nn.Module:
        return block.attn if self.arch == "gpt2" else block.self_attn

    def _autocast(self):
        """The caller's autocast, restated inside the step with its weight cache off (needed under graph capture,
        and the matrices are cast already)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    # ------------------------------------------------------------------------------------------------ one step
    def _forward(self, tokens: torch.Tensor, pos, prefix: bool) -> torch.Tensor:
        """Logits (rows, 1, V) of ``tokens`` (rows, 1) at position ``pos``.

        ``prefix``: ``pos`` is a Python int, attention runs over the cache's first ``pos + 1`` entries; else ``pos``
        is a (1,) device tensor, the key/value are written with ``index_copy_`` and attention covers the whole cache
        with a mask past ``pos`` (fixed shapes for compilation and graph capture).
        """
        rows = tokens.shape[0]
        h = self.embed(tokens)  # (R, 1, E)
        if self.arch == "gpt2":
            wpe = self.model.transformer.wpe.weight
            h = h + (wpe[pos : pos + 1] if prefix else wpe.index_select(0, pos))  # (R, 1, E)
        else:
            cos = self.cos[:, pos : pos + 1] if prefix else self.cos.index_select(1, pos)  # (1, 1, dh)
            sin = self.sin[:, pos : pos + 1] if prefix else self.sin.index_select(1, pos)
        mask = None if prefix else (self.positions <= pos).view(1, -1)  # (1, T) bool: keys at positions <= pos
        for i, (block, w) in enumerate(zip(self.blocks, self.layers)):
            if self.arch == "gpt2":
                q, k, v = w["qkv"](block.ln_1(h)).split(self.heads * self.head_dim, dim=-1)
            else:
                x = block.input_layernorm(h)
                q, k, v = w["q"](x), w["k"](x), w["v"](x)
            q = q.view(rows, 1, self.heads, self.head_dim).transpose(1, 2)  # (R, H, 1, dh)
            k = k.view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)  # (R, Hkv, 1, dh)
            v = v.view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            if self.arch == "llama":
                q, k = _rotate(q, k, cos, sin)
            k_cache, v_cache = self.keys[i], self.values[i]  # (R, Hkv, T, dh)
            if prefix:
                k_cache[:, :, pos : pos + 1] = k
                v_cache[:, :, pos : pos + 1] = v
                keys, values = k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1]
            else:
                k_cache.index_copy_(2, pos, k.to(k_cache.dtype))
                v_cache.index_copy_(2, pos, v.to(v_cache.dtype))
                keys, values = k_cache, v_cache
            if self.kv_heads != self.heads:
                groups = self.heads // self.kv_heads
                keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
            attn = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=mask,
                                                  scale=self.scaling[i])  # (R, H, 1, dh)
            attn = attn.transpose(1, 2).reshape(rows, 1, self.heads * self.head_dim)
            h = h + w["o"](attn)
            if self.arch == "gpt2":
                h = h + w["down"](block.mlp.act(w["up"](block.ln_2(h))))
            else:
                x = block.post_attention_layernorm(h)
                h = h + w["down"](block.mlp.act_fn(w["gate"](x)) * w["up"](x))
        return self.head(self.final_norm(h))  # (R, 1, V)

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Next-token logits (rows, V) after feeding ``tokens`` (rows,) at position ``pos`` (eager; attention over
        the filled prefix)."""
        if not 0 <= pos < self.max_len:
            raise IndexError(f"position {pos} outside the cache of {self.max_len}")
        with self._autocast():
            return self._forward(tokens.view(-1, 1), pos, prefix=True)[:, -1]

    def _step_fixed(self) -> torch.Tensor:
        """The fixed-shape step over the buffers: logits (rows, V) for ``token_buffer`` at ``position_buffer``."""
        with self._autocast():
            return self._forward(self.token_buffer, self.position_buffer, prefix=False)[:, -1]

    def compile(self) -> None:
        """Route :meth:`step_at` through ``torch.compile`` of the fixed-shape step, compiled now (one call at
        position 0). If compilation fails the error propagates and the step stays uncompiled."""
        compiled = torch.compile(self._step_fixed, dynamic=False, fullgraph=True)
        self.position_buffer.zero_()
        compiled()
        self._compiled = compiled

    @property
    def compiled(self) -> bool:
        """Whether :meth:`step_at` runs the compiled step."""
        return self._compiled is not None

    def _fixed_step(self) -> torch.Tensor:
        return (self._compiled or self._step_fixed)()

    def capture(self, warmup: int = 2) -> None:
        """Capture the fixed-shape step as one CUDA graph; :meth:`step_at` then replays it (CUDA only).

        The warm-up calls and the capture write keys and values at position 0; every decoding run writes its
        own before reading them.
        """
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.position_buffer.zero_()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # kernels chosen, compiled code run once, workspaces allocated
                self._fixed_step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._fixed_step()
        self._graph, self._graph_logits = graph, logits

    @property
    def captured(self) -> bool:
        """Whether :meth:`step_at` replays a CUDA graph."""
        return self._graph is not None

    def step_at(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Like :meth:`step`, through the fixed-shape step (compiled and/or captured when set up so).

        The result is a buffer the next call overwrites (under a CUDA graph): use it before the next step.
        """
        if not 0 <= pos < self.max_len:
            raise IndexError(f"position {pos} outside the cache of {self.max_len}")
        self.token_buffer.copy_(tokens.view(-1, 1))
        self.position_buffer.fill_(pos)
        if self._graph is not None:
            self._graph.replay()
            return self._graph_logits
        return self._fixed_step()


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """transformers' rotary embedding of queries and keys (its own function, so the rounding is the same)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)
