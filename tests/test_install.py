"""make install and make uninstall, into a temporary DESTDIR.

The staged tree is run where it will live, PREFIX, and nowhere else: as root, in a mount
namespace of its own, the staged top directory (DESTDIR/opt) is mounted over the real one
(/opt), and the program runs there in an empty environment (``env -i``), with no way to
reach this test's interpreter or the repository. The host's /opt is not touched.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from .conftest import WAIT, LoopbackApps, Process

ROOT = Path(__file__).parent.parent
MAKE_TIMEOUT = 600  # seconds: make install builds an environment (pip, maybe the network)
TOPS = ("/opt", "/srv", "/mnt")  # where PREFIX may go: the first without this Python in it
TOP = next(t for t in TOPS if not Path(sys.base_prefix).resolve().is_relative_to(t))
PREFIX = PurePosixPath(TOP) / "udptunnel-test"
ENVDIR = PREFIX / "lib" / "udptunnel"
MANIFEST = ENVDIR / "installed-files"
UNITS = ("udptunnel@.service", "udptunnel@.socket")
CLEAN_PATH = f"{PREFIX}/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Variables of make's that would put files elsewhere than this test says, if exported.
MAKE_VARIABLES = ("BINDIR", "MANDIR", "UNITDIR", "ENVDIR", "VENV")

needs_namespace = pytest.mark.needs("make", "unshare", "mount")


def make(target: str, destdir: Path, *variables: str) -> subprocess.CompletedProcess[str]:
    """``make TARGET DESTDIR=... PREFIX=...`` in this repository, with this test's Python as
    the one that runs make's recipes (the interpreter that must stay as it is)."""
    env = {name: value for name, value in os.environ.items() if name not in MAKE_VARIABLES}
    return subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(ROOT),
            target,
            f"DESTDIR={destdir}",
            f"PREFIX={PREFIX}",
            f"PYTHON={sys.executable}",
            *variables,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=MAKE_TIMEOUT,
        check=False,
    )


def own_lines(stderr: str) -> list[str]:
    """Standard error without make's own report of a failed recipe (``make[1]: ***``
    under make test)."""
    return [line for line in stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\* ", line)]


def installed_packages() -> str:
    """What ``pip freeze`` says of this test's interpreter, with every file of its
    site-packages (without bytecode caches) and its size: any change shows."""
    script = """
import importlib.metadata, os, sysconfig
print(sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()))
for top, dirs, files in sorted(os.walk(sysconfig.get_paths()["purelib"])):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    for name in sorted(files):
        path = os.path.join(top, name)
        print(path, os.lstat(path).st_size)
"""
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=WAIT
    ).stdout


def tree(top: Path) -> set[str]:
    """Every path under ``top``, relative; directories end in /."""
    return {
        str(path.relative_to(top)) + ("/" if path.is_dir() and not path.is_symlink() else "")
        for path in top.rglob("*")
    }


def in_place(destdir: Path, argv: Sequence[str], **env: str) -> list[str]:
    """``argv`` run with the staged tree where it will live, from an empty environment:
    in a mount namespace of its own, DESTDIR/TOP is mounted over TOP."""
    script = 'mount --bind "$1" "$2"; shift 2; exec env -i "$@"'
    settings = [f"{name}={value}" for name, value in {"PATH": CLEAN_PATH, **env}.items()]
    return [
        *("unshare", "--mount", "--propagation", "private", "sh", "-ec", script, "sh"),
        *(f"{destdir}{TOP}", TOP, *settings, *argv),
    ]


def run_in_place(
    destdir: Path, argv: Sequence[str], **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        in_place(destdir, argv, **env),
        cwd="/",
        capture_output=True,
        text=True,
        timeout=WAIT * 3,
        check=False,
    )


@dataclass
class Staged:
    """An installation made by make install under ``destdir``."""

    destdir: Path
    packages_before: str

    def path(self, final: PurePosixPath) -> Path:
        return Path(f"{self.destdir}{final}")


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Staged]:
    destdir = tmp_path_factory.mktemp("stage")
    before = installed_packages()
    result = make("install", destdir)
    assert result.returncode == 0, result.stdout + result.stderr
    yield Staged(destdir, before)
    make("uninstall", destdir)


@pytest.mark.needs("make")
def test_install_leaves_the_interpreter_that_ran_it_as_it_was(staged: Staged) -> None:
    assert installed_packages() == staged.packages_before


