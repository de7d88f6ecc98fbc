"""Bad inputs at every entry point: exit code 2, one line on stderr, no traceback (``--debug`` shows it).

The table runs each command's ``main`` in-process (the same function ``python -m`` and ``vqgen`` call); a few
cases run as real subprocesses to show what a user sees.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from vqgen.pipelines import cli, encode, evaluate, run, sample, train_prior, train_tokenizer
from vqgen.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TOK = str(REPO / "configs" / "tokenizer" / "tiny.yaml")
PRIOR = str(REPO / "configs" / "prior" / "tiny.yaml")
EXP = str(REPO / "configs" / "experiments" / "tiny.yaml")
MAINS = {"train_tokenizer": train_tokenizer.main, "encode": encode.main, "train_prior": train_prior.main,
         "sample": sample.main, "evaluate": evaluate.main, "run": run.main, "vqgen": cli.main}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def other_tokens(tmp: Path, run: Path) -> Path:
    """The run's tokens with one training token changed (as if made by another tokenizer)."""
    tokens = copy(run / "tokens", tmp / "other_tokens")
    data = load_file(str(tokens / "train.safetensors"))
    data["tokens"][0, 0, 0] = (data["tokens"][0, 0, 0] + 1) % 16
    save_file(data, str(tokens / "train.safetensors"))
    return tokens


def other_tokenizer(tmp: Path, run: Path) -> Path:
    model = copy(run / "tokenizer" / "model", tmp / "other_tok")
    data = load_file(str(model / "model.safetensors"))
    data["pre_quant.bias"] += 1
    save_file(data, str(model / "model.safetensors"))
    return model


def write(name: str, text: str = "x") -> Callable[[Path, Path], dict]:
    """Setup: a file ``name`` holding ``text`` in the case's folder."""
    def setup(tmp: Path, run: Path) -> dict:
        (tmp / name).write_text(text)
        return {}
    return setup


def copied(part: str, dst: str, then: Callable[[Path], object] | None = None) -> Callable[[Path, Path], dict]:
    """Setup: ``RUN/part`` copied to ``tmp/dst``, then ``then(copy)`` (e.g. truncate one of its files)."""
    def setup(tmp: Path, run: Path) -> dict:
        target = copy(run / part if part else run, tmp / dst)
        if then is not None:
            then(target)
        return {}
    return setup


