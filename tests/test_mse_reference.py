"""MSE-only training is bit-identical to the code before losses moved out of the model (issue 11).

The reference numbers below were printed by ``pipelines.train_tokenizer`` at commit 7e04131 (before
``tokenizer/losses.py`` existed): tiny config, 4 steps, ``train.deterministic=true``, one CPU thread (the
last bit of a float sum depends on the thread count, so the test pins it). Every logged ``loss`` and
``recon_mse`` must come out exactly equal.
"""

import json
from pathlib import Path

import pytest
import torch

from pipelines.train_tokenizer import TokenizerRunConfig, train_tokenizer
from tokenizer.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tokenizer" / "tiny.yaml"

ARMS = {
    "vq": ["model.quantizer.kind=vq"],
    "ema": ["model.quantizer.kind=ema"],
    "gumbel": ["model.quantizer.kind=gumbel", "model.quantizer.tau_anneal_steps=4"],
    "adaptive": ["model.quantizer.kind=adaptive", "model.quantizer.capacity=32", "model.quantizer.ladder_dims=[8,4,2,1]"],
    "ema-deferred": ["model.quantizer.kind=ema", "schedule.mode=deferred", "schedule.ae_steps=2", "schedule.kmeans_batches=2"],
    "vq-accum": ["model.quantizer.kind=vq", "train.grad_accum=2", "train.batch_size=4"],
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
    "vq-accum": {
        "loss": [0.6915795803070068, 0.6893847584724426, 0.6708021759986877, 0.6693595051765442],
        "recon_mse": [0.1640198975801468, 0.1642182320356369, 0.1603839099407196, 0.16073866188526154],
    },
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arm", list(ARMS))
def test_mse_only_losses_unchanged(tmp_path, one_thread, arm):
    cfg = load_config(TokenizerRunConfig, TINY, [f"output_dir={tmp_path}", "train.steps=4", "train.deterministic=true",
                                                 *ARMS[arm]])
    train_tokenizer(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == REFERENCE[arm]["loss"]
    assert [r["recon_mse"] for r in rows] == REFERENCE[arm]["recon_mse"]