@pytest.mark.needs("make")
def test_no_file_of_the_staged_tree_names_destdir(staged: Staged) -> None:
    stage = str(staged.destdir)
    naming = []
    for path in staged.destdir.rglob("*"):
        if path.is_symlink():
            if stage in os.readlink(path):
                naming.append(path)
        elif path.is_file() and stage.encode() in path.read_bytes():
            naming.append(path)
    assert naming == []
    launcher = staged.path(PREFIX / "bin" / "udptunnel")
    assert launcher.read_text().splitlines()[0] == f"#!{ENVDIR}/bin/python -I"
    assert launcher.stat().st_mode & 0o777 == 0o755


@pytest.mark.needs("make")
def test_the_environment_is_its_own(staged: Staged) -> None:
    """Based on the interpreter's installation, not on the environment that ran make; no
    .pth file reaches outside it; pip is gone, and trio and click are there."""
    config = dict(
        line.split(" = ", 1) for line in staged.path(ENVDIR / "pyvenv.cfg").read_text().splitlines()
    )
    assert config["include-system-site-packages"] == "false"
    if sys.prefix != sys.base_prefix:  # make ran in a virtual environment: not this one's
        assert not Path(config["home"]).resolve().is_relative_to(Path(sys.prefix).resolve())
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    site = staged.path(ENVDIR / "lib" / version / "site-packages")
    for pth in site.glob("*.pth"):
        for line in pth.read_text().splitlines():
            assert not line.startswith("/") or line.startswith(f"{ENVDIR}/"), (pth, line)
    names = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"udptunnel", "trio", "click"} <= names
    assert not names & {"pip", "setuptools", "pytest", "hypothesis"}


@pytest.mark.root("a private mount namespace, the staged tree at its final path")
@needs_namespace
def test_the_staged_program_runs_at_its_final_path(staged: Staged, spawn: type[Process]) -> None:
    result = run_in_place(staged.destdir, ["udptunnel", "--version"])
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"udptunnel {importlib.metadata.version('udptunnel')}\n",
        "",
    )
    # Every module from the environment; nothing from this test's interpreter or the
    # repository on the path.
    probe = (
        "import sys, click, trio, udptunnel; "
        "print(click.__file__, trio.__file__, udptunnel.__file__, *sys.path, sep='\\n')"
    )
    result = run_in_place(staged.destdir, [f"{ENVDIR}/bin/python", "-I", "-c", probe])
    assert result.returncode == 0, result.stderr
    modules, path = result.stdout.splitlines()[:3], result.stdout.splitlines()[3:]
    assert all(m.startswith(f"{ENVDIR}/lib/") for m in modules), modules
    assert not {sysconfig.get_paths()["purelib"], str(ROOT)} & set(path), path
    # A datagram each way through a server and a client of the installed program.
    apps = LoopbackApps()
    try:
        a, b = apps.app_a.getsockname()[1], apps.app_b.getsockname()[1]
        ends = in_place(staged.destdir, [f"{PREFIX}/bin/udptunnel", "-v", "--udp-bind"])
        server = spawn(
            [f"127.0.0.1/{apps.a_in}", "-s", str(apps.tcp), f"127.0.0.1/{a}"], prefix=ends
        )
        server.wait_for(r"Listening for TCP connections")
        client = spawn(
            [f"127.0.0.1/{apps.b_in}", "-c", f"127.0.0.1/{apps.tcp}", f"127.0.0.1/{b}"],
            prefix=ends,
        )
        client.wait_for(r"Connected TCP to")
        server.wait_for(r"TCP connection from")
        apps.crosses(b"through the installed udptunnel")
        client.signal()
        assert client.wait() == 0
        assert server.wait() == 0
    finally:
        apps.close()


@pytest.mark.needs("make", "man", "groff")
def test_the_installed_manual_page_renders_without_warnings(staged: Staged) -> None:
    page = staged.path(PREFIX / "share" / "man" / "man1" / "udptunnel.1")
    assert page.read_bytes() == (ROOT / "man" / "udptunnel.1").read_bytes()
    env = {"PATH": os.environ.get("PATH", os.defpath), "MANPAGER": "cat", "MANWIDTH": "80"}
    result = subprocess.run(
        ["man", "--warnings", "-l", str(page)],
        env={**env, "LC_ALL": "C.UTF-8"},
        capture_output=True,
        text=True,
        check=False,
        timeout=WAIT,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert "udptunnel - tunnel UDP datagrams both ways" in " ".join(result.stdout.split())


@pytest.mark.root("a private mount namespace, the staged tree at its final path")
@needs_namespace
@pytest.mark.needs("man")
def test_man_finds_the_installed_page_by_the_programs_path(staged: Staged) -> None:
    """man-db looks beside each PATH directory (BINDIR/../share/man): no MANPATH needed."""
    result = run_in_place(staged.destdir, ["man", "-w", "udptunnel"])
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"{PREFIX}/share/man/man1/udptunnel.1\n",
        "",
    )


