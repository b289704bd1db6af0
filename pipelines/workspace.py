"""A pipeline workspace: a git repository with DVC, the dvc.yaml and params.yaml templates.

``xai pipeline init DIR`` makes one for users who start from nothing (the demo does too). DVC
needs git for experiments (``dvc exp run --queue``), which also need a first commit: init makes it
when git knows who the user is, and says how otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from core.errors import XAIError

TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATE_FILES = ("dvc.yaml", "params.yaml")
GITIGNORE_LINES = ("/.xai/", "/mlruns/", "/mlflow.db")


def dvc_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for dvc and its stages: no analytics, this interpreter's folder first on PATH
    (stage commands say ``python``), the caller's additions last."""
    merged = dict(os.environ)
    merged["DVC_NO_ANALYTICS"] = "1"
    bindir = str(Path(sys.executable).parent)
    merged["PATH"] = bindir + os.pathsep + merged.get("PATH", "")
    merged.update(env or {})
    return merged


def dvc_command(*args: str) -> list[str]:
    """``dvc ARGS`` with the dvc of this interpreter."""
    return [sys.executable, "-m", "dvc", *args]


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=dvc_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise XAIError(f"{' '.join(cmd[:3])} failed in {cwd}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _is_git_root(path: Path) -> bool:
    return (path / ".git").exists()


def _append_gitignore(path: Path) -> None:
    gi = path / ".gitignore"
    current = gi.read_text().splitlines() if gi.is_file() else []
    missing = [line for line in GITIGNORE_LINES if line not in current]
    if missing:
        with gi.open("a") as fh:
            fh.write("".join(f"{line}\n" for line in missing))


def init_workspace(directory: str | Path, force: bool = False, commit: bool = True) -> dict[str, object]:
    """Create (or complete) a workspace in ``directory``; returns what was done.

    Existing dvc.yaml / params.yaml are kept unless ``force``. A directory inside another git
    repository gets its own repository (DVC experiments want the workspace at a git root).
    """
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    done: dict[str, object] = {"workspace": str(root), "created": [], "committed": False}
    if not _is_git_root(root):
        _run(["git", "init", "-q"], root)
        done["created"].append(".git")  # type: ignore[union-attr]
    if not (root / ".dvc").is_dir():
        _run(dvc_command("init", "-q"), root)
        done["created"].append(".dvc")  # type: ignore[union-attr]
    for name in TEMPLATE_FILES:
        target = root / name
        if force or not target.exists():
            shutil.copyfile(TEMPLATES / name, target)
            done["created"].append(name)  # type: ignore[union-attr]
    _append_gitignore(root)
    if commit:
        _run(["git", "add", "dvc.yaml", "params.yaml", ".gitignore", ".dvc"], root)
        staged = _run(["git", "diff", "--cached", "--quiet"], root, check=False).returncode != 0
        if staged:
            proc = _run(["git", "commit", "-q", "-m", "xai pipeline workspace"], root, check=False)
            done["committed"] = proc.returncode == 0
            if proc.returncode != 0:
                done["hint"] = (
                    "git could not commit (set user.name and user.email); commit the workspace "
                    "before `dvc exp run --queue`"
                )
    return done


def find_workspace(start: str | Path = ".") -> Path:
    """The nearest folder at or above ``start`` holding dvc.yaml and params.yaml."""
    path = Path(start).resolve()
    for candidate in (path, *path.parents):
        if (candidate / "dvc.yaml").is_file() and (candidate / "params.yaml").is_file():
            return candidate
    raise XAIError(
        f"no pipeline workspace (dvc.yaml + params.yaml) at or above {path}: "
        "create one with `xai pipeline init DIR`"
    )
