"""The ``vqgen`` command: one subcommand per stage, plus ``run`` for a whole experiment.

``vqgen train-tokenizer ARGS`` is the same as ``python -m vqgen.pipelines.train_tokenizer ARGS``; under
``accelerate launch`` use the ``-m vqgen.pipelines.<stage>`` form.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from vqgen.pipelines.stages import STAGES

COMMANDS = {s.command: (s.module, s.help) for s in STAGES}
COMMANDS["run"] = ("vqgen.pipelines.run", "run an experiment end to end (resumable stage by stage)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: vqgen <command> [args]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    module.main(argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