# (id, command, setup(tmp, run) -> extra format fields, argv template, words the message must contain)
Case = tuple[str, str, Callable[[Path, Path], dict] | None, list[str], tuple[str, ...]]
CASES: list[Case] = [
    # -- train_tokenizer: config
    ("config-is-a-folder", "train_tokenizer", None, ["--config", "{tmp}"], ("is a folder",)),
    ("config-missing", "train_tokenizer", None, ["--config", "{tmp}/nope.yaml"], ("does not exist",)),
    ("config-empty", "train_tokenizer", write("e.yaml", ""),
     ["--config", "{tmp}/e.yaml"], ("is empty",)),
    ("config-a-list", "train_tokenizer", write("l.yaml", "- a\n- b\n"),
     ["--config", "{tmp}/l.yaml"], ("mapping",)),
    ("config-bad-yaml", "train_tokenizer", write("b.yaml", "a: [1, 2\nb: 3\n"),
     ["--config", "{tmp}/b.yaml"], ("not valid YAML",)),
    ("unknown-key", "train_tokenizer", None, ["--config", TOK, "--output-dir", "{tmp}/o", "model.quantizer.kindd=vq"],
     ("model.quantizer.kindd",)),
    ("wrong-type", "train_tokenizer", None, ["--config", TOK, "--output-dir", "{tmp}/o", "train.steps=many"],
     ("train.steps",)),
    ("codebook-size-1", "train_tokenizer", None,
     ["--config", TOK, "--output-dir", "{tmp}/o", "model.quantizer.codebook_size=1"], ("codebook_size",)),
    # -- train_tokenizer: data
    ("parquet-missing", "train_tokenizer", None,
     ["--config", TOK, "--output-dir", "{tmp}/o", "data.source=hf", "data.data_files={{train: {tmp}/no.parquet}}"],
     ("matches no file",)),
    ("parquet-corrupt", "train_tokenizer", write("bad.parquet", "PAR1 this is not parquet at all"),
     ["--config", TOK, "--output-dir", "{tmp}/o", "data.source=hf", "data.data_files={{train: {tmp}/bad.parquet}}"],
     ("bad.parquet",)),
    ("image-folder-empty", "train_tokenizer", lambda tmp, run: (tmp / "imgs").mkdir() or {},
     ["--config", TOK, "--output-dir", "{tmp}/o", "data.source=hf", "data.data_dir={tmp}/imgs"], ("imgs",)),
    ("image-folder-is-a-file", "train_tokenizer", write("f"),
     ["--config", TOK, "--output-dir", "{tmp}/o", "data.source=hf", "data.data_dir={tmp}/f"], ("not a folder",)),
    ("fewer-images-than-a-batch", "train_tokenizer", None,
     ["--config", TOK, "--output-dir", "{tmp}/o", "data.num_train=4", "train.batch_size=8"], ("batch",)),
    ("hub-name-offline", "train_tokenizer", None,
     ["--config", TOK, "--output-dir", "{tmp}/o", "data.source=hf", "data.path=nobody/no-such-set"],
     ("hub", "nobody/no-such-set")),
    # -- train_tokenizer: output and training
    ("tokenizer-output-is-a-file", "train_tokenizer", write("f"),
     ["--config", TOK, "--output-dir", "{tmp}/f"], ("is a file",)),
    ("tokenizer-output-under-a-file", "train_tokenizer", write("f"),
     ["--config", TOK, "--output-dir", "{tmp}/f/sub"], ("which is a file",)),
    ("tokenizer-output-not-writable", "train_tokenizer", None,
     ["--config", TOK, "--output-dir", "/proc/vqgen-test-run"], ("not writable",)),
    ("non-finite-loss", "train_tokenizer", None,
     ["--config", TOK, "--output-dir", "{tmp}/o", "train.lr=1e30", "train.max_grad_norm=0", "train.steps=20",
      "model.quantizer.kind=vq"], ("at step",)),
    ("tokenizer-resumed-with-another-model", "train_tokenizer",
     copied("tokenizer", "tok"),
     ["--config", "{tmp}/tok/config.yaml", "--output-dir", "{tmp}/tok",
      "model.quantizer.codebook_size=32"], ("codebook_size", "--output-dir")),
    # -- encode
    ("encode-no-tokenizer-run", "encode", None, ["--tokenizer-run", "{tmp}/nope", "--output-dir", "{tmp}/t"],
     ("not a folder",)),
    ("encode-truncated-weights", "encode",
     copied("tokenizer", "tok", lambda d: truncate(d / "model" / "model.safetensors")),
     ["--tokenizer-run", "{tmp}/tok", "--output-dir", "{tmp}/t"], ("model.safetensors", "truncated")),
    ("encode-corrupt-model-config", "encode",
     copied("tokenizer", "tok", lambda d: (d / "model" / "config.json").write_text("{oops")),
     ["--tokenizer-run", "{tmp}/tok", "--output-dir", "{tmp}/t"], ("config.json",)),
    ("encode-output-is-a-file", "encode", write("f"),
     ["--tokenizer-run", "{run}/tokenizer", "--output-dir", "{tmp}/f"], ("is a file",)),
    ("encode-unknown-split", "encode", None,
     ["--tokenizer-run", "{run}/tokenizer", "--output-dir", "{tmp}/t", "--splits", "train,dev"], ("dev",)),
    # -- train_prior
    ("prior-no-tokens", "train_prior", None, ["--config", PRIOR, "--output-dir", "{tmp}/p", "tokens={tmp}/none"],
     ("no encoded tokens",)),
    ("prior-truncated-tokens", "train_prior",
     copied("tokens", "tokens", lambda d: truncate(d / "train.safetensors")),
     ["--config", PRIOR, "--output-dir", "{tmp}/p", "tokens={tmp}/tokens"], ("train.safetensors",)),
    ("prior-corrupt-token-meta", "train_prior",
     copied("tokens", "tokens", lambda d: (d / "meta.json").write_text("{")),
     ["--config", PRIOR, "--output-dir", "{tmp}/p", "tokens={tmp}/tokens"], ("meta.json",)),
    ("prior-resumed-on-other-tokens", "train_prior",
     lambda tmp, run: copy(run / "prior", tmp / "prior") and {"tok": other_tokens(tmp, run)},
     ["--config", "{run}/prior/config.yaml", "--output-dir", "{tmp}/prior", "tokens={tok}"],
     ("train.safetensors", "--output-dir")),
    ("prior-output-is-a-file", "train_prior", write("f"),
     ["--config", PRIOR, "--output-dir", "{tmp}/f", "tokens={run}/tokens"], ("is a file",)),
    # -- sample
    ("sample-no-prior", "sample", None, ["--prior", "{tmp}/none", "--output-dir", "{tmp}/s"], ("not a saved prior",)),
    ("sample-truncated-prior", "sample",
     copied("prior/model", "pm", lambda d: truncate(d / "model.safetensors")),
     ["--prior", "{tmp}/pm", "--output-dir", "{tmp}/s"], ("model.safetensors", "truncated")),
    ("sample-output-is-a-file", "sample", write("f"),
     ["--prior", "{run}/prior/model", "--output-dir", "{tmp}/f"], ("is a file",)),
    ("sample-zero-samples", "sample", None,
     ["--prior", "{run}/prior/model", "--output-dir", "{tmp}/s", "--num-samples", "0"], ("num_samples",)),
    ("sample-bad-labels", "sample", None,
     ["--prior", "{run}/prior/model", "--output-dir", "{tmp}/s", "--labels", "a,b"], ("--labels",)),
    ("sample-other-tokenizer", "sample", lambda tmp, run: {"tok": other_tokenizer(tmp, run)},
     ["--prior", "{run}/prior/model", "--tokenizer", "{tok}", "--output-dir", "{tmp}/s"], ("fingerprint",)),
    # -- evaluate
    ("evaluate-not-a-run", "evaluate", None, ["--run", "{tmp}/none"], ("not a folder",)),
    ("evaluate-two-images", "evaluate", None, ["--run", "{run}", "--output", "{tmp}/e", "--num-images", "2"],
     ("num_images", "k=5")),
    ("evaluate-truncated-tokenizer", "evaluate",
     copied("tokenizer", "r/tokenizer", lambda d: truncate(d / "model" / "model.safetensors")),
     ["--run", "{tmp}/r"], ("model.safetensors",)),
    ("evaluate-output-is-a-file", "evaluate", write("f"),
     ["--run", "{run}", "--output", "{tmp}/f"], ("is a file",)),
    # -- run
    ("run-config-is-a-folder", "run", None, ["--config", "{tmp}"], ("is a folder",)),
    ("run-empty-config", "run", write("e.yaml", "# nothing\n"),
     ["--config", "{tmp}/e.yaml"], ("is empty",)),
    ("run-unknown-force", "run", None, ["--config", EXP, "--force", "tokeniser"], ("--force",)),
    ("run-bad-override", "run", None, ["--config", EXP, "output_dir={tmp}/r", "tokenizer.model.hiden=8"],
     ("tokenizer.model.hiden",)),
    ("run-output-is-a-file", "run", write("f"),
     ["--config", EXP, "output_dir={tmp}/f"], ("is a file",)),
    ("run-stale-config", "run", copied("", "r"),
     ["--config", EXP, "output_dir={tmp}/r", "tokenizer.model.quantizer.codebook_size=32"],
     ("codebook_size: 16 -> 32", "--force tokenizer")),
    # -- the vqgen command
    ("vqgen-stage-error", "vqgen", None, ["train-tokenizer", "--config", "{tmp}"], ("is a folder",)),
    # -- values no config may hold, refused before any work
    ("lr-nan", "train_tokenizer", None, ["--config", TOK, "--output-dir", "{tmp}/o", "train.lr=nan"],
     ("train.lr", "finite")),
    ("lr-inf", "train_tokenizer", None, ["--config", TOK, "--output-dir", "{tmp}/o", "train.lr=.inf"],
     ("train.lr", "finite")),
    ("lr-negative", "train_prior", None,
     ["--config", PRIOR, "--output-dir", "{tmp}/p", "tokens={run}/tokens", "train.lr=-0.1"], ("lr must be positive",)),
    ("seed-negative", "train_tokenizer", None, ["--config", TOK, "--output-dir", "{tmp}/o", "train.seed=-1"],
     ("train.seed", "2**32")),
    ("seed-too-large", "run", None, ["--config", EXP, "output_dir={tmp}/r", "seed=4294967296"], ("seed", "2**32")),
    ("sample-seed-too-large", "sample", None,
     ["--prior", "{run}/prior/model", "--output-dir", "{tmp}/s", "--seed", "4294967296"], ("seed",)),
    ("sample-cfg-scale-nan", "sample", None,
     ["--prior", "{run}/prior/model", "--output-dir", "{tmp}/s", "--cfg-scale", "nan"], ("cfg_scale", "finite")),
    ("sample-temperature-inf", "sample", None,
     ["--prior", "{run}/prior/model", "--output-dir", "{tmp}/s", "--temperature", "inf"], ("temperature", "finite")),
    ("sample-labels-not-classes", "sample", None,
     ["--prior", "{run}/prior/model", "--output-dir", "{tmp}/s", "--labels", "999"], ("labels [999]",)),
    ("integer-of-100000-digits", "train_tokenizer", None,
     ["--config", TOK, "--output-dir", "{tmp}/o", "train.steps=" + "9" * 100_000], ("too long",)),
    ("integer-beyond-64-bits", "train_tokenizer", None,
     ["--config", TOK, "--output-dir", "{tmp}/o", f"train.steps={2**70}"], ("train.steps", "2**63")),
    ("path-of-300-characters", "train_tokenizer", None, ["--config", TOK, "--output-dir", "{tmp}/" + "a" * 300],
     ("output_dir", "255")),
    ("sample-path-of-300-characters", "sample", None,
     ["--prior", "{run}/prior/model", "--output-dir", "{tmp}/" + "s" * 300], ("--output-dir", "255")),
    ("duplicate-yaml-key", "train_tokenizer", write("d.yaml", "train:\n  steps: 3\ntrain:\n  lr: 0.1\n"),
     ["--config", "{tmp}/d.yaml"], ("'train' twice",)),
    ("run-output-is-null", "run", None, ["--config", EXP, "output_dir=~"], ("output_dir", "folder path")),
    ("run-output-is-a-users-folder", "run", write("notes.txt"), ["--config", EXP, "output_dir={tmp}"],
     ("notes.txt", "did not make")),
]


