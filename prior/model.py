"""The prior: a causal transformer from ``transformers`` over the joint token vocabulary.

``Prior`` wraps a ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` built from scratch, owns the vocabulary
layout (``TokenVocab``) and the record of the tokenizer whose tokens it models. It saves as the HF
model's own files (``config.json`` + ``model.safetensors``) plus ``vqgen_prior.json``, and refuses to be
loaded next to a different tokenizer.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import ModelHubMixin
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from vqgen.core.config import from_dict
from vqgen.core.hub import CARD_TEMPLATE, LIBRARY_NAME, card_kwargs, hub_folder, is_hub_id, quiet_transformers
from vqgen.core.errors import CorruptFileError, MissingFileError, UserError
from vqgen.core.io import atomic_path, check_safetensors, file_fingerprint, load_json, save_json

from .config import PriorModelConfig
from .vocab import TokenVocab

PRIOR_RECORD = "vqgen_prior.json"
# Files of a tokenizer model directory whose bytes define it (see VQVAE.save_pretrained).
TOKENIZER_FILES = ("config.json", "model.safetensors")


class TokenizerMismatchError(UserError, ValueError):
    """A prior is used with a tokenizer other than the one whose tokens it was trained on."""


@dataclass
class PriorOutput:
    """Result of ``Prior.forward``.

    ``logits`` (B, T-1, V) predict positions 1..T-1; ``nll`` (B,) is each sequence's mean negative
    log-likelihood in nats over those positions; ``loss`` is its batch mean.
    """

    logits: torch.Tensor
    nll: torch.Tensor
    loss: torch.Tensor


def tokenizer_record(tokenizer_dir: str | Path) -> dict:
    """Identity of a saved tokenizer: its path, its fingerprint and the sha256 of each defining file."""
    from vqgen.tokenizer.model import tokenizer_fingerprint  # late import: the prior library needs no model code

    tokenizer_dir = Path(tokenizer_dir)
    missing = [name for name in TOKENIZER_FILES if not (tokenizer_dir / name).is_file()]
    if missing:
        raise MissingFileError(
            f"{tokenizer_dir} is not a saved tokenizer (missing {', '.join(missing)}); "
            "pass the tokenizer run's model/ directory"
        )
    return {
        "path": str(tokenizer_dir.resolve()),
        "fingerprint": tokenizer_fingerprint(tokenizer_dir),
        "files": {name: file_fingerprint(tokenizer_dir / name) for name in TOKENIZER_FILES},
    }


def check_tokenizer(expected: dict, tokenizer_dir: str | Path, what: str) -> None:
    """Raise ``TokenizerMismatchError`` unless ``tokenizer_dir`` is the tokenizer recorded in ``expected``.

    ``what`` names the thing that carries the record (e.g. "the prior at RUN/prior/model").
    """
    actual = tokenizer_record(tokenizer_dir)
    if actual["fingerprint"] == expected["fingerprint"]:
        return
    differing = [
        name for name in TOKENIZER_FILES if expected.get("files", {}).get(name) != actual["files"].get(name)
    ]
    raise TokenizerMismatchError(
        f"{what} was trained on tokens of the tokenizer at {expected['path']} "
        f"(fingerprint {expected['fingerprint'][:12]}), but the tokenizer at {actual['path']} has fingerprint "
        f"{actual['fingerprint'][:12]}; these files differ: {', '.join(differing) or 'none (fingerprint only)'}. "
        f"Pass --tokenizer {expected['path']} (the tokenizer it was trained with), "
        "or re-encode the tokens and retrain the prior for this tokenizer."
    )




def sdpa_backend(name: str):
    """A context in which ``scaled_dot_product_attention`` may only use the kernel ``name`` (``auto``: any)."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel(backends[name])


