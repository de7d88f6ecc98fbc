"""Stage-2 pipelines end to end on tiny data: encode -> train_prior -> sample -> decode.

The tokenizers are untrained tiny VQ-VAEs saved to disk (the plumbing does not need a good tokenizer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from vqgen.pipelines.encode import encode
from vqgen.pipelines.encode import main as encode_main
from vqgen.pipelines.sample import sample
from vqgen.pipelines.sample import main as sample_main
from vqgen.pipelines.train_prior import PriorRunConfig, train_prior
from vqgen.pipelines.train_prior import main as train_prior_main
from vqgen.prior.data import TokenDataError, TokenDataset, load_token_split, read_token_meta
from vqgen.prior.model import Prior, TokenizerMismatchError
from vqgen.prior.sampling import SamplingConfig
from vqgen.core.config import ConfigError, load_config
from vqgen.tokenizer.data import DataConfig, build_dataset, denormalize
from vqgen.tokenizer.model import ModelConfig, VQVAE
from vqgen.tokenizer.quantizers.base import QuantizerConfig

REPO = Path(__file__).resolve().parents[1]
TINY_PRIOR = REPO / "configs" / "prior" / "tiny.yaml"
TINY_PRIOR_COND = REPO / "configs" / "prior" / "tiny_cond.yaml"
DATA = {"source": "synthetic", "image_size": 16, "channels": 3, "num_train": 64, "num_validation": 16,
        "num_test": 16}


def make_tokenizer_run(directory: Path, seed: int = 0, quantizer: dict | None = None) -> Path:
    """An untrained tiny tokenizer saved as a tokenizer run folder (config.yaml + model/)."""
    torch.manual_seed(seed)
    qcfg = QuantizerConfig(**(quantizer or {"kind": "ema", "codebook_size": 16, "dim": 8}))
    model = VQVAE(ModelConfig(image_size=16, in_channels=3, hidden=16, res_hidden=8, num_res_layers=1,
                              downsample=4, quantizer=qcfg))
    model.save_pretrained(directory / "model")
    (directory / "config.yaml").write_text(yaml.safe_dump({"data": DATA}))
    return directory


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """RUN/ with a tokenizer, its encoded tokens and a tiny class-conditional prior trained on them."""
    root = tmp_path_factory.mktemp("run")
    make_tokenizer_run(root / "tokenizer")
    encode(root / "tokenizer", root / "tokens", batch_size=24)
    cfg = load_config(PriorRunConfig, TINY_PRIOR_COND, [f"tokens={root / 'tokens'}", f"output_dir={root / 'prior'}"])
    train_prior(cfg)
    return root


# ---------------------------------------------------------------------------------------------- encode
def test_encode_writes_tokens_in_data_order(run):
    meta = read_token_meta(run / "tokens")
    assert set(meta["splits"]) == {"train", "validation", "test"}
    assert meta["grid"] == [4, 4] and meta["num_classes"] == 24
    tokenizer = VQVAE.from_pretrained(run / "tokenizer" / "model")
    for split, n in (("train", 64), ("validation", 16)):
        tokens, labels = load_token_split(run / "tokens", split)
        ds = build_dataset(DataConfig(**DATA), split)
        images = torch.stack([ds[i]["image"] for i in range(len(ds))])
        assert tokens.shape == (n, 4, 4) and torch.equal(tokens, tokenizer.encode(images))
        assert torch.equal(labels, ds.labels)
    stored = load_file(str(run / "tokens" / "train.safetensors"))
    assert stored["tokens"].dtype == torch.int16  # 16 codes fit the compact type
    item = TokenDataset(run / "tokens", "train")[3]
    assert item["codes"].dtype == torch.int64 and item["codes"].shape == (4, 4)


def test_encode_skips_done_work_and_refuses_other_tokenizer(tmp_path, capsys):
    tok = make_tokenizer_run(tmp_path / "tok")
    encode(tok, tmp_path / "tokens", splits=["train"])
    first = (tmp_path / "tokens" / "train.safetensors").stat().st_mtime_ns
    encode(tok, tmp_path / "tokens", splits=["train", "test"])
    assert (tmp_path / "tokens" / "train.safetensors").stat().st_mtime_ns == first
    assert "already encoded, skipping" in capsys.readouterr().out
    assert set(read_token_meta(tmp_path / "tokens")["splits"]) == {"train", "test"}
    other = make_tokenizer_run(tmp_path / "other", seed=1)
    with pytest.raises(TokenDataError, match="--overwrite"):
        encode(other, tmp_path / "tokens", splits=["train"])
    encode(other, tmp_path / "tokens", splits=["train"], overwrite=True)
    meta = read_token_meta(tmp_path / "tokens")
    assert set(meta["splits"]) == {"train"} and meta["tokenizer"]["path"] == str((other / "model").resolve())


def test_encode_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        encode_main(["--tokenizer-run", str(tmp_path), "--output-dir", str(tmp_path / "t")])
    assert "config.yaml" in capsys.readouterr().err
    tok = make_tokenizer_run(tmp_path / "tok")
    with pytest.raises(SystemExit):
        encode_main(["--tokenizer-run", str(tok), "--output-dir", str(tmp_path / "t"), "--splits", "train,dev"])
    assert "dev" in capsys.readouterr().err


def test_train_prior_user_errors_are_one_line(tmp_path, capsys):
    cfg = load_config(PriorRunConfig, TINY_PRIOR, [f"tokens={tmp_path / 'none'}", f"output_dir={tmp_path / 'p'}"])
    with pytest.raises(TokenDataError, match="vqgen.pipelines.encode"):
        train_prior(cfg)
    for args, expected in ((["model.arch=mamba"], "arch"), ([], "tokens is not set"),
                           ([f"tokens={tmp_path / 'none'}"], "vqgen.pipelines.encode")):
        with pytest.raises(SystemExit):
            train_prior_main(["--config", str(TINY_PRIOR), "--output-dir", str(tmp_path / "p"), *args])
        assert expected in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- train
def test_train_prior_outputs(run):
    out = run / "prior"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("val_nll", "bits_per_token", "steps", "tokens_per_second"):
        assert summary[key] is not None, key
    assert summary["steps"] == 20 and summary["class_conditional"]
    assert summary["bits_per_token"] == pytest.approx(summary["val_nll"] / np.log(2))
    assert summary["val_nll"] < np.log(16 + 1 + 25)  # learned something beyond uniform over the vocabulary
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [5, 10, 15, 20]
    assert lines[-1]["val_nll"] == pytest.approx(summary["val_nll"])
    assert (out / "config.yaml").is_file() and (out / "model" / "vqgen_prior.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000010", "step_00000020"]
    prior = Prior.from_pretrained(out / "model", run / "tokenizer" / "model")
    assert prior.vocab.class_conditional and prior.vocab.num_classes == 24


def test_train_prior_resume_matches_uninterrupted(run, tmp_path):
    args = [f"tokens={run / 'tokens'}", "model.class_conditional=false", "train.steps=12"]
    whole = load_config(PriorRunConfig, TINY_PRIOR, args + [f"output_dir={tmp_path / 'whole'}"])
    parts = load_config(PriorRunConfig, TINY_PRIOR, args + [f"output_dir={tmp_path / 'parts'}"])
    a = train_prior(whole)
    assert train_prior(parts, stop_after=10) == {"steps": 10, "stopped_early": True}
    b = train_prior(parts)
    assert b["steps"] == 12 and b["val_nll"] == pytest.approx(a["val_nll"], rel=1e-5)
    wa = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "parts" / "model" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_train_prior_speed_options_give_the_same_model_and_resume(run, tmp_path):
    """train.fused and model.sdpa_backend change how the prior trains, not what: the same model, and a run begun
    without them resumes with them (the checkpoint's optimizer state takes the configured kernel)."""
    args = [f"tokens={run / 'tokens'}", "model.class_conditional=false", "train.steps=12"]
    plain = train_prior(load_config(PriorRunConfig, TINY_PRIOR, args + [f"output_dir={tmp_path / 'plain'}"]))
    parts = args + [f"output_dir={tmp_path / 'parts'}"]
    assert train_prior(load_config(PriorRunConfig, TINY_PRIOR, parts), stop_after=10)["stopped_early"]
    fast = train_prior(load_config(PriorRunConfig, TINY_PRIOR, parts + ["train.fused=true", "model.sdpa_backend=math"]))
    assert fast["steps"] == 12 and fast["val_nll"] == pytest.approx(plain["val_nll"], rel=1e-5)
    wa = load_file(str(tmp_path / "plain" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "parts" / "model" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


# ---------------------------------------------------------------------------------------------- early stopping
@pytest.fixture(scope="module")
def varied_tokens(tmp_path_factory) -> Path:
    """Tokens that use every code: the untrained tokenizer's codebook is k-means on its own encoder outputs.

    (The plain untrained tokenizer maps every image to one code, which no prior can overfit.)
    """
    root = tmp_path_factory.mktemp("varied")
    tok = make_tokenizer_run(root / "tokenizer")
    model = VQVAE.from_pretrained(tok / "model")
    ds = build_dataset(DataConfig(**DATA), "train")
    with torch.no_grad():
        z = model.encode_latents(torch.stack([ds[i]["image"] for i in range(len(ds))]))  # (64, 4, 4, 8)
    model.quantizer.init_codebook(z.reshape(-1, z.shape[-1]))
    model.save_pretrained(tok / "model")
    encode(tok, root / "tokens", splits=["train", "validation"], batch_size=64)
    return root / "tokens"


# A constant, high learning rate on 64 training sequences: the validation NLL falls, then rises (overfitting).
OVERFIT = ["train.steps=60", "train.lr=0.01", "train.lr_schedule=constant", "train.warmup_steps=0",
           "train.log_every=3", "train.eval_every=3", "train.checkpoint_every=100", "train.early_stopping_patience=2"]


def validation_nll(model_dir: Path, tokens: Path) -> float:
    """Mean NLL per token of a saved prior over the validation split, computed without the trainer."""
    prior = Prior.from_pretrained(model_dir).eval()
    ds = TokenDataset(tokens, "validation")
    with torch.no_grad():
        return float(prior(torch.stack([ds[i]["codes"] for i in range(len(ds))]), None).nll.double().mean())


def test_early_stopping_keeps_the_best_model_and_resumes_exactly(varied_tokens, tmp_path):
    args = [f"tokens={varied_tokens}", *OVERFIT]
    whole = train_prior(load_config(PriorRunConfig, TINY_PRIOR, args + [f"output_dir={tmp_path / 'whole'}"]))
    assert whole["early_stopped"] and whole["steps"] == 60 and whole["stopped_step"] < 60
    # patience 2, min_delta 0: it stops two evaluations after the best one, which is not the last
    assert whole["stopped_step"] == whole["best_step"] + 2 * 3
    evals = [r for r in map(json.loads, (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines())
             if "val_nll" in r]
    assert [r["step"] for r in evals] == list(range(3, whole["stopped_step"] + 1, 3))
    assert whole["val_nll"] == whole["best_val_nll"] == min(r["val_nll"] for r in evals)
    assert evals[-1]["val_nll"] > whole["best_val_nll"] and evals[-1]["evals_without_improvement"] == 2
    # model/ holds the best weights, not the last ones
    assert validation_nll(tmp_path / "whole" / "model", varied_tokens) == pytest.approx(whole["best_val_nll"], rel=1e-5)

    # killed one evaluation after the best (patience counter at 1), then rerun: the same stop and the same model
    parts = load_config(PriorRunConfig, TINY_PRIOR, args + [f"output_dir={tmp_path / 'parts'}"])
    kill = whole["best_step"] + 3
    assert train_prior(parts, stop_after=kill) == {"steps": kill, "stopped_early": True}
    resumed = train_prior(parts)
    for key in ("best_step", "stopped_step", "early_stopped", "steps"):
        assert resumed[key] == whole[key], key
    assert resumed["val_nll"] == pytest.approx(whole["val_nll"], rel=1e-5)
    wa = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "parts" / "model" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # a run that is already stopped stays stopped (the newest checkpoint holds the spent patience)
    again = train_prior(parts)
    assert again["stopped_step"] == whole["stopped_step"] and again["val_nll"] == pytest.approx(whole["val_nll"])


def test_early_stopping_min_delta(varied_tokens, tmp_path):
    """A gain below min_delta spends patience, yet the lower NLL still gives the saved (best) weights."""
    cfg = load_config(PriorRunConfig, TINY_PRIOR, [f"tokens={varied_tokens}", f"output_dir={tmp_path / 'p'}",
                                                   *OVERFIT, "train.early_stopping_patience=1",
                                                   "train.early_stopping_min_delta=100"])
    summary = train_prior(cfg)
    assert summary["early_stopped"] and summary["stopped_step"] == 6
    assert summary["best_step"] == 6 and summary["val_nll"] == summary["best_val_nll"]  # lower than at 3, not by 100


def test_early_stopping_config_is_checked():
    with pytest.raises(ConfigError, match="eval_every"):
        load_config(PriorRunConfig, TINY_PRIOR, ["tokens=x", "train.early_stopping_patience=3", "train.eval_every=0"])
    with pytest.raises(ConfigError, match="early_stopping"):
        load_config(PriorRunConfig, TINY_PRIOR, ["tokens=x", "train.early_stopping_patience=-1"])


# ---------------------------------------------------------------------------------------------- sample
def test_sample_layout_and_decoding(run):
    out = run / "samples"
    cfg = SamplingConfig(num_samples=10, batch_size=4, temperature=1.0, top_k=8, cfg_scale=2.0, labels=[0, 5, -1])
    meta = sample(run / "prior" / "model", out, cfg)
    tensors = load_file(str(out / "tokens.safetensors"))
    tokens, labels = tensors["tokens"], tensors["labels"]
    assert tokens.shape == (10, 4, 4) and tokens.dtype == torch.int64 and labels.dtype == torch.int64
    assert labels.tolist() == [0, 5, -1, 0, 5, -1, 0, 5, -1, 0]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(10)]
    assert (out / "grid.png").is_file() and meta == json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["fingerprint"] and meta["prior"]["fingerprint"] and meta["sampling"]["cfg_scale"] == 2.0
    # every PNG is the tokenizer's decoding of the stored tokens
    tokenizer = VQVAE.from_pretrained(run / "tokenizer" / "model")
    expected = denormalize(tokenizer.decode(tokens)).permute(0, 2, 3, 1).numpy()
    for i in (0, 9):
        assert np.array_equal(np.asarray(Image.open(out / "images" / f"{i:05d}.png")), expected[i])


def test_prior_refuses_other_tokenizer(run, tmp_path, capsys):
    other = make_tokenizer_run(tmp_path / "other", seed=3)
    with pytest.raises(TokenizerMismatchError, match=r"model\.safetensors.*Pass --tokenizer"):
        Prior.from_pretrained(run / "prior" / "model", other / "model")
    with pytest.raises(SystemExit):
        sample_main(["--prior", str(run / "prior" / "model"), "--tokenizer", str(other / "model"),
                     "--output-dir", str(tmp_path / "s"), "--num-samples", "2"])
    err = capsys.readouterr().err
    assert "fingerprint" in err and str(run / "tokenizer" / "model") in err


def test_adaptive_image_tokens_end_to_end(tmp_path):
    """Adaptive tokenizer with one codebook per image: joint vocabulary, samples stay in one codebook."""
    q = {"kind": "adaptive", "dim": 8, "capacity": 32, "ladder_dims": [8, 4, 2], "selector_heads": 2,
         "granularity": "image"}
    tok = make_tokenizer_run(tmp_path / "tok", quantizer=q)
    meta = encode(tok, tmp_path / "tokens", splits=["train", "validation"])
    assert meta["layout"]["codebook_sizes"] == [4, 8, 16] and meta["layout"]["per_image_codebook"]
    cfg = load_config(PriorRunConfig, TINY_PRIOR, [f"tokens={tmp_path / 'tokens'}", f"output_dir={tmp_path / 'p'}",
                                                   "train.steps=4"])
    train_prior(cfg)
    sample(tmp_path / "p" / "model", tmp_path / "s", SamplingConfig(num_samples=16, batch_size=8, temperature=2.0))
    prior = Prior.from_pretrained(tmp_path / "p" / "model")
    assert prior.vocab.per_image_codebook
    tokens = load_file(str(tmp_path / "s" / "tokens.safetensors"))["tokens"]
    books = prior.vocab.codebook_of(tokens.flatten(1))
    assert (books == books[:, :1]).all()


# ---------------------------------------------------------------------------------------------- processes
def accelerate_launch(args: list[str], nproc: int, port: int) -> None:
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    if nproc > 1:
        launcher += ["--multi_gpu", "--num_processes", str(nproc), "--main_process_port", str(port)]
    else:
        launcher += ["--num_processes", "1"]
    env = {**os.environ, "VQGEN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launcher + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_processes_encode_train_sample(run, tmp_path):
    """Encode, train and sample under ``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU)."""
    accelerate_launch(["-m", "vqgen.pipelines.encode", "--tokenizer-run", str(run / "tokenizer"), "--output-dir",
                       str(tmp_path / "tokens"), "--splits", "train,validation", "--batch-size", "24"], 2, 29611)
    for split in ("train", "validation"):  # same ids in the same order as the one-process encoding
        assert torch.equal(load_token_split(tmp_path / "tokens", split)[0], load_token_split(run / "tokens", split)[0])
    # with early stopping that must trigger at the second evaluation: every process stops at step 4 (a process
    # that went on alone would wait forever in the next collective)
    accelerate_launch(["-m", "vqgen.pipelines.train_prior", "--config", str(TINY_PRIOR_COND), "--output-dir",
                       str(tmp_path / "prior"), f"tokens={tmp_path / 'tokens'}", "train.steps=6",
                       "train.batch_size=8", "train.checkpoint_every=3", "train.eval_every=2",
                       "train.early_stopping_patience=1", "train.early_stopping_min_delta=100"], 2, 29612)
    summary = json.loads((tmp_path / "prior" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 6 and summary["val_sequences"] == 16
    assert summary["early_stopped"] and summary["stopped_step"] == 4
    checkpoints = sorted((tmp_path / "prior" / "checkpoints").glob("step_*"))
    assert checkpoints
    for ckpt in checkpoints:  # both processes' RNG states written before the folder was renamed
        record = json.loads((ckpt / "vqgen_state.json").read_text())["files"]
        assert {"rng_0.pt", "rng_1.pt"} <= set(record), sorted(record)
    accelerate_launch(["-m", "vqgen.pipelines.sample", "--prior", str(tmp_path / "prior" / "model"), "--output-dir",
                       str(tmp_path / "s2"), "--num-samples", "7", "--batch-size", "3", "--cfg-scale", "1.5"], 2, 29613)
    # each sample depends only on its index: one process gives the same tokens as two
    sample(tmp_path / "prior" / "model", tmp_path / "s1", SamplingConfig(num_samples=7, batch_size=5, cfg_scale=1.5))
    two = load_file(str(tmp_path / "s2" / "tokens.safetensors"))
    one = load_file(str(tmp_path / "s1" / "tokens.safetensors"))
    assert torch.equal(two["tokens"], one["tokens"]) and torch.equal(two["labels"], one["labels"])
    assert len(list((tmp_path / "s2" / "images").iterdir())) == 7
    assert json.loads((tmp_path / "s2" / "meta.json").read_text())["num_processes"] == 2


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; a different precision needs it reset before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_train_prior_bf16_and_grad_accum(run, tmp_path, fresh_accelerate_state):
    cfg = load_config(PriorRunConfig, TINY_PRIOR, [f"tokens={run / 'tokens'}", f"output_dir={tmp_path / 'p'}",
                                                   "mixed_precision=bf16", "train.steps=3", "train.grad_accum=2"])
    summary = train_prior(cfg)
    assert summary["mixed_precision"] == "bf16" and summary["steps"] == 3 and np.isfinite(summary["val_nll"])
    with pytest.raises(Exception, match="mixed_precision"):
        load_config(PriorRunConfig, TINY_PRIOR, ["tokens=x", "mixed_precision=fp8"])