@pytest.fixture(autouse=True)
def _hub_unreachable(monkeypatch):
    """Every hub look-up fails fast, as on a machine without network (whatever this machine has)."""
    import vqgen.tokenizer.data as data

    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0, offline=False: False)


def _argv(template: list[str], fields: dict) -> list[str]:
    return [a.format(**fields) for a in template]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(case, tmp_path, tiny_run, capsys):
    name, command, setup, template, words = case
    fields = {"tmp": tmp_path, "run": tiny_run}
    if setup is not None:
        fields.update(setup(tmp_path, tiny_run) or {})
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        MAINS[command](_argv(template, fields))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # progress bars (drawn with carriage returns) may come first; the message is one line of its own
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_the_table_is_large_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[1] for c in CASES} == set(MAINS)  # every entry point is in it


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        train_tokenizer.main(["--config", str(tmp_path), "--debug"])


def test_unknown_vqgen_command_exits_2(capsys):
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown command 'trian'"


@pytest.mark.parametrize("argv, words", [
    (["-m", "vqgen.pipelines.cli", "train-tokenizer", "--config", "{tmp}"], "is a folder"),
    (["-m", "vqgen.pipelines.sample", "--prior", "{tmp}/none", "--output-dir", "{tmp}/s"], "not a saved prior"),
])
def test_a_user_sees_one_line(tmp_path, argv, words):
    """As a real process: stderr is exactly one line and the exit code is 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "VQGEN_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, *[a.format(tmp=tmp_path) for a in argv]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr


def test_channel_conversion_is_logged_once(tmp_path, caplog):
    """An image folder of RGBA images read as grey says so, once."""
    import vqgen.tokenizer.data as data

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(24):
        Image.new("RGBA", (20, 20), (10 * i, 0, 0, 128)).save(folder / f"{i}.png")
    data._LOGGED_CONVERSIONS.clear()
    cfg = data.DataConfig(source="hf", data_dir=str(folder), image_size=16, channels=1, validation_fraction=0.25)
    with caplog.at_level(logging.WARNING, logger="vqgen.data"):
        ds = data.build_dataset(cfg, "train")
        images = [ds[i]["image"] for i in range(len(ds))]
    assert images[0].shape == (1, 16, 16)
    messages = [r.getMessage() for r in caplog.records if r.name == "vqgen.data"]
    assert len(messages) == 1 and "RGBA" in messages[0] and "alpha" in messages[0] and "grey" in messages[0]


def test_truncated_model_file_is_named(tmp_path, tiny_run):
    """Loading a truncated model.safetensors names the file, from the library too."""
    from vqgen.core.errors import CorruptFileError
    from vqgen.tokenizer.model import VQVAE

    model = copy(tiny_run / "tokenizer" / "model", tmp_path / "model")
    truncate(model / "model.safetensors")
    with pytest.raises(CorruptFileError, match=str(model / "model.safetensors")):
        VQVAE.from_pretrained(model)
    # a file of the right length whose header is garbage too
    (model / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptFileError, match="header"):
        VQVAE.from_pretrained(model)
    assert json.loads((tiny_run / "tokenizer" / "model" / "config.json").read_text())  # the original is intact


def test_command_flags_are_generated_from_the_config_class(capsys):
    """Every field of SamplingConfig is a flag of the sample command (the class is the one description), and a
    flag is a key=value override by another spelling."""
    import dataclasses

    from vqgen.pipelines.common import parse_cli
    from vqgen.prior.sampling import SamplingConfig

    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(SamplingConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "--no-cache" in text
    cfg, _ = parse_cli(SamplingConfig, ["--cfg-scale", "1.5", "--labels", "0,3", "--no-cache", "--compile",
                                        "temperature=0.5"], "test")
    assert (cfg.cfg_scale, cfg.labels, cfg.use_cache, cfg.compile, cfg.temperature) == (1.5, [0, 3], False, True, 0.5)
    later, _ = parse_cli(SamplingConfig, ["--cfg-scale", "1.5", "cfg_scale=2.0"], "test")
    assert later.cfg_scale == 2.0  # key=value overrides come last
