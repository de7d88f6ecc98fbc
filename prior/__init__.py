"""Stage 2: a GPT prior over tokenizer codes (vocabulary layout, model, token data, sampling)."""

from .config import PriorModelConfig
from .data import TokenDataError, TokenDataset, load_token_split, read_token_meta, save_token_split
from .model import Prior, PriorOutput, TokenizerMismatchError, check_tokenizer, tokenizer_record
from .sampling import SamplingConfig, SamplingError, sample_tokens
from .vocab import TokenVocab, VocabError

__all__ = [
    "PriorModelConfig",
    "Prior",
    "PriorOutput",
    "TokenizerMismatchError",
    "check_tokenizer",
    "tokenizer_record",
    "TokenVocab",
    "VocabError",
    "SamplingConfig",
    "SamplingError",
    "sample_tokens",
    "TokenDataError",
    "TokenDataset",
    "load_token_split",
    "read_token_meta",
    "save_token_split",
]
