"""Command line: ``python -m pleas.merge MODEL_A MODEL_B --width W`` (also ``pleas merge``).

A thin layer over :func:`pleas.run`: the flags are generated from
:class:`pleas.config.MergeConfig`'s fields (one source of defaults and help), a ``--config``
file is read into the same fields, flags given on the command line override it.  Any user
error exits with code 2 and one line.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import fields
from typing import Any

from .config import MergeConfig, defaults, read_config_file
from .errors import MergeError, MergeWarning

class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} -h)\n")


def parser() -> argparse.ArgumentParser:
    """Flags from MergeConfig's fields (help and defaults from there)."""
    p = _Parser(
        prog="python -m pleas.merge",
        description="Merge image classifiers of the same architecture with PLeaS "
                    "(permutations + least squares) into one model of the chosen width.")
    p.add_argument("--config", help="YAML/JSON file describing the merge (flags override it)")
    shown = defaults()
    for f in fields(MergeConfig):
        meta, default = f.metadata, shown[f.name]
        help_text = meta["help"] + ("" if default in (None, (), {}, False)
                                    or "default" in meta["help"] else f" (default {default})")
        if f.name == "models":
            p.add_argument("models", nargs="*", default=None, help=help_text)
        elif f.name == "params":
            p.add_argument("--param", dest="params", action="append", default=None,
                           metavar="KEY=VALUE", help=help_text + ", repeatable")
        elif f.name == "eval":
            p.add_argument("--eval", dest="eval", action="store_true", default=None,
                           help=help_text)
            p.add_argument("--no-eval", dest="eval", action="store_false")
        elif meta["kind"] == "bool":
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true",
                           default=None, help=help_text)
        else:
            kind = meta["kind"].rstrip("?")
            typ = {"float": float, "float0": float, "int": int, "int+": int, "int0": int}.get(
                kind, str)
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=typ, default=None,
                           choices=meta["choices"], help=help_text)
    return p


def _parse_params(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings, the values read as YAML scalars (numbers, booleans, strings)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MergeError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise MergeError(f"--param {item!r}: the value is not readable ({err})") from err
    return out


def config_from_args(args: argparse.Namespace) -> MergeConfig:
    """The config file's values, overridden by the flags given on the command line."""
    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items()
             if v is not None and k != "config"}
    if "models" in given and not given["models"]:
        del given["models"]
    if "params" in given:
        given["params"] = {**(values.get("params") or {}), **_parse_params(given["params"])}
    values.update(given)
    if not values.get("models"):
        raise MergeError("missing models: give two models (built-in names or checkpoint files) "
                         "or a --config that lists them")
    return MergeConfig.from_mapping(values, "the options")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def summary(report: dict) -> str:
    w = report["width"]
    names = " + ".join(m["source"] for m in report["models"])
    layout = f"layout {report['layout']}, " if report.get("layout") == "dense" else ""
    return (f"{report['method']} merge of {names}: "
            f"width {w['achieved']:.3f} (requested {w['requested']}), heads {report['heads']}, "
            f"{layout}{report['seconds']['total']:.1f} s")


def format_table(acc: dict[str, dict[str, float | None]]) -> str:
    models = sorted({c for row in acc.values() for c in row if c.startswith("model_")})
    cols = models + ["ensemble", "merged"]
    lines = [f"{'task':<22}" + "".join(f"{c:>10}" for c in cols)]
    for task, row in acc.items():
        cells = "".join(f"{'-' if row[c] is None else f'{row[c]:.2f}':>10}" for c in cols)
        lines.append(f"{task:<22}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a user error (one line on stderr, nothing written), 130 Ctrl-C,
    143 SIGTERM (temp files removed, an earlier output left as it was)."""
    from .output import Terminated, handle_termination
    from .runner import run

    try:
        args = parser().parse_args(argv)
    except SystemExit as stop:  # -h (0) or a bad flag (2, already said in one line)
        return int(stop.code or 0)
    try:
        with handle_termination(), warnings.catch_warnings():
            warnings.simplefilter("ignore", MergeWarning)  # printed below, from the report
            result = run(config_from_args(args))
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: nothing was written", file=sys.stderr)
        return Terminated.exit_code
    except (ValueError, FileNotFoundError) as err:  # MergeError and the loaders' errors
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a permission refused while writing, ...
        print(f"error: cannot write the output: {_one_line(err)}", file=sys.stderr)
        return 2
    if not result.written:  # a torchrun rank other than 0: rank 0 reports
        return 0
    for note in result.report.get("warnings") or []:
        print(f"warning: {note}", file=sys.stderr)
    print(summary(result.report))
    if "accuracy" in result.report:
        print(format_table(result.report["accuracy"]))
    print(f"merged model and report written to {result.out}/")
    return 0
