"""``make install`` and ``make uninstall``: a self-contained udptunnel for an operator.

``install`` puts in place, under DESTDIR (empty for the live system):

    ENVDIR (PREFIX/lib/udptunnel)      a virtual environment: udptunnel and its dependencies
    BINDIR/udptunnel                   a launcher that runs ENVDIR's interpreter, isolated
    MANDIR/man1/udptunnel.1            the manual page
    UNITDIR/udptunnel@.service, .socket  the systemd units, ExecStart= on BINDIR/udptunnel

and lists every file and directory it made in ENVDIR/installed-files, from which
``uninstall`` removes exactly those. The environment is based on the interpreter that runs
this script and is built by its own pip: that interpreter is never changed. Every path
written into a file is the final one, without DESTDIR, so a staged tree runs once it is
copied to /. A file already there is replaced only if the last installation's list has it,
or if it already holds what would be written: Debian's /usr/bin/udptunnel (PREFIX=/usr) is
refused. A new environment is built beside the old one before anything is replaced, so a
failed build leaves the installation as it was.

``units`` writes the systemd units alone (``make install-units``), recorded nowhere.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import importlib.metadata
import os
import py_compile
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

ROOT = PurePosixPath("/")
SOURCE = Path(__file__).resolve().parent.parent  # the repository: what pip installs
MANIFEST = "installed-files"  # in ENVDIR; what make install made, as final paths
MANIFEST_HEADER = """\
# Made by udptunnel's make install: a line for each file (or link) and each directory it
# made, as final paths (without DESTDIR); make uninstall removes exactly these. Directories
# outside the environment made by a staged install (DESTDIR given) are removed, if empty,
# only by an uninstall with a DESTDIR: once a staged tree is copied to /, they belong to
# whoever copied it.
"""
UNITS = ("udptunnel@.service", "udptunnel@.socket")
UMASK = 0o022  # all of it readable by the service's user, whatever the operator's umask
PROGRAM_MODE, DATA_MODE, DIR_MODE = 0o755, 0o644, 0o755
NOT_THE_ENVIRONMENTS = ("pip", "setuptools")  # ensurepip's; nothing runs them afterwards
# Variables that would make pip install somewhere else than the environment it runs in.
PIP_ELSEWHERE = ("PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_USER", "PIP_EDITABLE")
# Hidden from udptunnel@.service by ProtectHome=yes and PrivateTmp=yes.
HIDDEN_FROM_THE_SERVICE = ("/root", "/home", "/run/user", "/tmp", "/var/tmp")

LAUNCHER = """\
#!{envdir}/bin/python -I
# udptunnel, put here by its make install: it runs in the environment {envdir},
# whose interpreter starts isolated (-I: no PYTHONPATH, no user site-packages, not this
# directory). make uninstall removes it all, as {envdir}/{manifest} lists.
import sys

from udptunnel.launch import main

