"""What vqgen deletes, overwrites and loads, with one writer per folder (issue 19).

- deletion guards: only folders vqgen made (marked, or recognised from an older version), inside the run folder,
  holding nothing but vqgen's files and no links, are ever deleted; sweep names are plain names; a run folder
  that is ``/``, a home folder, a source checkout or a user's folder is refused before anything happens;
- hostile files: a pickle payload planted in every kind of file vqgen reads never runs;
- samples: written aside and renamed into place with a manifest; ``evaluate`` refuses samples that are partial,
  interrupted, changed after sampling or made by another tokenizer or prior;
- one writer per folder (an OS lock that dies with its process), SIGINT and full disks end in one line, a stage is
  complete only when its record lists every output.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from vqgen.core.config import ConfigError, read_yaml
from vqgen.core.errors import UserError
from vqgen.core.diskspace import DiskFullError, disk_full_guard
from vqgen.core.files import MARKER, TEMPORARY, UnsafeFolderError, check_writable_as, read_marker
from vqgen.core.locks import folder_lock
from vqgen.pipelines import evaluate, run, sample, train_tokenizer
from vqgen.pipelines.manifest import MANIFEST, SamplesError, partial_path, verify_samples
from vqgen.tokenizer.model import tokenizer_fingerprint
from vqgen.core.io import file_fingerprint

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "experiments" / "tiny.yaml")
TOK = str(REPO / "configs" / "tokenizer" / "tiny.yaml")
pytestmark = pytest.mark.usefixtures("cache")  # never the user's feature-extractor cache
ENV = {**os.environ, "PYTHONPATH": str(REPO), "VQGEN_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
def fresh(tiny_run, tmp_path) -> Path:
    """A private copy of the finished tiny experiment (tokenizer, tokens, prior, samples)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (links not followed) with its sha256, to show nothing changed."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if name != ".vqgen.lock" and not path.is_symlink():
                out[str(path.relative_to(folder))] = file_fingerprint(path)
    return out


def one_line_exit(capsys, fn, argv, code: int = 2) -> str:
    """Run an entry point expecting ``SystemExit(code)`` and exactly one line on stderr; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        fn(argv)
    assert info.value.code == code
    lines = [line for line in capsys.readouterr().err.split("\n") if line.strip() and "\r" not in line]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ deletion guards

def test_every_folder_of_a_run_is_marked_with_the_runs_id(tiny_run):
    run_id = read_marker(tiny_run)["run_id"]
    assert read_marker(tiny_run)["kind"] == "run"
    for name, kind in (("tokenizer", "tokenizer"), ("tokens", "tokens"), ("prior", "prior"), ("samples", "samples")):
        marker = read_marker(tiny_run / name)
        assert marker is not None and marker["kind"] == kind and marker["run_id"] == run_id, name


def test_a_sweep_entry_named_dotdot_never_reaches_the_project(tmp_path, monkeypatch, capsys):
    """The probe: an entry named '..' with --force tokenizer deleted the project's tokenizer/ and prior/."""
    project = tmp_path / "project"
    for folder in ("tokenizer", "prior"):
        (project / folder).mkdir(parents=True)
        (project / folder / "__init__.py").write_text("# source\n")
    monkeypatch.chdir(project)
    before = snapshot(project)
    for name in ("..", ".", "a/b", "/etc", ".hidden", "a\\b", "", " x"):
        (project / "sweep.yaml").write_text(yaml.safe_dump({"experiments": [
            {"config": TINY, "name": name, "overrides": ["output_dir=runs/tiny"]}]}))
        line = one_line_exit(capsys, run.main, ["--config", "sweep.yaml", "--force", "tokenizer"])
        assert "'name' must be" in line, line
    (project / "sweep.yaml").unlink()
    assert snapshot(project) == before


def test_a_sweep_run_folder_must_stay_inside_its_output_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "runs" / "linked")  # a name that leads out through a link
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"experiments": [
        {"config": TINY, "name": "linked", "overrides": ["output_dir=runs/tiny"]}]}))
    line = one_line_exit(capsys, run.main, ["--config", "sweep.yaml"])
    assert "outside" in line and "elsewhere" in line


def protected_folders(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    home = tmp_path / "home"
    (home / "docs").mkdir(parents=True)
    (home / "docs" / "thesis.txt").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / "setup.py").write_text("")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    return {"root": Path("/"), "home": home, "above home": tmp_path, "a checkout": checkout, "a user's folder": user,
            "vqgen's checkout": REPO, "vqgen's source package": REPO / "tokenizer"}


