"""Configuration of the stage-2 prior's network (section ``model`` of ``configs/prior/*.yaml``).

The training loop's settings (``vqgen.core.trainer.TrainConfig``) and the run layout live with the
pipeline (``pipelines.train_prior.PriorRunConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class PriorModelConfig:
    """Shape of the autoregressive transformer (built from a ``transformers`` config, no pretrained weights).

    ``arch`` picks ``GPT2LMHeadModel`` (learned absolute positions) or ``LlamaForCausalLM`` (rotary
    positions, SwiGLU). ``class_conditional`` makes the first token a class token instead of BOS; during
    training it is replaced by the null class with probability ``label_dropout`` so that the same network
    gives the unconditional logits that classifier-free guidance needs.

    How attention is computed (not what; a saved prior loads with any of them): ``attn_implementation`` is
    transformers' (``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; ``eager``: its own matrix
    products and softmax), and ``sdpa_backend`` restricts the kernels SDPA may pick in the teacher-forced forward
    (training, validation): ``auto`` lets PyTorch choose; ``flash``, ``efficient`` (memory-efficient), ``cudnn``
    (CUDA only) and ``math`` force one, and fail where that kernel cannot run (``math`` runs everywhere).
    """

    arch: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    class_conditional: bool = False
    label_dropout: float = 0.1
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    sdpa_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"

    def validate(self) -> None:
        """Reject shapes the transformer cannot be built with."""
        if self.n_layer < 1 or self.n_head < 1 or self.n_embd < 1:
            raise ValueError("n_layer, n_head and n_embd must be positive")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.arch == "llama" and (self.n_embd // self.n_head) % 2:
            raise ValueError("llama needs an even head size (n_embd / n_head) for rotary embeddings")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.sdpa_backend != "auto" and self.attn_implementation != "sdpa":
            raise ValueError(f"sdpa_backend={self.sdpa_backend} needs attn_implementation=sdpa "
                             f"(got {self.attn_implementation}); set sdpa_backend=auto or attn_implementation=sdpa")
