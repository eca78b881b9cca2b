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


def test_the_openclip_flag_table_shows_the_defaults_that_run() -> None:
    """Each ``--roclip-*`` row's default column is RoClipConfig's default, as ``--help`` shows
    it (the duplicate-matches row said ``mask`` while the code keeps)."""
    from roclip_plugin.config import RoClipConfig, field_names, flag_name
    from roclip_plugin.testing import as_shown

    text = (ROOT / "docs" / "openclip.md").read_text()
    config = RoClipConfig()
    wrong = {}
    for name in field_names():
        row = re.search(rf"^\| `{re.escape(flag_name(name))}` \| `([^`]*)` \|", text, re.M)
        assert row, f"no row for {flag_name(name)} in docs/openclip.md"
        if row.group(1) != as_shown(getattr(config, name)):
            wrong[flag_name(name)] = (row.group(1), as_shown(getattr(config, name)))
    assert not wrong, f"docs/openclip.md defaults differ from the code's (doc, code): {wrong}"


def test_the_attacks_doc_gives_the_demos_attribute_rates() -> None:
    from roclip_kit.demo.settings import OPENCLIP_SCALES, SCALES

    text = " ".join((ROOT / "docs" / "attacks.md").read_text().split())
    tensor, openclip = SCALES["cpu"]["attribute_rate"], OPENCLIP_SCALES["cpu"]["attribute_rate"]
    assert f"`roclip demo`'s cpu scale uses {tensor} ({openclip} with `--trainer openclip`)" in text


def test_resuming_a_named_run_from_a_checkpoint_uses_a_new_name() -> None:
    """OpenCLIP refuses an existing --name ("Experiment already exists") unless --resume latest."""
    for line in (ROOT / "docs" / "openclip.md").read_text().splitlines():
        if line.startswith("roclip-openclip-train") and "--resume" in line:
            resume = line.split("--resume")[1].split()[0]
            name = re.search(r"--name (\S+)", line)
            if resume == "latest":
                assert name, line  # latest needs the run's own --name
            else:
                assert name and f"logs/{name.group(1)}/" not in resume, line