@pytest.mark.parametrize("which", ["root", "home", "above home", "a checkout", "a user's folder", "vqgen's checkout",
                                   "vqgen's source package"])
def test_run_folders_that_are_not_vqgens_are_refused(tmp_path, monkeypatch, capsys, which):
    folder = protected_folders(tmp_path, monkeypatch)[which]
    watched = folder if folder.is_relative_to(tmp_path) else None
    before = snapshot(watched) if watched else None
    argv = ["--config", TINY, f"output_dir={folder}", "stages=[tokenizer]"]
    if watched:  # only where the test owns the folder: --force there must delete nothing either
        argv += ["--force", "tokenizer"]
    line = one_line_exit(capsys, run.main, argv)
    assert "output_dir" in line and "give" in line, line
    assert read_marker(folder) is None
    if watched:
        assert snapshot(watched) == before


def test_trainers_refuse_a_users_folder(tmp_path, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.yaml").write_text("my: own config\n")
    line = one_line_exit(capsys, train_tokenizer.main, ["--config", TOK, "--output-dir", str(user)])
    assert "did not make" in line and "new or empty folder" in line
    assert (user / "config.yaml").read_text() == "my: own config\n" and sorted(os.listdir(user)) == ["config.yaml"]


def test_force_never_deletes_a_users_file(fresh, capsys):
    (fresh / "prior" / "notes.txt").write_text("mine")
    before = snapshot(fresh)
    line = one_line_exit(capsys, run.main, ["--config", TINY, f"output_dir={fresh}",
                                            "stages=[tokenizer, encode, prior, sample]", "--force", "tokenizer"])
    assert "notes.txt" in line and "did not write" in line
    assert snapshot(fresh) == before  # every stage is still there: nothing is deleted when one entry is refused


def test_force_never_follows_a_link_or_deletes_another_runs_folder(fresh, tmp_path, capsys):
    outside = tmp_path / "outside"
    shutil.move(fresh / "samples", outside)
    os.symlink(outside, fresh / "samples")
    before = snapshot(outside)
    argv = ["--config", TINY, f"output_dir={fresh}", "stages=[tokenizer, encode, prior, sample]", "--force", "sample"]
    assert "symbolic link" in one_line_exit(capsys, run.main, argv)
    assert snapshot(outside) == before
    os.unlink(fresh / "samples")
    marker = read_marker(fresh / "prior")
    (fresh / "prior" / MARKER).write_text(json.dumps({**marker, "run_id": "0" * 32}))  # moved in from another run
    argv[-1] = "prior"
    assert "another vqgen run" in one_line_exit(capsys, run.main, argv)
    assert (fresh / "prior" / "model").is_dir()


@pytest.mark.parametrize("lookalike", ["garbage", "a folder", "a link to a real marker", "wrong shape"])
def test_a_file_named_like_a_marker_does_not_make_a_folder_vqgens(tiny_run, tmp_path, lookalike):
    user = tmp_path / "user"
    user.mkdir()
    (user / "photo.jpg").write_bytes(b"\xff\xd8")
    marker = user / MARKER
    if lookalike == "garbage":
        marker.write_text("not json")
    elif lookalike == "a folder":
        marker.mkdir()
    elif lookalike == "a link to a real marker":
        os.symlink(tiny_run / MARKER, marker)
    else:
        marker.write_text(json.dumps({"kind": "run", "run_id": "x"}))
    assert read_marker(user) is None
    with pytest.raises(UnsafeFolderError, match="photo.jpg"):
        check_writable_as(user, "run", "output_dir")


def test_folders_of_an_older_vqgen_are_recognised_and_adopted(fresh, capsys):
    for marker in fresh.rglob(MARKER):
        marker.unlink()
    run.main(["--config", TINY, f"output_dir={fresh}", "stages=[tokenizer, encode, prior, sample]"])
    out = capsys.readouterr().out
    assert "[run] prior: complete, skipped" in out and "[run] sample: complete, skipped" in out
    run_id = read_marker(fresh)["run_id"]
    assert all(read_marker(fresh / n)["run_id"] == run_id for n in ("tokenizer", "tokens", "prior", "samples"))
    run.main(["--config", TINY, f"output_dir={fresh}", "stages=[tokenizer, encode, prior, sample]",
              "prior.train.lr=0.002", "--force", "prior"])  # adopted folders may be redone
    assert yaml.safe_load((fresh / "prior" / "config.yaml").read_text())["train"]["lr"] == 0.002


def test_sample_never_deletes_a_users_files(fresh, capsys):
    (fresh / "samples" / "images" / "holiday.jpg").write_bytes(b"\xff\xd8 mine")
    before = snapshot(fresh / "samples")
    line = one_line_exit(capsys, sample.main, ["--prior", str(fresh / "prior" / "model"), "--output-dir",
                                               str(fresh / "samples"), "--num-samples", "4"])
    assert "holiday.jpg" in line
    assert snapshot(fresh / "samples") == before and not partial_path(fresh / "samples").exists()


@pytest.mark.parametrize("flags, words", [
    (["--labels", "999"], "labels [999]"),
    (["--cfg-scale", "nan"], "cfg_scale"),
    (["--temperature", "inf"], "temperature"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2**32)], "seed"),
    (["--top-p", "nan"], "top_p"),
])
def test_sample_validates_before_touching_the_previous_samples(fresh, capsys, flags, words):
    before = snapshot(fresh / "samples")
    line = one_line_exit(capsys, sample.main, ["--prior", str(fresh / "prior" / "model"), "--output-dir",
                                               str(fresh / "samples"), *flags])
    assert words in line, line
    assert snapshot(fresh / "samples") == before and not partial_path(fresh / "samples").exists()


