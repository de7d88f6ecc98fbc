"""MSE-only training gives the losses of the code before losses moved out of the model (issue 11).

The reference numbers below were printed by ``pipelines.train_tokenizer`` at commit 7e04131 (before
``tokenizer/losses.py`` existed): tiny config, 4 steps, ``train.deterministic=true``, one CPU thread. Every logged
``loss`` and ``recon_mse`` must agree within a relative tolerance of ``REL`` (1e-5): float32 sums are rounded
differently by CPUs with other vector widths (AVX-512, AVX2, none: ``ATEN_CPU_CAPABILITY``), which moves the last
bits (7.6e-8 relative on the Gumbel arm on an Intel Xeon with AVX-512), while a changed loss moves the first ones.

The kinds added later (``fsq``, ``lfq``, ``simvq``, the rotation trick) have no numbers from 7e04131; theirs were
printed the same way by ``main`` at 0303f0b (after the quantizers merge, still with the loss inside the model),
on their shipped tiny configs.
"""

import json
from pathlib import Path

import pytest
import torch

from vqgen.pipelines.train_tokenizer import TokenizerRunConfig, train_tokenizer
from vqgen.core.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "tokenizer"
TINY = CONFIGS / "tiny.yaml"

# arm: (config, overrides)
ARMS = {
    "vq": (TINY, ["model.quantizer.kind=vq"]),
    "ema": (TINY, ["model.quantizer.kind=ema"]),
    "gumbel": (TINY, ["model.quantizer.kind=gumbel", "model.quantizer.tau_anneal_steps=4"]),
    "adaptive": (TINY, ["model.quantizer.kind=adaptive", "model.quantizer.codebook_size=512",
                        "model.quantizer.capacity=32", "model.quantizer.ladder_dims=[8,4,2,1]"]),
    "ema-deferred": (TINY, ["model.quantizer.kind=ema", "schedule.mode=deferred", "schedule.ae_steps=2",
                            "schedule.kmeans_batches=2"]),
    "vq-accum": (TINY, ["model.quantizer.kind=vq", "train.grad_accum=2", "train.batch_size=4"]),
    # printed by main at 0303f0b
    "fsq": (CONFIGS / "tiny_fsq.yaml", []),
    "lfq": (CONFIGS / "tiny_lfq.yaml", []),
    "simvq": (CONFIGS / "tiny_simvq.yaml", []),
    "fsq-deferred": (CONFIGS / "tiny_fsq.yaml", ["schedule.mode=deferred", "schedule.ae_steps=2"]),
    "simvq-rotation": (CONFIGS / "tiny_simvq.yaml", ["model.quantizer.rotation_trick=true"]),
}

REFERENCE = {
    "vq": {
        "loss": [0.6903752684593201, 0.6858413219451904, 0.678606390953064, 0.671159029006958],
        "recon_mse": [0.16372151672840118, 0.16336369514465332, 0.16232702136039734, 0.16117139160633087],
    },
    "ema": {
        "loss": [0.7176102995872498, 0.6648508906364441, 0.6533945798873901, 0.646368682384491],
        "recon_mse": [0.16365420818328857, 0.16335366666316986, 0.16225981712341309, 0.16105490922927856],
    },
    "gumbel": {
        "loss": [0.7798807621002197, 0.7830350399017334, 0.7754924893379211, 0.7677926421165466],
        "recon_mse": [0.19496683776378632, 0.1957554668188095, 0.19386990368366241, 0.19194500148296356],
    },
    "adaptive": {
        "loss": [0.8061825037002563, 0.7722420692443848, 0.7597769498825073, 0.7509175539016724],
        "recon_mse": [0.191997230052948, 0.19132637977600098, 0.18928425014019012, 0.1874038130044937],
    },
    "ema-deferred": {
        "loss": [0.6552059054374695, 0.6535573601722717, 0.649088442325592, 0.6443052291870117],
        "recon_mse": [0.16380147635936737, 0.16338934004306793, 0.16227079927921295, 0.16107212007045746],
    },
    # printed by main at 0303f0b
    "fsq": {
        "loss": [0.7923557162284851, 0.7904903888702393, 0.78525310754776, 0.7790490984916687],
        "recon_mse": [0.19808892905712128, 0.19762259721755981, 0.19631327688694, 0.19476227462291718],
    },
    "lfq": {
        "loss": [0.8384592533111572, 0.8010872602462769, 0.8037851452827454, 0.7956137657165527],
        "recon_mse": [0.17071999609470367, 0.1714390069246292, 0.16929380595684052, 0.16742925345897675],
    },
    "simvq": {
        "loss": [0.7263162732124329, 0.7200367450714111, 0.7110543251037598, 0.7019907236099243],
        "recon_mse": [0.16381506621837616, 0.1633775234222412, 0.1622067540884018, 0.16097255051136017],
    },
    "fsq-deferred": {
        "loss": [0.7925398349761963, 0.7908350825309753, 0.7855925559997559, 0.7795929908752441],
        "recon_mse": [0.19813495874404907, 0.19770877063274384, 0.19639813899993896, 0.19489824771881104],
    },
    "simvq-rotation": {
        "loss": [0.7263162732124329, 0.7200359106063843, 0.711051344871521, 0.7019842863082886],
        "recon_mse": [0.16381506621837616, 0.1633775234222412, 0.1622067540884018, 0.16097255051136017],
    },
}


REL = 1e-5  # float32 rounding across CPUs, far below what a change of the loss moves


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arm", list(ARMS))
def test_mse_only_losses_unchanged(tmp_path, one_thread, arm):
    config, overrides = ARMS[arm]
    cfg = load_config(TokenizerRunConfig, config, [f"output_dir={tmp_path}", "train.steps=4", "train.deterministic=true",
                                                   *overrides])
    train_tokenizer(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if arm == "vq-accum":
        # two micro-batches of 4 make one update of 8; the logged values are their means, which are the values of
        # the same update in one batch of 8 (the vq arm) up to the order of the float sums
        for key in ("loss", "recon_mse"):
            assert [r[key] for r in rows] == pytest.approx(REFERENCE["vq"][key], rel=REL, abs=0)
        return
    assert [r["loss"] for r in rows] == pytest.approx(REFERENCE[arm]["loss"], rel=REL, abs=0)
    assert [r["recon_mse"] for r in rows] == pytest.approx(REFERENCE[arm]["recon_mse"], rel=REL, abs=0)
