"""The CLI's one error path: user errors print one line on stderr and exit 2. (That the CLI runs from
outside the checkout and lists exactly its commands: test_packaging.py.)"""

import subprocess
import sys

import pytest
from cka_split.cli.app import main


@pytest.mark.parametrize("cmd", ["analyze", "recommend", "train", "evaluate", "report", "compare", "demo"])
def test_every_command_is_registered(cmd, capsys):
    """Each command answers its own --help (an unregistered one is a usage error, exit 2). The app's
    help text mentions some command names in prose, so finding the word there proves nothing."""
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.split()[:3] == ["Usage:", "cka-split", cmd]


@pytest.mark.parametrize("args", [["train", "--bogus"], ["train", "--iters", "abc"], ["recommend"]])
def test_usage_errors_are_one_line_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cka-split: error:") and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["analyze", "--model", "dinov2_vits14", "--weights", "auto"],
        ["train", "--model", "dinov2_vits14", "--weights", "random", "--k-t", "20", "--iters", "1"],
    ],
)
def test_user_errors_inside_commands_leave_exactly_one_stderr_line(tmp_path, args):
    """The progress display must not add lines before an early user error (offline weights, K_t)."""
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch"), HF_HUB_CACHE=str(tmp_path / "hf"))
    r = subprocess.run(
        [sys.executable, "-m", "cka_split.cli", *args, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("cka-split: error:") and r.stderr.count("\n") == 1, repr(r.stderr)
