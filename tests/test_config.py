"""Configuration: defaults, YAML, dotted overrides, unknown keys and wrong types rejected clearly."""

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from vqgen.core.config import ConfigError, from_dict, load_config, parse_overrides, save_config, to_dict
from vqgen.core.io import atomic_path


@dataclass
class Inner:
    size: int = 4
    rate: float = 0.5
    name: str | None = None
    dims: list[int] = field(default_factory=lambda: [1, 2])

    def validate(self):
        if self.size < 1:
            raise ValueError("size must be >= 1")


@dataclass
class Outer:
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  size: 8\n  name: abc\n")
    cfg = load_config(Outer, path, ["inner.rate=2", "flag=true", "inner.dims=[4, 8]"])
    assert cfg.inner.size == 8 and cfg.inner.name == "abc" and cfg.flag is True
    assert cfg.inner.rate == 2.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.dims == [4, 8]


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"inner\.sise.*allowed keys in inner: dims, name, rate, size"):
        from_dict(Outer, {"inner": {"sise": 3}})


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.size=abc", "inner.size' expects an integer"),
        ("flag=3", "flag' expects true or false"),
        ("inner.dims=5", "inner.dims' expects a list"),
        ("inner.size=0", "size must be >= 1"),
        ("inner", "must look like key=value"),
        ("inner=3", "inner' is a section"),
    ],
)
def test_bad_values_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_save_roundtrip(tmp_path):
    cfg = load_config(Outer, None, ["inner.size=5"])
    save_config(cfg, tmp_path / "out.yaml")
    assert from_dict(Outer, yaml.safe_load((tmp_path / "out.yaml").read_text())) == cfg
    assert to_dict(cfg)["inner"]["size"] == 5


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_a_folder_replaced_atomically_is_never_lost_to_an_interrupt_between_its_two_renames(tmp_path, monkeypatch):
    """A folder cannot be renamed over a non-empty one, so the old one is moved aside first; an interrupt right
    after that move puts it back (no ``.NAME.old-*`` left, nothing lost)."""
    import vqgen.core.io as io_module

    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    real, calls = os.replace, []

    def interrupted_second_rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(io_module.os, "replace", interrupted_second_rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text("new")
    monkeypatch.setattr(io_module.os, "replace", real)
    assert calls[0][0] == "model" and calls[0][1].startswith(".model.old-")  # the interrupt came between the renames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "weights").read_text() == "old"


def test_cleaning_an_owned_folder_puts_back_a_folder_left_aside_and_removes_the_rest(tmp_path):
    """A process killed between the two renames leaves ``.NAME.old-XXXXXXXX`` and no ``NAME``: the cleaning
    before the next run renames it back; one whose NAME exists is a leftover and goes, as do other temporaries."""
    from vqgen.core.files import _clean_temporaries

    (tmp_path / ".model.old-0123abcd").mkdir()
    (tmp_path / ".model.old-0123abcd" / "weights").write_text("only copy")
    (tmp_path / "ema").mkdir()
    (tmp_path / ".ema.old-89abcdef").mkdir()
    (tmp_path / ".x.json.tmp-01234567").write_text("half")
    _clean_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema", "model"]
    assert (tmp_path / "model" / "weights").read_text() == "only copy"
