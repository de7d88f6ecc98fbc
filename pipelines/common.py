"""What every command shares: parsing a config class with ``key=value`` overrides, and the one wrapper that
turns a user's mistake into one line and exit code 2. The training engine is :mod:`vqgen.core.trainer`."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import types
import typing
from typing import Any, Callable, Sequence

from vqgen.core.config import ConfigError, load_config
from vqgen.core.errors import UserError, one_line, warn  # noqa: F401  (warn: re-exported for the commands)
from vqgen.core import progress
from vqgen.core.diskspace import os_failure_message
from vqgen.core.distributed import shutdown
from vqgen.core.files import ensure_folder as check_output_dir  # noqa: F401  (re-exported for the commands)
from vqgen.core.locks import is_main_launch_process
from vqgen.core.trainer import show_progress, use_cpu_processes  # noqa: F401  (re-exported for the commands)


FLAG_TYPES = (int, float, str, bool)


def _flag_type(tp: Any) -> Any:
    """The scalar or list type of a config field that gets a generated flag (None: no flag, e.g. a section)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(tp) if t is not type(None)]
        return _flag_type(options[0]) if len(options) == 1 else None
    if origin is list:
        return list
    return tp if tp in FLAG_TYPES else None


def config_flags(parser: argparse.ArgumentParser, config_cls: type) -> list[tuple[str, str, Any]]:
    """Add ``--field-name VALUE`` for every scalar or list field of ``config_cls`` (``--x`` / ``--no-x`` for
    booleans, and the class's ``cli_aliases``); returns (dest, field, type) of each. A flag is a ``key=value``
    override by another spelling, so the config class stays the one description of a command's settings."""
    hints = typing.get_type_hints(config_cls)
    added = []
    for f in dataclasses.fields(config_cls):
        kind = _flag_type(hints[f.name])
        if kind is None or f.name == "output_dir":
            continue
        flag, dest = "--" + f.name.replace("_", "-"), f"cfg_{f.name}"
        if kind is bool:
            group = parser.add_mutually_exclusive_group()
            group.add_argument(flag, dest=dest, action="store_const", const=True, default=None,
                               help=f"set {f.name} to true")
            group.add_argument("--no-" + f.name.replace("_", "-"), dest=dest, action="store_const", const=False,
                               help=f"set {f.name} to false")
        else:
            parser.add_argument(flag, dest=dest, default=None, metavar=f.name.upper(),
                                help=f"{f.name} (a key=value override by another spelling)")
        added.append((dest, f.name, kind))
    for alias, (name, value) in getattr(config_cls, "cli_aliases", {}).items():
        parser.add_argument(alias, dest=f"cfg_{name}", action="store_const", const=value, default=None,
                            help=f"set {name} to {json.dumps(value)}")
    return added


def flag_overrides(args: argparse.Namespace, flags: list[tuple[str, str, Any]]) -> list[str]:
    """The ``key=value`` overrides the given flags stand for (a list flag takes ``1,2,3`` or ``[1, 2, 3]``)."""
    out = []
    for dest, name, kind in flags:
        value = getattr(args, dest)
        if value is None:
            continue
        if kind is bool:
            out.append(f"{name}={json.dumps(value)}")
        elif kind is list and not str(value).lstrip().startswith("["):
            out.append(f"{name}=[{value}]")
        else:
            out.append(f"{name}={value}")
    return out


def parse_cli(config_cls: type, argv: Sequence[str] | None, description: str,
              extra: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[Any, argparse.Namespace]:
    """A command's settings, one way: ``--config FILE``, then flags generated from ``config_cls`` (see
    :func:`config_flags`), then ``key=value`` overrides, later winning; ``--output-dir DIR`` where the class has an
    ``output_dir``. ``extra(parser)`` adds the command's own arguments (input folders). Returns (config, args).

    A bad config raises ``ConfigError`` (``entry_point`` turns it into one line and exit code 2).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (fields not given keep their defaults)")
    has_output = any(f.name == "output_dir" for f in dataclasses.fields(config_cls))
    if has_output:
        parser.add_argument("--output-dir", help="where the results go (overrides the config's output_dir)")
    if extra is not None:
        extra(parser)
    flags = config_flags(parser, config_cls)
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    overrides = flag_overrides(args, flags) + list(args.overrides)
    if has_output and args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    try:
        return load_config(config_cls, args.config, overrides), args
    except ConfigError as err:  # name the flag the user typed, where the key came from one
        given = [(name, "--" + name.replace("_", "-")) for dest, name, _ in flags if getattr(args, dest) is not None]
        used = [flag for name, flag in given if f"'{name}" in str(err) or f"{name}=" in str(err)]
        raise ConfigError(f"{used[0]}: {err}" if used else str(err)) from None


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug``: show the full traceback of a known failure instead of its one-line message."""
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks instead of one-line errors (also: VQGEN_DEBUG=1)")


def entry_point(body: Callable | None = None, *, known: tuple[type[BaseException], ...] = ()):
    """Decorate a command's ``main(argv)``: known failures become one line on stderr and exit code 2.

    Known failures are ``UserError`` (bad config, missing or corrupt file, unusable data, a stale stage,
    a non-finite loss, a full disk, ...), the classes in ``known``, and failures of the machine met outside
    vqgen's guarded writes (a full disk, an over-long path: ``vqgen.core.diskspace.os_failure_message``). An
    interrupt (Ctrl-C, SIGINT) prints ``interrupted at step N ...; rerun the same command to resume`` (the step a
    trainer reported to ``vqgen.core.progress``) and exits with code 130. With ``--debug`` among the arguments
    (or ``VQGEN_DEBUG=1``) they keep their traceback; any other exception is a bug and always does.
    Every entry point uses this one wrapper.
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def main(argv: Sequence[str] | None = None):
            args = list(sys.argv[1:] if argv is None else argv)
            debug = "--debug" in args or os.environ.get("VQGEN_DEBUG", "") not in ("", "0")
            progress.clear()  # an earlier command in this process reports nothing for this one
            try:
                result = fn(args)
                shutdown()  # under accelerate launch: the process group ends before the process does
                return result
            except (UserError, *known) as err:
                if debug:
                    raise
                _close_progress_bars()  # the message starts a line of its own, not after a bar's text
                print(f"error: {one_line(err)}", file=sys.stderr)
                raise SystemExit(2) from None
            except KeyboardInterrupt:  # Ctrl-C / SIGINT: every write is atomic, so nothing half-written is left
                if debug:
                    raise
                _close_progress_bars()
                if is_main_launch_process():
                    print(progress.interrupt_message(), file=sys.stderr)
                raise SystemExit(130) from None
            except Exception as err:  # a full disk or an over-long path, met outside vqgen's guarded writes
                message = os_failure_message(err)
                if message is None or debug:
                    raise
                _close_progress_bars()
                print(f"error: {one_line(message)}", file=sys.stderr)
                raise SystemExit(2) from None

        return main

    return wrap(body) if body is not None else wrap


def _close_progress_bars() -> None:
    """Close every open tqdm bar (each ends its line, or vanishes when disabled)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def die(message: str) -> None:
    """Exit with a one-line error (for user errors caught in ``main``)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
