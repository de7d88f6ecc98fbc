"""`vqgen run` refuses, before any stage runs, data that lacks a split a stage will read (image folders, parquet
files, hub sets), with one line that names the split and the ways out."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

import vqgen.tokenizer.data as data_module
from vqgen.pipelines.run import check_splits, load_experiment, main as run_main, needed_splits
from vqgen.tokenizer.data import DataError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "experiments" / "tiny.yaml"


def _folder(root: Path, splits=("train",)) -> Path:
    for split in splits:
        for k, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(np.full((24, 40, 3), 60 + 120 * k, np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def _experiment(tmp_path: Path, *data: str, extra: tuple[str, ...] = ()):
    return load_experiment(TINY, [f"output_dir={tmp_path / 'run'}", "tokenizer.data.source=hf",
                                  f"tokenizer.data.cache_dir={tmp_path / 'hf-cache'}",
                                  *data, *extra])


def test_image_folder_without_test_refused_before_anything_runs(tmp_path, capsys):
    root = _folder(tmp_path / "images")
    args = ["--config", str(TINY), f"output_dir={tmp_path / 'run'}", "tokenizer.data.source=hf",
            f"tokenizer.data.data_dir={root}", f"tokenizer.data.cache_dir={tmp_path / 'hf-cache'}",
            "tokenizer.data.validation_fraction=0.25"]
    with pytest.raises(SystemExit) as stop:
        run_main(args)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()  # datasets' own progress bar may come first
    err = lines[-1]
    assert [line for line in lines if "error" in line] == [err] and err.startswith("error: this run needs the test split")
    assert "(encode.splits, evaluate.split=test)" in err
    assert f"add a folder {root / 'test'}/ laid out like the training images" in err
    assert 'encode.splits=["train", "validation"] evaluate.split=validation' in err
    assert "data_files" not in err  # no hint meant for parquet users
    assert not (tmp_path / "run" / "tokenizer").exists()  # refused before the first stage


def test_parquet_and_hub_hints_and_what_passes(tmp_path, monkeypatch):
    images = [Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)) for i in range(8)]
    train = tmp_path / "train.parquet"
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})
                               ).to_parquet(str(train))
    cfg = _experiment(tmp_path, f"tokenizer.data.data_files={{train: {train}}}", "tokenizer.data.validation_fraction=0.25")
    with pytest.raises(DataError, match="add data.data_files.test=") as err:
        check_splits(cfg)
    assert "evaluate.split=validation" in str(err.value)
    # without the stages that read test, the same data is fine (validation is carved from train)
    fine = _experiment(tmp_path, f"tokenizer.data.data_files={{train: {train}}}", "tokenizer.data.validation_fraction=0.25",
                       extra=("stages=[tokenizer, encode, prior]", "encode.splits=[train, validation]"))
    assert set(needed_splits(fine)) == {"train", "validation"}
    check_splits(fine)

    # a hub set (its split table stubbed: no network in tests) with train only
    table = datasets.DatasetDict({"train": datasets.load_dataset("parquet", data_files={"train": str(train)},
                                                                 cache_dir=str(tmp_path / "hf-cache"))["train"]})
    monkeypatch.setattr(data_module, "_load", lambda cfg: table)
    hub = _experiment(tmp_path, "tokenizer.data.path=someone/images", "tokenizer.data.validation_fraction=0.25")
    with pytest.raises(DataError, match="'someone/images' has no test split to offer"):
        check_splits(hub)


def test_missing_validation_for_the_tokenizer_has_no_run_without_it(tmp_path):
    root = _folder(tmp_path / "images", splits=("train", "test"))
    cfg = _experiment(tmp_path, f"tokenizer.data.data_dir={root}", "tokenizer.data.validation_fraction=0.0")
    with pytest.raises(DataError) as err:
        check_splits(cfg)
    message = str(err.value)
    assert message.startswith("this run needs the validation split (tokenizer, encode.splits)")
    assert "raise data.validation_fraction" in message and "run without it" not in message
