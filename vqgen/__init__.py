"""vqgen: discrete image tokenizers, GPT priors on their tokens, and codebook-shrinkage evaluation.

One import namespace over the project's folders: ``vqgen.core`` (config, files, errors, the trainer, distributed
helpers, hub sharing, provenance), ``vqgen.tokenizer`` (stage 1), ``vqgen.prior`` (stage 2), ``vqgen.eval``
(metrics and reports) and ``vqgen.pipelines`` (the entry points). An installed copy maps the top-level folders
``tokenizer/``, ``prior/``, ``eval/`` and ``pipelines/`` onto these names (``pyproject.toml``); run from a
source checkout without installing (``PYTHONPATH=<checkout>``), the folders beside this one are found the same
way, so the generic names ``tokenizer``, ``prior``, ``eval`` and ``pipelines`` are never claimed.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "tokenizer" / "__init__.py").is_file() and (_checkout / "pyproject.toml").is_file():
    __path__.append(str(_checkout))  # a source checkout: vqgen.tokenizer is <checkout>/tokenizer
