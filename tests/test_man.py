"""The man page: lint-clean troff, every option of ``--help`` in it, and found by ``man``.

``man udptunnel`` finds the page because hatchling's shared-data installs ``man/udptunnel.1``
into ``<venv>/share/man/man1`` and man-db searches ``../share/man`` beside each PATH entry.
That copy is refreshed only on reinstall: after editing the page, run ``make venv``.
"""

from __future__ import annotations

import ast
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


def help_option_names(help_text: str) -> list[list[str]]:
    """The names of each option of ``--help``: ``[["-s", "--server"], ["--udp-bind"], ...]``."""
    lines = help_text.splitlines()
    start = lines.index(_OPTIONS_HEADING) + 1
    return [
        match.group(1).split(", ") for line in lines[start:] if (match := _OPTION_LINE.match(line))
    ]


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


def synopsis_options(troff: str) -> set[str]:
    """The option names in the SYNOPSIS section."""
    text = plain_text(section(troff, "SYNOPSIS"))
    return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text))


def test_the_synopsis_shows_every_option() -> None:
    """Each option of ``--help``, by one of its names (``-h`` for ``-h, --help``)."""
    result = _run([UDPTUNNEL, "--help"])
    assert result.returncode == 0, result.stderr
    shown = synopsis_options(SOURCE.read_text())
    missing = [names for names in help_option_names(result.stdout) if not set(names) & shown]
    assert missing == []


def test_the_page_carries_the_programs_version() -> None:
    result = _run([UDPTUNNEL, "--version"])
    assert result.returncode == 0, result.stderr
    (title,) = re.findall(r"^\.TH .*$", SOURCE.read_text(), re.MULTILINE)
    assert f'"{result.stdout.strip()}"' in title  # "udptunnel 2.0.0", as --version says


# Every message the program logs, in DIAGNOSTICS --------------------------------------------

PACKAGE = SOURCE.parent.parent / "udptunnel"
_LOG_LEVELS = {"debug", "info", "warning", "error", "critical", "log"}
_PLACEHOLDER = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdifgr%]")
# Formats that are only a placeholder: their text is a message documented with its cause.
_WHOLE_MESSAGE = re.compile(r"(%s)+")


def log_formats(package: Path = PACKAGE) -> dict[str, str]:
    """Every constant format string passed to ``log.LEVEL(...)`` in the package: format to
    where it is."""
    formats = {}
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in _LOG_LEVELS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
            ):
                # log.info(FORMAT, ...), or log.log(LEVEL, FORMAT, ...)
                args = node.args[1:] if node.func.attr == "log" else node.args
                if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                    formats[args[0].value] = f"{path.name}:{node.lineno}"
    return formats


def diagnostics_lines(troff: str) -> list[str]:
    """The lines of the DIAGNOSTICS section's examples, placeholders written as words."""
    lines, inside = [], False
    for line in section(troff, "DIAGNOSTICS").splitlines():
        if line in (".EX", ".EE"):
            inside = line == ".EX"
        elif inside:
            text = plain_text(line)
            for escape, character in (("\\e", "\\"), ("\\(aq", "'")):
                text = text.replace(escape, character)
            lines.append(text.strip())
    return lines


def as_pattern(fmt: str) -> re.Pattern[str]:
    """A %-format as a regular expression: each placeholder stands for any text."""
    pieces = _PLACEHOLDER.split(fmt)
    return re.compile(".*".join(re.escape(piece) for piece in pieces))


def undocumented_formats(formats: dict[str, str], lines: list[str]) -> list[str]:
    return [
        f"{where}: {fmt!r}"
        for fmt, where in formats.items()
        if not _WHOLE_MESSAGE.fullmatch(fmt)
        and not any(as_pattern(fmt).fullmatch(line) for line in lines)
    ]


def test_every_message_the_program_logs_is_in_diagnostics() -> None:
    formats = log_formats()
    assert len(formats) > 30  # the reading found the calls at all
    assert undocumented_formats(formats, diagnostics_lines(SOURCE.read_text())) == []


def test_an_undocumented_message_is_noticed() -> None:
    formats = {"Flow from %s: connected": "a:1", "Tunnel closed. %s": "b:2", "Gone %d": "c:3"}
    troff = ".SH DIAGNOSTICS\n.EX\nFlow from \\fIADDR\\fP: connected\nTunnel closed. X\n.EE\n"
    assert undocumented_formats(formats, diagnostics_lines(troff)) == ["c:3: 'Gone %d'"]