sys.exit(main())
"""


class Refusal(Exception):
    """Why nothing was done: one line for the operator."""


@dataclass(frozen=True)
class Layout:
    """Where each part goes: final paths, and DESTDIR in front of them while staging."""

    destdir: str
    envdir: PurePosixPath = ROOT
    bindir: PurePosixPath = ROOT
    mandir: PurePosixPath = ROOT
    unitdir: PurePosixPath = ROOT

    def staged(self, final: PurePosixPath) -> Path:
        """Where a final path is written now: under DESTDIR, if there is one."""
        return Path(self.destdir + str(final)) if self.destdir else Path(final)

    @property
    def manifest(self) -> PurePosixPath:
        return self.envdir / MANIFEST


@dataclass
class Manifest:
    """What one make install made: final paths, and whether under a DESTDIR."""

    staged: bool  # made under a DESTDIR, to be copied elsewhere
    files: set[PurePosixPath] = field(default_factory=set)  # and symbolic links
    dirs: set[PurePosixPath] = field(default_factory=set)

    def text(self) -> str:
        lines = [f"file {f}" for f in sorted(self.files)] + [f"dir {d}" for d in sorted(self.dirs)]
        return MANIFEST_HEADER + "".join(
            f"{line}\n" for line in [f"staged {'yes' if self.staged else 'no'}", *lines]
        )


def read_manifest(layout: Layout) -> Manifest | None:
    """The last installation's list, or None if there is none.

    Raises:
        Refusal: a line is not what make install writes (the list is not ours to act on).
    """
    path = layout.staged(layout.manifest)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    manifest = Manifest(staged=False)
    for number, line in enumerate(text.splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        kind, _, value = line.partition(" ")
        entry = PurePosixPath(value)
        if kind == "staged" and value in ("yes", "no"):
            manifest.staged = value == "yes"
        elif kind in ("file", "dir") and value == os.path.normpath(value) and entry.is_absolute():
            (manifest.files if kind == "file" else manifest.dirs).add(entry)
        else:
            raise Refusal(f"{path}, line {number}: not what make install writes; nothing done")
    return manifest


def planned_files(layout: Layout) -> dict[PurePosixPath, tuple[bytes, int]]:
    """What goes outside the environment: final path to (content, mode)."""
    launcher = LAUNCHER.format(envdir=layout.envdir, manifest=MANIFEST)
    files = {
        layout.bindir / "udptunnel": (launcher.encode(), PROGRAM_MODE),
        layout.mandir / "man1" / "udptunnel.1": (
            (SOURCE / "man" / "udptunnel.1").read_bytes(),
            DATA_MODE,
        ),
    }
    files.update(unit_files(layout))
    return files


def unit_files(layout: Layout) -> dict[PurePosixPath, tuple[bytes, int]]:
    """The units of contrib/systemd with the program's directory, BINDIR, filled in."""
    return {
        layout.unitdir / name: (
            (SOURCE / "contrib" / "systemd" / name)
            .read_text()
            .replace("@BINDIR@", str(layout.bindir))
            .encode(),
            DATA_MODE,
        )
        for name in UNITS
    }


def holds(path: Path, content: bytes) -> bool:
    """Whether ``path`` is a regular file with exactly ``content``."""
    return path.is_file() and not path.is_symlink() and path.read_bytes() == content


def walk(root: Path) -> Iterator[tuple[PurePosixPath, bool]]:
    """Every entry under ``root``, relative, and whether it is a directory (not a link)."""
    for top, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(top, name)
            yield PurePosixPath(path.relative_to(root)), path.is_dir() and not path.is_symlink()


def check_nothing_foreign(layout: Layout, old: Manifest | None) -> None:
    """Refuse, before anything is done, to replace what an earlier make install did not make.

    Raises:
        Refusal: a file in the way is someone else's, or ENVDIR holds one.
    """
    env = layout.staged(layout.envdir)
    ours = old or Manifest(staged=bool(layout.destdir))
    if os.path.lexists(env):
        if old is None:
            raise Refusal(
                f"refusing to replace {env}: it holds no {MANIFEST}, so make install did not "
                "make it; remove it or choose another PREFIX or ENVDIR"
            )
        for relative, is_dir in walk(env):
            final = layout.envdir / relative
            if final not in (ours.dirs if is_dir else ours.files):
                raise Refusal(
                    f"refusing to replace {env}: make install did not put "
                    f"{layout.staged(final)} there; remove it first"
                )
    for final, (content, _) in planned_files(layout).items():
        path = layout.staged(final)
        if os.path.lexists(path) and final not in ours.files and not holds(path, content):
            raise Refusal(
                f"refusing to overwrite {path}: make install did not put it there (Debian's "
                "udptunnel?); choose another PREFIX or BINDIR, or remove it first"
            )


def warn_if_the_service_cannot_run_this_interpreter() -> None:
    """The environment runs on this interpreter's installation: say so if the unit's
    sandbox hides it, or other users cannot reach it."""
    base = Path(sys.base_prefix).resolve()

    def open_to_all(directory: Path) -> bool:
        try:
            return bool(directory.stat().st_mode & stat.S_IXOTH)
        except OSError:
            return False

    hidden = any(base.is_relative_to(top) for top in HIDDEN_FROM_THE_SERVICE)
    if hidden or not all(map(open_to_all, [base, *base.parents])):
        print(
            f"udptunnel install: warning: udptunnel@.service cannot run the Python in {base} "
            "(hidden by its sandbox or closed to other users); for the service, make install "
            "PYTHON=/usr/bin/python3 or another interpreter every user can run",
            file=sys.stderr,
        )


