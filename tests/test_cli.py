import subprocess
import sys
from pathlib import Path

import pytest

from vesuvius_lab.cli import COMMANDS

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("command", [c[0] for c in COMMANDS] + ["manifest build", "manifest check"])
def test_every_subcommand_has_help(cli, command):
    with pytest.raises(SystemExit) as exit_:
        cli(*command.split(), "--help")
    assert exit_.value.code == 0


def test_console_script_and_module_entry_points(tmp_path):
    script = BIN / "vesuvius-lab"
    assert script.exists(), "console script not installed"
    for cmd in ([str(script)], [sys.executable, "-m", "vesuvius_lab"]):
        done = subprocess.run([*cmd, "validate", str(tmp_path / "nowhere")], capture_output=True, text=True)
        assert done.returncode == 2
        assert done.stderr.strip() == f"error: {tmp_path / 'nowhere'}: data root is not a directory"
        assert "Traceback" not in done.stderr


def test_usage_error_exits_2(cli):
    with pytest.raises(SystemExit) as exit_:
        cli("synth")
    assert exit_.value.code == 2


def test_resume_without_any_earlier_run_stops_and_says_so(tiny_root, tmp_path, cli):
    from lab_runs_helpers import write_tiny_config

    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=2)
    code, _, err = cli("train", "--config", cfg, "--run-dir", tmp_path / "typo", "--resume", "--no-progress")
    assert code == 2 and err == [f"error: {tmp_path / 'typo'}: nothing to resume (no checkpoint, no earlier run); "
                                 "start it without --resume"]
    assert not (tmp_path / "typo").exists()


def test_cli_polish_help_texts_and_nearest_keys(capsys, cli, tmp_path):
    from vesuvius_lab.cli import build_parser

    top = build_parser().format_help()
    assert "``" not in top
    for command in ("synth", "plan", "train", "predict", "evaluate", "validate"):
        parser = build_parser()._subparsers._group_actions[0].choices[command]
        silent = [a.option_strings or a.dest for a in parser._actions if not a.help]
        assert silent == [], (command, silent)  # every option says what it is for
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  max_epoch: 3\ntraning: {}\n")
    code, _, err = cli("train", "--config", cfg)
    assert code == 2
    assert f"error: {cfg}: unknown key training.max_epoch (did you mean training.max_epochs?)" in err
    assert any("unknown section 'traning' (did you mean 'training'?" in e for e in err)


def test_a_torchrun_rank_ends_as_a_normal_exit_would_less_the_teardown(tmp_path):
    """A rank skips the interpreter's teardown (gloo's threads abort it there, see cli._exit_rank),
    but still waits for its non-daemon threads, runs its exit handlers and keeps its exit code."""
    code = f"""
import atexit, pathlib, threading, time
from vesuvius_lab.cli import _exit_rank
out = pathlib.Path({str(tmp_path)!r})
atexit.register(lambda: (out / "atexit").write_text("ran"))
def last_write():
    time.sleep(0.5)
    (out / "thread").write_text("done")
threading.Thread(target=last_write).start()
print("flushed at exit", end="")
_exit_rank(3)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "flushed at exit"
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"
