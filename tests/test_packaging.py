"""How the distribution installs (whether `pip install .` or `pip install -e .`): the repository folders
cli/ and reports/ import as cka_split.cli and cka_split.reports, never as top-level `cli`/`reports`; the
CLI runs from outside the checkout; and the layering contract in pyproject.toml sees those packages."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [
    "analyze",
    "recommend",
    "train",
    "sweep",
    "evaluate",
    "report",
    "compare",
    "demo",
    "pretrain-demo",
]  # in `cka-split --help`'s order


def outside(tmp_path: Path) -> dict:
    """Run a subprocess in tmp_path with nothing of the checkout on its path: only the installation counts."""
    env = dict(os.environ, COLUMNS="200")
    env.pop("PYTHONPATH", None)
    return {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "timeout": 120}


def listed_commands(help_text: str) -> list[str]:
    """The command names in the 'Commands' panel of the app's help (one row starts with each name)."""
    _, _, panel = help_text.partition("Commands")
    return re.findall(r"^│ ([a-z][a-z-]*) ", panel, flags=re.M)


def test_listed_commands_reads_the_panel_not_the_description():
    text = (
        "Usage: x\n Find where layers split, and train ViT-Split.\n╭─ Commands ─╮\n"
        "│ analyze  Collect.\n│         train more.\n│ demo  Run.\n"
    )
    assert listed_commands(text) == ["analyze", "demo"]


@pytest.mark.parametrize("how", ["console script", "python -m"])
def test_cli_runs_from_outside_the_checkout(tmp_path, how):
    script = shutil.which("cka-split", path=str(Path(sys.executable).parent))
    assert script is not None, "the cka-split console script is not installed next to this Python"
    argv = [script] if how == "console script" else [sys.executable, "-m", "cka_split.cli"]
    r = subprocess.run(argv + ["--help"], **outside(tmp_path))
    assert r.returncode == 0, r.stderr
    assert listed_commands(r.stdout) == COMMANDS


def test_distribution_has_no_generic_top_level_names(tmp_path):
    # in a subprocess outside the checkout: there the checkout's own cka_split.egg-info is not on the path
    probe = (
        "import importlib.metadata as m, importlib.util as u, importlib.resources as r\n"
        "d = m.distribution('cka-split')\n"
        "print('top_level', ','.join(sorted(d.read_text('top_level.txt').split())))\n"
        "print('files', ','.join(sorted({f.parts[0] for f in d.files or []})))\n"
        "for name in ('cli', 'reports', 'cka_split.cli', 'cka_split.reports'):\n"
        "    s = u.find_spec(name)\n"
        "    print(name, s.origin if s else None)\n"
        "print('template', r.files('cka_split.reports').joinpath('templates/report.html').is_file())\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], **outside(tmp_path))
    assert r.returncode == 0, r.stderr
    found = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert found["top_level"] == "cka_split,vitsplit"
    assert not set(found["files"].split(",")) & {"cli", "reports"}, found["files"]  # RECORD: what was installed
    for generic in ("cli", "reports"):  # absent, or some other distribution's module, never ours
        assert found[generic] == "None" or not Path(found[generic]).resolve().is_relative_to(ROOT), found
    assert found["cka_split.cli"].endswith(os.path.join("cli", "__init__.py"))
    assert found["cka_split.reports"].endswith(os.path.join("reports", "__init__.py"))
    assert found["template"] == "True"


def installed_tree(dest: Path) -> None:
    """Copy the packages, laid out under their import names, from wherever this installation finds them
    (import-linter walks package folders; an editable install keeps cli/ and reports/ outside cka_split/)."""
    for name in ("cka_split", "vitsplit", "cka_split.cli", "cka_split.reports"):
        folder = Path(importlib.util.find_spec(name).submodule_search_locations[0])
        shutil.copytree(
            folder, dest.joinpath(*name.split(".")), dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
        )


def lint_imports(tree: Path, *contracts: str) -> subprocess.CompletedProcess:
    args = [a for c in contracts for a in ("--contract", c)]
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", code, "--no-cache", *args, str(ROOT / "pyproject.toml")],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_layering_contract_sees_cli_and_reports(tmp_path):
    """The contract passes on the code as it is, and an upward import (reports -> cli) breaks it: the
    linter sees cka_split.cli and cka_split.reports, so the contract is not vacuously kept."""
    installed_tree(tmp_path)
    contracts = ("vitsplit-below-cka_split", "cka_split-layers", "cka_split-acyclic")
    r = lint_imports(tmp_path, *contracts)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 3 kept, 0 broken." in r.stdout
    with open(tmp_path / "cka_split" / "reports" / "html.py", "a") as f:
        f.write("\nfrom cka_split.cli.options import parse_layer_list  # upward\n")
    r = lint_imports(tmp_path, *contracts)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cka_split.reports is not allowed to import cka_split.cli" in r.stdout
    assert "cka_split.reports.html -> cka_split.cli.options" in r.stdout