class Installation:
    """One run of make install: the directories it made, to undo them if it fails."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.made: set[PurePosixPath] = set()

    def make_dirs(self, final: PurePosixPath) -> None:
        """Make ``final`` and its missing parents, remembering each one made."""
        self.layout.staged(ROOT).mkdir(parents=True, exist_ok=True)
        for directory in [*reversed(final.parents), final]:
            path = self.layout.staged(directory)
            if not path.is_dir():
                path.mkdir(DIR_MODE)
                self.made.add(directory)

    def undo_dirs(self) -> None:
        for directory in sorted(self.made, key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: something else is there now
                self.layout.staged(directory).rmdir()

    def write(self, final: PurePosixPath, content: bytes, mode: int) -> None:
        """Write a file atomically: a reader sees the old one or the new, never a part."""
        self.make_dirs(final.parent)
        path = self.layout.staged(final)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(content)
            os.chmod(temporary, mode)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise


def build_environment(staged: Path, final: PurePosixPath) -> None:
    """Make a virtual environment at ``staged`` that will run at ``final``, with udptunnel
    and its run-time dependencies, installed by the environment's own pip.

    Raises:
        subprocess.CalledProcessError: venv or pip failed (they said why).
    """
    subprocess.run([sys.executable, "-m", "venv", "--prompt", "udptunnel", str(staged)], check=True)
    python = [str(staged / "bin" / "python"), "-I", "-B"]  # no PYTHONPATH, no .pyc written
    pip_env = {name: value for name, value in os.environ.items() if name not in PIP_ELSEWHERE}
    pip = [*python, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [*pip, "install", "--no-compile", "--no-warn-script-location", str(SOURCE)],
        check=True,
        env=pip_env,
    )
    site = staged / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    present = {
        dist.metadata["Name"].lower() for dist in importlib.metadata.distributions(path=[str(site)])
    }
    if extra := [name for name in NOT_THE_ENVIRONMENTS if name in present]:
        subprocess.run([*pip, "uninstall", "--yes", *extra], check=True, env=pip_env)
    # venv and pip wrote the staged path into the activation scripts, the console script's
    # first line and pyvenv.cfg; nothing else holds it.
    for variant in {str(staged), os.path.realpath(staged)}:
        for path in [staged / "pyvenv.cfg", *(staged / "bin").iterdir()]:
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                if variant.encode() in data:
                    path.write_bytes(data.replace(variant.encode(), str(final).encode()))
    # Compiled here, with the final paths in them: the service may not write them (its
    # ProtectSystem=strict), and hashes keep them valid whatever a copy does to mtimes.
    compileall.compile_dir(
        str(staged / "lib"),
        ddir=str(final / "lib"),
        quiet=1,
        workers=0,
        invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
    )
    staged.chmod(DIR_MODE)  # mkdtemp's directory is private


def remove(layout: Layout, files: set[PurePosixPath], dirs: set[PurePosixPath]) -> list[Path]:
    """Remove ``files``, then those of ``dirs`` that are then empty, deepest first; return
    the directories kept because something else is in them."""
    # The list itself last, so that a failure on the way leaves it for another try.
    for final in sorted(files, key=lambda f: f == layout.manifest):
        path = layout.staged(final)
        if os.path.lexists(path):
            path.unlink()
    kept = []
    for final in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        path = layout.staged(final)
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            kept.append(path)
    return kept


def ours_to_remove(layout: Layout, manifest: Manifest) -> set[PurePosixPath]:
    """The directories of ``manifest`` that this run may remove: the environment's, and the
    others only where they were made: staged and unstaged installations do not mix."""
    if manifest.staged == bool(layout.destdir):
        return manifest.dirs
    return {d for d in manifest.dirs if d.is_relative_to(layout.envdir)}


def install(layout: Layout) -> None:
    """Build the environment, then replace the last installation with this one.

    Raises:
        Refusal: something in the way is not ours; nothing was done.
        subprocess.CalledProcessError: building the environment failed; nothing was changed.
    """
    old = read_manifest(layout)
    check_nothing_foreign(layout, old)
    warn_if_the_service_cannot_run_this_interpreter()
    run = Installation(layout)
    try:
        run.make_dirs(layout.envdir.parent)
        parent = layout.staged(layout.envdir.parent)
        staged = Path(tempfile.mkdtemp(dir=parent, prefix=f".{layout.envdir.name}-new-"))
        try:
            build_environment(staged, layout.envdir)
            if old is not None:  # the old environment, now that the new one is ready
                inside = {f for f in old.files if f.is_relative_to(layout.envdir)}
                remove(layout, inside, {d for d in old.dirs if d.is_relative_to(layout.envdir)})
            staged.rename(layout.staged(layout.envdir))
        finally:
            if staged.exists():
                shutil.rmtree(staged)
        new = Manifest(staged=bool(layout.destdir))
        for final, (content, mode) in planned_files(layout).items():
            run.write(final, content, mode)
            new.files.add(final)
        for relative, is_dir in walk(layout.staged(layout.envdir)):
            (new.dirs if is_dir else new.files).add(layout.envdir / relative)
        new.dirs.add(layout.envdir)
        new.files.add(layout.manifest)
        if old is not None:
            # What the last installation put elsewhere (another BINDIR, say) goes; the
            # directories it made that still hold something stay ours.
            ours = ours_to_remove(layout, old)
            outside = {d for d in ours if not d.is_relative_to(layout.envdir)}
            stale = {f for f in old.files - new.files if not f.is_relative_to(layout.envdir)}
            remove(layout, stale, outside)
            new.dirs |= {d for d in outside if layout.staged(d).is_dir()}
        new.dirs |= run.made
        run.write(layout.manifest, new.text().encode(), DATA_MODE)
    except BaseException:
        run.undo_dirs()
        raise


def uninstall(layout: Layout) -> None:
    """Remove what the manifest lists, and nothing else.

    Raises:
        Refusal: there is no manifest, so nothing is known to be ours.
    """
    manifest = read_manifest(layout)
    if manifest is None:
        raise Refusal(
            f"nothing to uninstall: no {layout.staged(layout.manifest)} (make install writes "
            "it; give the same PREFIX or ENVDIR, and DESTDIR)"
        )
    if kept := remove(layout, manifest.files, ours_to_remove(layout, manifest)):
        print(
            f"udptunnel uninstall: kept {len(kept)} directories that hold files make install "
            f"did not put there: {', '.join(map(str, kept))}",
            file=sys.stderr,
        )


def install_units(layout: Layout) -> None:
    run = Installation(layout)
    for final, (content, mode) in unit_files(layout).items():
        run.write(final, content, mode)


def absolute(text: str) -> PurePosixPath:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"not an absolute path: {text!r}")
    return PurePosixPath(os.path.normpath(text))


ACTIONS = {  # what each action does, and the directories it needs to know
    "install": (install, ("envdir", "bindir", "mandir", "unitdir")),
    "uninstall": (uninstall, ("envdir",)),
    "units": (install_units, ("bindir", "unitdir")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    for name, (_, dirs) in ACTIONS.items():
        action = actions.add_parser(name)
        action.add_argument("--destdir", default="", help="staging directory (default: none)")
        for directory in dirs:
            action.add_argument(f"--{directory}", type=absolute, required=True)
    args = parser.parse_args()
    destdir = os.path.abspath(args.destdir) if args.destdir else ""
    layout = Layout(destdir, **{d: getattr(args, d) for d in ACTIONS[args.action][1]})
    os.umask(UMASK)
    try:
        ACTIONS[args.action][0](layout)
    except Refusal as refusal:
        sys.exit(f"udptunnel {args.action}: {refusal}")
    except subprocess.CalledProcessError as error:
        sys.exit(
            f"udptunnel {args.action}: {' '.join(error.cmd[:5])} ... failed with exit status "
            f"{error.returncode}; the installation is as it was"
        )
    except OSError as error:
        sys.exit(f"udptunnel {args.action}: {error}")


if __name__ == "__main__":
    main()