def build_transformer(cfg: PriorModelConfig, vocab: TokenVocab) -> nn.Module:
    """A randomly initialised HF causal LM whose vocabulary and context fit ``vocab``."""
    # Untied output head (as in LlamaGen): image-token embeddings and next-token classifiers need not agree,
    # and an untied model has no shared tensors for checkpoints to deduplicate.
    common = dict(vocab_size=vocab.vocab_size, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  tie_word_embeddings=False, attn_implementation=cfg.attn_implementation)
    if cfg.arch == "gpt2":
        config = GPT2Config(
            n_positions=vocab.seq_len,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            # The exact GELU (as nanoGPT): HF's default for GPT-2 ("gelu_new", the tanh approximation) is spelled in
            # seven elementwise ops and took ~40% of a small prior's training step on a CPU; even PyTorch's fused
            # tanh kernel is 4x (forward) to 6x (backward) slower there than the erf one.
            activation_function="gelu",
            **common,
        )
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        hidden_size=cfg.n_embd,
        intermediate_size=4 * cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        max_position_embeddings=vocab.seq_len,
        attention_dropout=cfg.dropout,
        **common,
    )
    return LlamaForCausalLM(config)


class Prior(nn.Module, ModelHubMixin, library_name=LIBRARY_NAME, tags=["image-generation", "autoregressive-prior"]):
    """Autoregressive prior over token grids.

    Args:
        cfg: transformer shape and conditioning options.
        vocab: the token ids (``TokenVocab.from_layout`` of the tokenizer's ``CodebookLayout``).
        tokenizer: ``tokenizer_record(...)`` of the tokenizer whose tokens are modelled (None only in
            tests that never save).
        transformer: an existing HF model (when loading); by default a new randomly initialised one.
    """

    def __init__(
        self,
        cfg: PriorModelConfig,
        vocab: TokenVocab,
        tokenizer: dict | None = None,
        transformer: nn.Module | None = None,
    ):
        super().__init__()
        if cfg.class_conditional != vocab.class_conditional:
            raise ValueError("PriorModelConfig.class_conditional and TokenVocab.class_conditional disagree")
        self.cfg = cfg
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.transformer = transformer if transformer is not None else build_transformer(cfg, vocab)

    def sequences(self, codes: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Codes (B, h, w) + labels (B,) -> token ids (B, T); in training, with label dropout for CFG."""
        if self.vocab.class_conditional and labels is not None and self.training and self.cfg.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
        return self.vocab.encode(codes, labels)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> PriorOutput:
        """Teacher-forced NLL of token grids ``codes`` (B, h, w) given class ``labels`` (B,) (or None)."""
        ids = self.sequences(codes, labels)  # (B, T)
        with sdpa_backend(self.cfg.sdpa_backend):
            logits = self.transformer(input_ids=ids[:, :-1]).logits  # (B, T-1, V)
        token_nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        nll = token_nll.mean(dim=1)
        return PriorOutput(logits=logits, nll=nll, loss=nll.mean())

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> tuple[float, dict]:
        """Model FLOPs of one trained token (forward and backward), ``6 N + 12 L H Q T``, and its terms.

        PaLM's formula (appendix B), as nanoGPT's ``estimate_mfu``: N the parameters that take part in matrix
        products (all but the input token embedding, a lookup, and GPT-2's position table), L layers, H heads,
        Q head size, T the context (``seq_len - 1`` tokens). MFU is this times tokens/s over the device's peak.
        """
        model, cfg = self.transformer, self.cfg
        skip = model.get_input_embeddings().weight.numel()
        if cfg.arch == "gpt2":
            skip += model.transformer.wpe.weight.numel()
        n = self.num_parameters - skip
        layers, heads, head_size, context = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, self.vocab.seq_len - 1
        return float(6 * n + 12 * layers * heads * head_size * context), {
            "N": n, "L": layers, "H": heads, "Q": head_size, "T": context}

    def record(self) -> dict:
        """Contents of ``vqgen_prior.json``: everything besides the HF files needed to rebuild and check it."""
        return {
            "format": 1,
            "model": asdict(self.cfg),
            "vocab": self.vocab.to_dict(),
            "tokenizer": self.tokenizer,
        }

    def save_pretrained(self, save_directory: str | Path, *, config: dict | None = None,
                        model_card_kwargs: dict | None = None, push_to_hub: bool = False,
                        repo_id: str | None = None, **push_to_hub_kwargs):
        """Write ``save_directory/`` (HF ``config.json`` + ``model.safetensors`` + ``vqgen_prior.json`` + a model
        card ``README.md``) atomically; ``push_to_hub=True`` then uploads it (``huggingface_hub``'s mixin).

        ``model_card_kwargs``: ``training_config`` and ``summary`` for the card.
        """
        if self.tokenizer is None:
            raise ValueError("this prior has no tokenizer record; build it with tokenizer=tokenizer_record(dir)")
        directory = Path(save_directory)
        with atomic_path(directory) as tmp, quiet_transformers():
            super().save_pretrained(tmp, model_card_kwargs=model_card_kwargs)
        if push_to_hub:
            return self.push_to_hub(repo_id or directory.name, model_card_kwargs=model_card_kwargs,
                                    **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        self.transformer.save_pretrained(save_directory)
        save_json(self.record(), Path(save_directory) / PRIOR_RECORD)

    def generate_model_card(self, *args, **kwargs):
        from huggingface_hub import ModelCard

        description = (
            f"A vqgen autoregressive prior ({self.cfg.arch}, {self.num_parameters / 1e6:.2f}M parameters) over "
            f"{self.vocab.seq_len}-token sequences of a vqgen tokenizer (vocabulary {self.vocab.vocab_size}"
            f"{', class-conditional' if self.vocab.class_conditional else ''}); the tokenizer it was trained on is "
            f"recorded in `{PRIOR_RECORD}` (fingerprint "
            f"{(self.tokenizer or {}).get('fingerprint', 'unknown')[:12]})."
        )
        usage = ("from prior.model import Prior\n"
                 "prior = Prior.from_pretrained(\"<this folder or hub id>\", tokenizer_dir=\"<its tokenizer>\")")
        values = card_kwargs("vqgen prior", description, usage, kwargs.get("training_config"), kwargs.get("summary"))
        return ModelCard.from_template(card_data=self._hub_mixin_info.model_card_data,
                                       template_str=CARD_TEMPLATE, **values)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, tokenizer_dir: str | Path | None = None,
                        **hub_kwargs) -> "Prior":
        """Load a saved prior from a local folder or a hub id; if ``tokenizer_dir`` is given it must be the
        tokenizer the prior was trained on.

        Raises ``TokenizerMismatchError`` (with what to pass instead) when the tokenizer differs.
        """
        name = pretrained_model_name_or_path
        if not is_hub_id(name):
            return cls._load_folder(Path(name), tokenizer_dir)
        return cls._from_pretrained(model_id=str(name), tokenizer_dir=tokenizer_dir, **hub_kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, tokenizer_dir: str | Path | None = None, config=None,
                         **hub_kwargs) -> "Prior":
        folder = Path(model_id) if Path(model_id).is_dir() else hub_folder(model_id, "prior", **hub_kwargs)
        return cls._load_folder(folder, tokenizer_dir)

    @classmethod
    def _load_folder(cls, directory: Path, tokenizer_dir: str | Path | None = None) -> "Prior":
        if not (directory / PRIOR_RECORD).is_file():
            raise MissingFileError(
                f"{directory} is not a saved prior (no {PRIOR_RECORD}); pass the prior run's model/ directory"
            )
        rec = load_json(directory / PRIOR_RECORD)
        if tokenizer_dir is not None:
            check_tokenizer(rec["tokenizer"], tokenizer_dir, f"the prior at {directory}")
        weights = sorted(directory.glob("*.safetensors"))
        if not weights:
            raise MissingFileError(f"{directory} holds no model.safetensors; pass the prior run's model/ directory")
        for path in weights:  # a truncated file is named here rather than deep inside transformers
            check_safetensors(path)
        load_json(directory / "config.json")  # the same for the transformer's config
        cfg = from_dict(PriorModelConfig, rec["model"])
        try:
            with quiet_transformers():
                # safetensors only: a pickled pytorch_model.bin beside it is never read
                transformer = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True,
                                                                   attn_implementation=cfg.attn_implementation)
        except (OSError, ValueError) as err:
            raise CorruptFileError(directory, f"transformers could not load it: {err}") from None
        return cls(
            cfg,
            TokenVocab.from_dict(rec["vocab"]),
            tokenizer=rec["tokenizer"],
            transformer=transformer,
        )

    @property
    def tokenizer_dir(self) -> Path | None:
        """Where the tokenizer lived when the prior was trained (None if unrecorded)."""
        return Path(self.tokenizer["path"]) if self.tokenizer else None