def test_an_interrupted_sampling_keeps_the_previous_samples(fresh, capsys, monkeypatch):
    before = snapshot(fresh / "samples")
    argv = ["--prior", str(fresh / "prior" / "model"), "--output-dir", str(fresh / "samples"), "--num-samples", "6",
            "--seed", "3"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(sample, "decode_to_uint8", interrupted)
        line = one_line_exit(capsys, sample.main, argv, code=130)
    assert line.startswith("interrupted") and "rerun the same command" in line
    assert snapshot(fresh / "samples") == before
    with pytest.raises(SamplesError, match="interrupted"):
        verify_samples(fresh / "samples", tokenizer_fingerprint(fresh / "tokenizer" / "model"))
    assert ".samples.partial" in run.forced_outputs(fresh, ["sample"])  # --force sample may remove it
    sample.main(argv)
    assert not partial_path(fresh / "samples").exists()
    manifest = json.loads((fresh / "samples" / MANIFEST).read_text())
    assert manifest["count"] == 6 and manifest["sampling"]["seed"] == 3
    assert verify_samples(fresh / "samples", tokenizer_fingerprint(fresh / "tokenizer" / "model"))["count"] == 6


# ------------------------------------------------------------------------------------------- hostile files

class Payload:
    """Unpickling this creates the file ``sentinel``: proof that a pickle ran code."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (Path.touch, (Path(self.sentinel),))


def plant(path: Path, sentinel: Path, form: str) -> None:
    """Replace ``path`` by a payload: a raw pickle, a ``torch.save`` archive holding one, or a YAML document whose
    Python tag would create ``sentinel``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "pickle":
        path.write_bytes(pickle.dumps(Payload(sentinel)))
    elif form == "torch-archive":
        torch.save({"state": Payload(sentinel)}, path)
    else:
        path.write_text(f"!!python/object/apply:os.mkdir ['{sentinel}']\n")


def test_the_payloads_run_when_loaded_unsafely(tmp_path):
    """The planted files really carry code: unpickling runs it, and so does an unsafe YAML load (so the tests below
    can fail)."""
    plant(tmp_path / "p.pkl", tmp_path / "ran", "pickle")
    pickle.loads((tmp_path / "p.pkl").read_bytes())
    assert (tmp_path / "ran").exists()
    plant(tmp_path / "p.yaml", tmp_path / "ran too", "yaml-tag")
    yaml.unsafe_load((tmp_path / "p.yaml").read_text())
    assert (tmp_path / "ran too").exists()


def _samples(run_dir: Path) -> None:
    verify_samples(run_dir / "samples", tokenizer_fingerprint(run_dir / "tokenizer" / "model"),
                   file_fingerprint(run_dir / "prior" / "model" / "model.safetensors"), 16)


def _prior(run_dir: Path) -> None:
    from vqgen.prior.model import Prior

    Prior.from_pretrained(run_dir / "prior" / "model")


def _prior_with_a_pickle_beside(run_dir: Path) -> None:
    """The safetensors weights gone, a pickled pytorch_model.bin beside the config: it must not be read."""
    model = run_dir / "prior" / "model"
    os.replace(model / "model.safetensors", model / "other.safetensors")
    _prior(run_dir)


def _cached_classifier(run_dir: Path, part: str | None = None) -> None:
    """A cached feature extractor: a damaged entry is trained again (here: a tiny model), never loaded."""
    from vqgen.eval.features import ClassifierConfig, FeatureClassifier, cached_model

    arch = {"channels": 3, "image_size": 16, "head_sizes": [2], "width": 8, "feature_dim": 16}
    cfg = ClassifierConfig(width=8, feature_dim=16)
    data = {"source": "synthetic"}
    train = lambda: (FeatureClassifier(**arch), {"architecture": arch, "heads": [["a", 2]]})  # noqa: E731
    weights = cached_model("classifiers", data, "classifier", cfg, 1, train, cache_dir=run_dir / "cache")
    assert weights.parent.parent == run_dir / "cache"
    load_file(str(weights))  # what the extractor then loads is sound again


def _cached_reference(run_dir: Path) -> None:
    from vqgen.eval.fid import cached_reference

    features = torch.randn(20, 4, dtype=torch.float64)
    tensors, _ = cached_reference("key", lambda: {"features": features}, cache_dir=run_dir / "reference")
    assert torch.equal(tensors["features"], features)


def _perceptual(run_dir: Path) -> None:
    from vqgen.tokenizer.perceptual import _read_state

    _read_state(run_dir / "vgg16.pth")


def _tokens(run_dir: Path) -> None:
    from vqgen.prior.data import TokenDataset

    TokenDataset(run_dir / "tokens", "train")


def _tokenizer(run_dir: Path) -> None:
    from vqgen.tokenizer.model import VQVAE

    VQVAE.from_pretrained(run_dir / "tokenizer" / "model")


def _resume_tokenizer(run_dir: Path) -> None:
    """Continue the tokenizer from its checkpoint (every part is verified by its sha256 before it is parsed, and
    parsed without unpickling)."""
    from vqgen.pipelines.train_tokenizer import train_tokenizer

    train_tokenizer(run.load_experiment(TINY, [f"output_dir={run_dir}", "tokenizer.train.steps=7"]).tokenizer)


def _stage_records(run_dir: Path) -> None:
    cfg = run.load_experiment(TINY, [f"output_dir={run_dir}"])
    run.check_stage_configs(cfg, run_dir)


def _tokenizer_run_config(run_dir: Path) -> None:
    from vqgen.pipelines.encode import tokenizer_data_config

    tokenizer_data_config(run_dir / "tokenizer")


def _experiment(run_dir: Path) -> None:
    run.load_experiment(run_dir / "experiment.yaml")


def _marker(run_dir: Path) -> None:
    check_writable_as(run_dir / "tokenizer", "tokenizer", "--output-dir")


def _prepare_cache(run_dir: Path) -> None:
    _cached_classifier(run_dir)
    _cached_reference(run_dir)


# Every kind of file vqgen reads: (name, path in a copy of the tiny run, how vqgen reads it, setup before planting).
# Adding a kind is one line (the trainer's checkpoint parts are added with the checkpoint format).
HOSTILE_FILES = [
    ("tokenizer weights", "tokenizer/model/model.safetensors", _tokenizer, None),
    ("tokenizer config", "tokenizer/model/config.json", _tokenizer, None),
    ("prior weights", "prior/model/model.safetensors", _prior, None),
    ("prior record", "prior/model/vqgen_prior.json", _prior, None),
    ("pickled prior weights", "prior/model/pytorch_model.bin", _prior_with_a_pickle_beside, None),
    ("token split", "tokens/train.safetensors", _tokens, None),
    ("token meta", "tokens/meta.json", _tokens, None),
    ("sampled tokens", "samples/tokens.safetensors", _samples, None),
    ("sampled image", "samples/images/00000.png", _samples, None),
    ("sample meta", "samples/meta.json", _samples, None),
    ("sample manifest", "samples/manifest.json", _samples, None),
    ("stage record", "tokenizer/vqgen_stage.json", _stage_records, None),
    ("trainer config", "tokenizer/config.yaml", _tokenizer_run_config, None),
    ("saved experiment", "experiment.yaml", _experiment, None),
    ("folder marker", f"tokenizer/{MARKER}", _marker, None),
    ("cached classifier weights", "cache/KEY/model.safetensors", _cached_classifier, _prepare_cache),
    ("cached classifier meta", "cache/KEY/meta.json", _cached_classifier, _prepare_cache),
    ("cached reference features", "reference/key.safetensors", _cached_reference, _prepare_cache),
    ("perceptual weights", "vgg16.pth", _perceptual, None),
    *((f"checkpoint {part}", f"tokenizer/checkpoints/step_00000006/{part}", _resume_tokenizer, None)
      for part in ("model_tokenizer.safetensors", "optimizer_tokenizer.pt", "scheduler_tokenizer.pt", "rng_0.pt",
                   "trainer.json", "vqgen_state.json")),
]


@pytest.mark.parametrize("form", ["pickle", "torch-archive", "yaml-tag"])
@pytest.mark.parametrize("kind", HOSTILE_FILES, ids=[k[0] for k in HOSTILE_FILES])
def test_a_planted_pickle_never_runs(fresh, tmp_path, capsys, kind, form):
    name, relative, read, setup = kind
    if setup is not None:
        setup(fresh)
    if "KEY" in relative:  # the cache entry's folder is named by its key
        relative = relative.replace("KEY", next((fresh / "cache").iterdir()).name)
    sentinel = tmp_path / "the payload ran"
    plant(fresh / relative, sentinel, form)
    try:
        read(fresh)  # a cache is rebuilt; everything else is refused
    except UserError as err:
        assert "\n" not in str(err)
    assert not sentinel.exists(), f"{name}: the pickle ran"


def test_token_files_are_checked_before_use(fresh):
    from vqgen.prior.data import TokenDataError, TokenDataset

    meta = json.loads((fresh / "tokens" / "meta.json").read_text())
    for bad in ("../../tokenizer/model/model.safetensors", "/etc/passwd", 5):
        (fresh / "tokens" / "meta.json").write_text(json.dumps({**meta, "splits": {"train": {"file": bad}}}))
        with pytest.raises(TokenDataError, match="names"):
            TokenDataset(fresh / "tokens", "train")
    (fresh / "tokens" / "meta.json").write_text(json.dumps(meta))
    data = load_file(str(fresh / "tokens" / "train.safetensors"))
    save_file({**data, "tokens": data["tokens"] + 1000}, str(fresh / "tokens" / "train.safetensors"))
    with pytest.raises(TokenDataError, match="outside"):
        TokenDataset(fresh / "tokens", "train")
    save_file({**data, "tokens": data["tokens"].float()}, str(fresh / "tokens" / "train.safetensors"))
    with pytest.raises(TokenDataError, match="token grids"):
        TokenDataset(fresh / "tokens", "train")


# ----------------------------------------------------------------------------------------- samples manifest

def _delete_a_third(samples: Path) -> None:
    for path in sorted((samples / "images").glob("*.png"))[::3]:
        path.unlink()


def _resize_one(samples: Path) -> None:
    path = samples / "images" / "00003.png"
    Image.open(path).resize((8, 8)).save(path)


def _add_one(samples: Path) -> None:
    shutil.copy(samples / "images" / "00000.png", samples / "images" / "00099.png")


def _interrupted_resample(samples: Path) -> None:
    shutil.copytree(samples, partial_path(samples))
    (partial_path(samples) / MANIFEST).unlink()


def _other_tokenizer(samples: Path) -> None:
    weights = samples.parent / "tokenizer" / "model" / "model.safetensors"
    data = load_file(str(weights))
    data["pre_quant.bias"] += 1
    save_file(data, str(weights))


def _other_prior(samples: Path) -> None:
    weights = samples.parent / "prior" / "model" / "model.safetensors"
    data = load_file(str(weights))
    key = next(iter(data))
    data[key] = data[key] + 1
    save_file(data, str(weights))


def _no_records(samples: Path) -> None:
    (samples / MANIFEST).unlink()
    (samples / "meta.json").unlink()


def _legacy(change):
    def apply(samples: Path) -> None:
        (samples / MANIFEST).unlink()
        change(samples)
    return apply


@pytest.mark.parametrize("change, words", [
    (_delete_a_third, "is missing"),
    (_resize_one, "differs from what the sampler wrote"),
    (_add_one, "not written by the sampler"),
    (_interrupted_resample, "interrupted"),
    (_other_tokenizer, "another tokenizer"),
    (_other_prior, "another prior"),
    (_no_records, "not a complete samples folder"),
    (_legacy(_delete_a_third), "is missing"),
    (_legacy(_resize_one), "is 8x8"),
    (_legacy(_add_one), "not written by the sampler"),
], ids=["a-third-deleted", "resized", "extra", "interrupted", "other-tokenizer", "other-prior", "no-records",
        "legacy-a-third-deleted", "legacy-resized", "legacy-extra"])
def test_evaluate_refuses_samples_that_are_not_what_was_sampled(fresh, capsys, change, words):
    change(fresh / "samples")
    line = one_line_exit(capsys, evaluate.main, ["--run", str(fresh)])
    assert words in line, line
    assert not (fresh / "report.json").exists()


def test_the_manifest_records_what_evaluation_needs(tiny_run):
    manifest = json.loads((tiny_run / "samples" / MANIFEST).read_text())
    assert manifest["count"] == 24 and manifest["image_size"] == [16, 16]
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tiny_run / "tokenizer" / "model")
    assert manifest["prior"]["fingerprint"] == file_fingerprint(tiny_run / "prior" / "model" / "model.safetensors")
    assert {k: manifest["sampling"][k] for k in ("cfg_scale", "temperature", "num_samples")} == {
        "cfg_scale": 1.5, "temperature": 1.0, "num_samples": 24}
    images = [name for name in manifest["files"] if name.startswith("images/")]
    assert len(images) == 24 and "tokens.safetensors" in manifest["files"]
    assert manifest["files"]["tokens.safetensors"]["sha256"] == file_fingerprint(
        tiny_run / "samples" / "tokens.safetensors")
    verified = verify_samples(tiny_run / "samples", manifest["tokenizer"]["fingerprint"],
                              manifest["prior"]["fingerprint"], 16)
    assert verified["verified"] == "sha256" and verified["sampling"] == manifest["sampling"]