@pytest.mark.root("a private mount namespace, the staged tree at its final path")
@needs_namespace
@pytest.mark.needs("systemd-analyze")
def test_the_installed_units_verify_cleanly(staged: Staged) -> None:
    """With the tree in place, systemd-analyze checks that ExecStart's program exists and
    that the Documentation= page is found; it prints any complaint and exits 0 anyway."""
    units = [PREFIX / "lib" / "systemd" / "system" / name for name in UNITS]
    service = staged.path(units[0]).read_text()
    assert f"\nExecStart={PREFIX}/bin/udptunnel\n" in service
    result = run_in_place(staged.destdir, ["systemd-analyze", "verify", *map(str, units)])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.needs("make")
def test_uninstall_removes_exactly_what_install_put_there(tmp_path: Path) -> None:
    """A page of another program in the same man1 directory survives, with the directories
    that held it before; every other directory install made goes."""
    destdir = tmp_path / "stage"
    other = Path(f"{destdir}{PREFIX}/share/man/man1/other.1")
    other.parent.mkdir(parents=True)
    other.write_text(".TH OTHER 1\n")
    before_install, packages = tree(destdir), installed_packages()
    result = make("install", destdir)
    assert result.returncode == 0, result.stdout + result.stderr
    made = tree(destdir) - before_install
    listed = {
        line.split(" ", 1)[1].removeprefix("/") + ("/" if line.startswith("dir ") else "")
        for line in Path(f"{destdir}{MANIFEST}").read_text().splitlines()
        if line.startswith(("file ", "dir "))
    }
    assert listed == made
    result = make("uninstall", destdir)
    assert (result.returncode, own_lines(result.stderr)) == (0, [])
    assert tree(destdir) == before_install
    assert installed_packages() == packages


NOT_OURS = (
    "refusing to overwrite {destdir}{planted}: make install did not put it there (Debian's "
    "udptunnel?); choose another PREFIX or BINDIR, or remove it first"
)


@pytest.mark.needs("make")
@pytest.mark.parametrize(
    ("target", "planted", "prefix", "message"),
    [
        ("install", "/usr/bin/udptunnel", "/usr", NOT_OURS),  # Debian's original
        ("install", f"{PREFIX}/share/man/man1/udptunnel.1", PREFIX, NOT_OURS),
        ("install", f"{PREFIX}/lib/systemd/system/udptunnel@.service", PREFIX, NOT_OURS),
        (
            "install",
            f"{ENVDIR}/bin/python",
            PREFIX,
            f"refusing to replace {{destdir}}{ENVDIR}: it holds no installed-files, so make "
            "install did not make it; remove it or choose another PREFIX or ENVDIR",
        ),
        (
            "uninstall",
            f"{PREFIX}/bin/udptunnel",
            PREFIX,
            f"nothing to uninstall: no {{destdir}}{MANIFEST} (make install writes it; give the "
            "same PREFIX or ENVDIR, and DESTDIR)",
        ),
    ],
)
def test_what_is_not_ours_is_left_alone_with_one_line(
    tmp_path: Path, target: str, planted: str, prefix: str, message: str
) -> None:
    """A file make install did not put there stops it (or make uninstall without its list)
    before anything is done: one line, a failed make, the tree as it was."""
    foreign = Path(f"{tmp_path}{planted}")
    foreign.parent.mkdir(parents=True)
    foreign.write_text("#!/bin/sh\necho 'not ours'\n")
    before = tree(tmp_path)
    result = make(target, tmp_path, f"PREFIX={prefix}")
    assert result.returncode != 0
    expected = f"udptunnel {target}: " + message.format(destdir=tmp_path, planted=planted)
    assert own_lines(result.stderr) == [expected]
    assert tree(tmp_path) == before
    assert foreign.read_text() == "#!/bin/sh\necho 'not ours'\n"
