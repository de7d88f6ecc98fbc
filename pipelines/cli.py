"""The ``vqgen`` command: one subcommand per stage, plus ``run`` for a whole experiment.

``vqgen train-tokenizer ARGS`` is the same as ``python -m vqgen.pipelines.train_tokenizer ARGS``; under
``accelerate launch`` use the ``-m vqgen.pipelines.<stage>`` form.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

STAGES = {
    "train-tokenizer": ("vqgen.pipelines.train_tokenizer", "train a VQ-VAE tokenizer (stage 1)"),
    "encode": ("vqgen.pipelines.encode", "turn a data set into token ids with a trained tokenizer"),
    "train-prior": ("vqgen.pipelines.train_prior", "train a GPT prior on token ids (stage 2)"),
    "sample": ("vqgen.pipelines.sample", "sample images from a prior"),
    "evaluate": ("vqgen.pipelines.evaluate", "reconstruction, FID, diversity and shrinkage reports"),
    "run": ("vqgen.pipelines.run", "run an experiment end to end (resumable stage by stage)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        width = max(map(len, STAGES))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in STAGES.items()]
        print("usage: vqgen <command> [args]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(STAGES[argv[0]][0])
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