def test_sampler_settings_are_in_the_comparison_table(tmp_path):
    from vqgen.eval.report import write_comparison

    reports = {name: {"generation": {"fid": 1.0, "sampling": {"cfg_scale": scale, "temperature": 1.0, "top_k": 0,
                                                              "top_p": 1.0, "seed": 0, "num_samples": 8}}}
               for name, scale in (("a", 1.5), ("b", 3.0))}
    write_comparison(reports, {}, tmp_path)
    table = json.loads((tmp_path / "comparison.json").read_text())["table"]
    assert table["generation.sampling.cfg_scale"] == {"a": 1.5, "b": 3.0}
    assert "generation.sampling.seed" in table and "generation.sampling.top_p" in table


# ---------------------------------------------------------------------------------------- one writer, locks

HOLD = ("import sys, time\nfrom vqgen.core.locks import folder_lock\nwith folder_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n")


def test_a_second_writer_is_refused_at_once_naming_the_pid(fresh, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(fresh)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        line = one_line_exit(capsys, run.main, ["--config", TINY, f"output_dir={fresh}",
                                                "stages=[tokenizer, encode, prior, sample]"])
        assert f"PID {holder.pid}" in line and "in use" in line
        # a stage command on a folder inside the run takes the run's lock too
        line = one_line_exit(capsys, train_tokenizer.main, ["--config", str(fresh / "tokenizer" / "config.yaml"),
                                                            "--output-dir", str(fresh / "tokenizer")])
        assert f"PID {holder.pid}" in line
        assert time.monotonic() - started < 30  # refused at once, not after waiting
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    with folder_lock(fresh):  # the OS released the lock of the killed process
        pass


# ----------------------------------------------------------------------------------- interrupts, full disks

def test_sigint_ends_in_one_line_exit_130_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "tok"
    command = [sys.executable, "-m", "vqgen.pipelines.train_tokenizer", "--config", TOK, "--output-dir", str(out),
               "train.steps=200", "train.log_every=2", "train.checkpoint_every=2"]
    # a shell that starts the suite in the background (``cmd &``) leaves SIGINT ignored for its children, and Python
    # then installs no Ctrl-C handler: restore the default so the command sees the interrupt a terminal would send
    proc = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line]
    assert len(lines) == 1 and lines[0].startswith("interrupted at step "), err[-2000:]
    assert lines[0].endswith("(tokenizer); rerun the same command to resume")
    left = [p for p in out.rglob("*") if TEMPORARY.match(p.name) and not p.name.endswith(".lock")]
    assert not left, left
    done = subprocess.run(command, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout + done.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 200


def test_full_disk_errors_are_one_line_naming_the_file(tiny_run, tmp_path, capsys, monkeypatch):
    """The three raw errors a full disk gives (OSError 28, safetensors' text, torch.save's failed write)."""
    from vqgen.pipelines import encode

    def no_space_safetensors(tensors, path, *args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr("vqgen.prior.data.save_file", no_space_safetensors)
        line = one_line_exit(capsys, encode.main, ["--tokenizer-run", str(tiny_run / "tokenizer"), "--output-dir",
                                                   str(tmp_path / "tokens"), "--splits", "train"])
    assert "no space left" in line and "train.safetensors" in line

    real_write_text = Path.write_text

    def no_space_text(self, *args, **kwargs):
        if ".tmp-" in self.name:
            raise OSError(28, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", no_space_text)
        line = one_line_exit(capsys, run.main, ["--config", TINY, f"output_dir={tmp_path / 'r'}"])
    assert "no space left" in line and str(tmp_path / "r") in line

    torch_failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(RuntimeError, match="unexpected pos"):  # a disk with room: the error is not mislabelled
        with disk_full_guard(tmp_path / "state.pt"):
            raise torch_failure
    with monkeypatch.context() as patch:
        patch.setattr("vqgen.core.diskspace._nearly_full", lambda path: True)
        with pytest.raises(DiskFullError, match="state.pt"):
            with disk_full_guard(tmp_path / "state.pt"):
                raise torch_failure


def _small_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_is_one_line(tmp_path):
    """On a 96 KiB tmpfs (needs root; skipped elsewhere, where the mocked test above holds)."""
    disk = tmp_path / "disk"
    if not _small_tmpfs(disk, "96k"):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        proc = subprocess.run([sys.executable, "-m", "vqgen.pipelines.train_tokenizer", "--config", TOK,
                               "--output-dir", str(disk / "tok"), "train.steps=4", "train.checkpoint_every=1"],
                              env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    lines = [line for line in proc.stderr.split("\n") if line.strip() and "\r" not in line
             and not line.startswith("warning")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: no space left") and str(disk) in lines[0]


# ------------------------------------------------------------------------------ stage completion, reruns

def test_a_stage_is_complete_only_when_its_record_lists_every_output(tmp_path):
    from vqgen.pipelines.evaluate import EvalConfig
    from vqgen.pipelines.stages import stage

    def _stage_complete(run_dir, name):
        return stage(name).complete(EvalConfig(), run_dir)

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "report.json").write_text("{}")
    record = folder / "report_stage.json"
    assert not _stage_complete(folder, "evaluate")  # the probe: report.json without report.html
    for name in ("report.md", "report.html"):
        (folder / name).write_text("x")
    assert not _stage_complete(folder, "evaluate")  # every output, but no record written after them
    record.write_text(json.dumps({"stage": "evaluate"}))
    assert not _stage_complete(folder, "evaluate")  # a record that lists no outputs
    record.write_text(json.dumps({"stage": "evaluate", "outputs": {"report.json": 2, "report.md": 1,
                                                                   "report.html": 1}}))
    assert _stage_complete(folder, "evaluate")
    (folder / "report.json").write_text('{"changed": 1}')  # rewritten after the record
    assert not _stage_complete(folder, "evaluate")


def test_a_run_stopped_by_a_nonfinite_loss_reruns_with_a_fixed_value(tmp_path, capsys):
    folder = tmp_path / "run"
    base = ["--config", TINY, f"output_dir={folder}", "stages=[tokenizer]"]
    bad = ["tokenizer.train.lr=1e30", "tokenizer.train.max_grad_norm=0", "tokenizer.train.steps=20",
           "tokenizer.train.checkpoint_every=20", "tokenizer.model.quantizer.kind=vq", "tokenizer.schedule.mode=early",
           "tokenizer.schedule.ae_steps=0"]
    assert "at step" in one_line_exit(capsys, run.main, base + bad)
    assert not (folder / "tokenizer" / "summary.json").exists()
    run.main(base)  # no --force: nothing was produced
    assert json.loads((folder / "tokenizer" / "summary.json").read_text())["steps"] == 6


def test_duplicate_yaml_keys_are_refused(tmp_path):
    (tmp_path / "d.yaml").write_text("train:\n  steps: 3\nmodel:\n  hidden: 8\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="'train' twice"):
        read_yaml(tmp_path / "d.yaml")
