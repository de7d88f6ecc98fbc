"""Configuration: defaults, YAML, dotted overrides, unknown keys and wrong types rejected clearly."""

from dataclasses import dataclass, field

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
