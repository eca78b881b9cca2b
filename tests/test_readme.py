"""The README's commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_command = next(c for c in _commands() if "pytest" in c)
    ci_lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip()]
    assert ci_lines[-1] == test_command


def test_readme_main_job_is_the_demo() -> None:
    assert any(c.endswith("roclip demo") and 'pip install -e ".[kit]"' in c for c in _commands())


def test_every_config_field_is_documented() -> None:
    from roclip_plugin.config import field_names, flag_name

    text = (ROOT / "docs" / "config.md").read_text()
    missing = [n for n in field_names() if f"| `{n}` | `{flag_name(n)}` |" not in text]
    assert not missing, f"fields missing from docs/config.md: {missing}"


def test_every_flag_is_in_the_openclip_docs() -> None:
    from roclip_plugin.config import all_flags

    text = (ROOT / "docs" / "openclip.md").read_text()
    missing = [f for f in all_flags() if f"| `{f}` |" not in text]
    assert not missing, f"flags missing from docs/openclip.md: {missing}"
