"""The man page: lint-clean troff, every option of ``--help`` in it, and found by ``man``.

``man udptunnel`` finds the page because hatchling's shared-data installs ``man/udptunnel.1``
into ``<venv>/share/man/man1`` and man-db searches ``../share/man`` beside each PATH entry.
That copy is refreshed only on reinstall: after editing the page, run ``make venv``.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import BIN, UDPTUNNEL

SOURCE = Path(__file__).resolve().parent.parent / "man" / "udptunnel.1"
INSTALLED = BIN.parent / "share" / "man" / "man1" / "udptunnel.1"
OURS_ONLY = "--udp-bind"  # in our page and not in the page of Debian's original udptunnel
TIMEOUT = 30.0  # seconds: formatting one page takes well under one

needs_groff = pytest.mark.needs("groff")  # conftest: skip without, fail in strict mode
needs_man = pytest.mark.needs("man", "groff")

_OPTIONS_HEADING = "Options:"
_OPTION_LINE = re.compile(r"^ {2}(-[\w-]+(?:, -[\w-]+)*)")  # "  -s, --server METAVAR  help"
_SECTION = re.compile(r"^\.SH (.*)$", re.MULTILINE)
_FONT = re.compile(r"\\f(?:\[[^]]*\]|\(..|.)")  # \fB, \fI, \fP, \f(CW, \f[CR]


def help_options(help_text: str) -> list[str]:
    """Every option name (``-s``, ``--server``, ...) in the Options section of ``--help``."""
    lines = help_text.splitlines()
    start = lines.index(_OPTIONS_HEADING) + 1
    options = []
    for line in lines[start:]:
        if not line.strip():
            break  # the section ends at its first blank line; the epilog follows
        if match := _OPTION_LINE.match(line):
            options.extend(match.group(1).split(", "))
    return options


def plain_text(troff: str) -> str:
    """The page's source with the escapes that can sit inside an option name removed."""
    text = _FONT.sub("", troff)
    for escape, character in (("\\-", "-"), ("\\%", ""), ("\\&", ""), ("\\:", "")):
        text = text.replace(escape, character)
    return text


def section(troff: str, name: str) -> str:
    """The source of one ``.SH`` section, up to the next one."""
    headings = list(_SECTION.finditer(troff))
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        if heading.group(1).strip('"') == name:
            return troff[heading.end() : following.start() if following else len(troff)]
    raise AssertionError(f"no .SH {name} in {SOURCE}")


def undocumented(options: list[str], troff: str) -> list[str]:
    """The options that do not appear, as whole words, in the OPTIONS section."""
    text = plain_text(section(troff, "OPTIONS"))
    return [
        option
        for option in options
        if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text)
    ]


def man_environment() -> dict[str, str]:
    """The environment of a user whose PATH starts with this environment's bin."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"MANPATH", "MANOPT", "MANSECT", "MANROFFOPT", "MAN_KEEP_FORMATTING"}
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        MANPAGER="cat",
        PAGER="cat",
        MANWIDTH="80",
        LC_ALL="C.UTF-8",
    )
    return env


def _run(
    argv: list[str | Path], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )


@needs_groff
def test_page_is_lint_clean() -> None:
    """groff exits 0 even on warnings: what matters is that it prints nothing."""
    result = _run(["groff", "-man", "-ww", "-z", SOURCE])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_help_lists_the_options_this_test_expects() -> None:
    """A guard for the parser below: it must find the options, not an empty list."""
    result = _run([UDPTUNNEL, "--help"])
    assert result.returncode == 0, result.stderr
    options = help_options(result.stdout)
    assert {"-s", "--server", "-c", "--client", "--udp-bind", "-h", "--help"} <= set(options)


def test_every_help_option_is_in_the_page() -> None:
    result = _run([UDPTUNNEL, "--help"])
    assert result.returncode == 0, result.stderr
    options = help_options(result.stdout)
    assert options
    assert undocumented(options, SOURCE.read_text()) == []


def test_a_missing_option_is_noticed() -> None:
    """The comparison is by whole option name, so ``-s`` is not found inside ``--server``."""
    troff = '.SH OPTIONS\n.BR \\-\\-server " \\fIPORT\\fP"\n.SH BUGS\n\\-s is here, not above\n'
    assert undocumented(["-s", "--server", "--no-such-option"], troff) == [
        "-s",
        "--no-such-option",
    ]


def test_installed_page_is_this_page() -> None:
    assert INSTALLED.is_file(), f"{INSTALLED} is missing: run 'make venv'"
    assert INSTALLED.read_bytes() == SOURCE.read_bytes(), (
        f"{INSTALLED} is older than {SOURCE}: run 'make venv' to reinstall it"
    )


@needs_man
def test_man_finds_the_page_in_the_environment() -> None:
    result = _run(["man", "-w", "udptunnel"], env=man_environment())
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == INSTALLED.resolve()


@needs_man
def test_man_shows_our_page() -> None:
    """Not the page of Debian's original, which may be installed under the same name."""
    result = _run(["man", "udptunnel"], env=man_environment())
    assert result.returncode == 0, result.stderr
    text = re.sub(r".\x08", "", result.stdout)  # overstrike bold and underline, if any
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).replace("\u2010", "-").replace("\u2212", "-")
    assert OURS_ONLY in text
    assert "UDPTUNNEL(1)" in text
