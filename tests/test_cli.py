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
