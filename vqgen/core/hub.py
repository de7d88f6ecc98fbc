"""Sharing models the Hugging Face way: local folder or hub id, and a generated model card.

``VQVAE`` and ``Prior`` inherit ``huggingface_hub.ModelHubMixin``: ``save_pretrained(dir)`` writes their files
plus a model card (``README.md``: what the model is, the summary metrics and the training config it was given),
``push_to_hub(repo_id)`` uploads the same folder, and ``from_pretrained(name_or_path)`` takes a local folder or a
hub id. This module holds what both share: telling a folder from a hub id, fetching a hub snapshot with one-line
errors, and the card.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import MissingFileError, UserError

LIBRARY_NAME = "vqgen"
# A hub id: "name" or "owner/name" (letters, digits, '-', '_', '.'); anything else is a path.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}

Load it with vqgen (this repository installed with `pip install -e .`):

```python
{{ usage }}
```

## Summary metrics

{{ metrics }}

## Training config

```yaml
{{ training_config }}
```
"""


def reachable(url: str, timeout: float = 3.0) -> bool:
    """One quick TCP connection to ``url``'s host (libraries retry for half a minute before failing offline)."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = 3.0, offline: bool = False) -> bool:
    """Whether the Hugging Face hub answers; ``offline`` is what to return when ``HF_HUB_OFFLINE`` is set."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return offline
    return reachable(constants.ENDPOINT, timeout)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' per-file progress bars off inside the block (a global switch, restored after)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def is_hub_id(name: str | Path) -> bool:
    """True when ``name`` is not an existing path and reads as a hub id (``owner/name``)."""
    text = str(name)
    return not Path(text).exists() and bool(_REPO_ID.match(text)) and not text.startswith(".")


def hub_folder(repo_id: str, what: str, **hub_kwargs) -> Path:
    """Download (or find in the cache) the snapshot of ``repo_id``; one ``UserError`` line when that fails."""
    from huggingface_hub import snapshot_download

    allowed = {k: v for k, v in hub_kwargs.items()
               if k in ("revision", "cache_dir", "force_download", "local_files_only", "token") and v is not None}
    try:
        return Path(snapshot_download(repo_id=repo_id, **allowed))
    except Exception as err:  # network, authentication, missing repository: all one line for the user
        detail = " ".join(str(err).split())[:200]
        raise UserError(
            f"{repo_id} is neither a local folder nor a {what} that could be fetched from the Hugging Face hub "
            f"({type(err).__name__}: {detail}); give the path of a saved {what} folder"
        ) from None


def missing_folder(path: str | Path, what: str, hint: str) -> MissingFileError:
    return MissingFileError(f"{path} is not a saved {what}: {hint}")


def _metrics_table(summary: dict | None) -> str:
    if not summary:
        return "Not recorded (the model was saved outside a training run)."
    rows = ["| metric | value |", "|---|---|"]
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, (dict, list)):
            value = json.dumps(value)
            if len(value) > 200:
                continue
        rows.append(f"| `{key}` | {value} |")
    return "\n".join(rows)


def card_kwargs(title: str, description: str, usage: str, training_config: Any = None,
                summary: dict | None = None) -> dict:
    """The values ``CARD_TEMPLATE`` is rendered with."""
    if training_config is not None and not isinstance(training_config, (dict, str)):
        from .config import to_dict

        training_config = to_dict(training_config)
    config_text = (training_config if isinstance(training_config, str)
                   else yaml.safe_dump(training_config, sort_keys=False) if training_config else "# not recorded\n")
    return {"title": title, "description": description, "usage": usage, "metrics": _metrics_table(summary),
            "training_config": config_text.rstrip()}
