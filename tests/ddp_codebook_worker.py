"""Worker of tests/test_quantizers_ddp.py; run as
``accelerate launch --multi_gpu --num_processes 2 tests/ddp_codebook_worker.py --out DIR``.

Every rank builds each quantizer kind with dead-code reset from the same seed, then, with *different* data on each rank:
k-means initialisation, two training forwards (EMA updates), and a third forward that triggers a
dead-code reset. After each stage it writes its full state dict to ``DIR/<kind>_<stage>_rank<r>.safetensors``.
Quantizers are used directly (not wrapped by DDP), so nothing but their own collectives keeps replicas equal.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from vqgen.tokenizer.quantizers import KINDS, QuantizerConfig, build_quantizer, spec_of

DIM = 8
# kinds with a k-means-initialisable, EMA-tracked codebook that dead-code resets re-seed
SETTINGS = {
    "vq": dict(codebook_size=16),
    "ema": dict(codebook_size=16),
    "gumbel": dict(codebook_size=16),
    "adaptive": dict(capacity=32, ladder_dims=[8, 4, 2, 1], selector_heads=2),
}


def dump(quantizer: torch.nn.Module, out: Path, name: str) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in quantizer.state_dict().items()}
    save_file(state, str(out / f"{name}.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # Accelerate only uses its multi-CPU (gloo) mode when told to run on the CPU
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    assert accelerator.num_processes == 2, "launch with --multi_gpu --num_processes 2"
    rank, device = accelerator.process_index, accelerator.device
    for kind in KINDS:
        if not spec_of(kind).capabilities.dead_code_reset:
            continue
        cfg = QuantizerConfig(kind=kind, dim=DIM, **SETTINGS[kind], decay=0.5, dead_code_threshold=0.5,
                              dead_code_window=3)
        torch.manual_seed(0)  # identical initial weights on every rank
        quantizer = build_quantizer(cfg).to(device).train()
        data = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        # different numbers of vectors per rank, too: exercises the padded all-gather
        quantizer.init_codebook((torch.randn(40 + 9 * rank, DIM, generator=data) + rank).to(device))
        dump(quantizer, args.out, f"{kind}_kmeans_rank{rank}")
        for _ in range(2):
            quantizer(((1 + rank) * torch.randn(4, 3, 3, DIM, generator=data)).to(device))
        dump(quantizer, args.out, f"{kind}_ema_rank{rank}")
        # concentrated inputs: most codes end the window unused and are re-seeded on this third forward
        quantizer((3.0 + rank + 0.01 * torch.randn(4, 3, 3, DIM, generator=data)).to(device))
        dump(quantizer, args.out, f"{kind}_reset_rank{rank}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group before exit (gloo may abort a process otherwise)


if __name__ == "__main__":
    main()
