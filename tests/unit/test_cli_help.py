"""Every flag of every ``paramserver`` command says what it does and what it is when not given."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from paramserver.cli import _parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser, **sub.choices}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.option_strings and not isinstance(a, (argparse._HelpAction,
                                                      argparse._VersionAction))]


def test_every_option_has_help_and_shows_its_default():
    missing = []
    for command, parser in _subcommands().items():
        for action in _options(parser):
            flag = f"paramserver {command} {action.option_strings[-1]}".replace("  ", " ")
            text = action.help or ""
            if not text or text == argparse.SUPPRESS:
                missing.append(f"{flag}: no help")
                continue
            # A switch (store_true) is off unless given; a required option has no default.
            if action.nargs == 0 or action.required:
                continue
            shown = "%(default" in text or "default" in text.lower()
            if not shown:
                missing.append(f"{flag}: help does not show the default ({action.default!r})")
            elif action.default not in (None, "", False) and "%(default" not in text:
                # A written default must be the real one (so it cannot go stale silently).
                written = str(action.default)
                variants = {written, written.removesuffix(".0"), f"{action.default:g}"
                            if isinstance(action.default, float) else written}
                if not any(v in text for v in variants):
                    missing.append(f"{flag}: help states a default that is not "
                                   f"{action.default!r}: {text!r}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("command", sorted(set(_subcommands()) - {""}))
def test_help_of_every_command_prints_every_flag_with_its_default(command):
    out = subprocess.run([sys.executable, "-m", "paramserver", command, "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for action in _options(_subcommands()[command]):
        assert action.option_strings[-1] in text, (command, action.option_strings)
    if command == "launch":
        for flag, default in (("--num-servers", "1"), ("--num-workers", "1"),
                              ("--startup-timeout", "60")):
            assert flag in text and f"default {default}" in text, (flag, text)
    if command == "server":
        for flag, default in (("--threads", "16"), ("--timeout", "30")):
            assert f"default {default}" in text, (flag, text)
