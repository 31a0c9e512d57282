"""The README's two commands are the contract with a new user and with CI."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command_after(marker: str) -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(marker)
    fence = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
    return lines[fence + 1].strip()


def test_ci_runs_the_readme_test_command():
    command = _command_after("<!-- test-command -->")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_readme_demo_command_installs_and_runs_the_demo():
    command = _command_after("<!-- demo-command -->")
    assert command.startswith("pip install torch==2.13.0") and command.endswith("farcluss demo")
