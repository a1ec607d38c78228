"""The docs tell the truth about the code: every relative link and anchor in the README and docs/
resolves; every ``sora-dist`` command shown in a fenced block (directly, under torchrun or through
the launch scripts) names a real command and flags its parser accepts, or config keys that exist;
every config key written in backticks or in a YAML block exists; the README's command table lists
every command. Each check is also run on a planted mistake, so it can fail."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from sora_dist import cli
from sora_dist.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")])
SECTIONS = {name: {f.name for f in dataclasses.fields(section)} for name, section in vars(Config()).items() if dataclasses.is_dataclass(section)}
FILE_SUFFIXES = {"py", "yaml", "yml", "sh", "json", "md", "txt", "png", "sbatch"}
MODULE_TO_COMMAND = {module.partition(":")[0]: name for name, module in cli.MODULE_COMMANDS.items() if ":" not in module}
MODULE_TO_COMMAND.update({"sora_dist.train": "train", "sora_dist.sample": "sample"})
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


# --- links and anchors -------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", strip_fences(markdown), flags=re.M):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def strip_fences(markdown: str) -> str:
    return re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)


def link_problems(doc: Path, markdown: str) -> list[str]:
    problems = []
    for target in LINK.findall(strip_fences(markdown)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            problems.append(f"{doc.name}: link to {target}: {path} does not exist")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved.read_text())):
            problems.append(f"{doc.name}: link to {target}: no heading #{anchor} there")
    return problems


# --- commands ----------------------------------------------------------------------------------

class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser, known: bool):
        self.parser, self.known = parser, known


def command_parser(command: str, monkeypatch) -> tuple[argparse.ArgumentParser, bool]:
    """The parser of a ``sora-dist`` command and whether it takes ``--section.key`` overrides,
    captured when the command starts to parse its arguments (nothing runs)."""
    def capture(known):
        def parse(self, *args, **kwargs):
            raise _Captured(self, known)
        return parse

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture(False))
        patch.setattr(argparse.ArgumentParser, "parse_known_args", capture(True))
        try:
            cli.main(command.split())
        except _Captured as captured:
            parser, known = captured.parser, captured.known
    if command in cli.MODULE_COMMANDS:
        return parser, known
    for name in command.split():  # the CLI's own commands: walk down its subparsers
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser, bool(parser.get_default("overrides_allowed"))


def shown_commands(markdown: str) -> list[list[str]]:
    """Every command line in the fenced shell blocks (continuation lines joined), as tokens; bare
    blocks show output."""
    lines = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", markdown, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                try:
                    lines.append(shlex.split(line))
                except ValueError:
                    continue
    return lines


def sora_dist_call(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(command, its arguments) when a shown line runs sora-dist: directly, as a module under
    torchrun, or through the launch scripts (which run the trainer); else None."""
    for i, token in enumerate(tokens):
        if token == "&&":
            return sora_dist_call(tokens[i + 1:])
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "sora-dist" and len(tokens) > 1:
        if tokens[1] == "checkpoint" and len(tokens) > 2:
            return "checkpoint " + tokens[2], tokens[3:]
        return tokens[1], tokens[2:]
    script = next((i for i, t in enumerate(tokens) if t.startswith("launch/") and t.endswith((".sh", ".sbatch"))), None)
    if script is not None and tokens[script] != "launch/ascend_env.sh":
        return "train", tokens[script + 1:]
    if "-m" in tokens and tokens[0] in ("torchrun", "python", "python3"):
        module_at = len(tokens) - 1 - tokens[::-1].index("-m")
        module, rest = tokens[module_at + 1], tokens[module_at + 2:]
        if module == "sora_dist.cli" and rest:
            return rest[0], rest[1:]
        if module in MODULE_TO_COMMAND:
            return MODULE_TO_COMMAND[module], rest
    return None


def config_key_problem(key: str) -> str | None:
    section, _, field = key.partition(".")
    if section not in SECTIONS:
        return f"no config section {section!r}"
    if field not in SECTIONS[section]:
        return f"no config key {key!r}"
    return None


def command_problems(markdown: str, monkeypatch) -> list[str]:
    problems, parsers = [], {}
    for tokens in shown_commands(markdown):
        call = sora_dist_call(tokens)
        if call is None:
            continue
        command, args = call
        if command not in parsers:
            try:
                parsers[command] = command_parser(command, monkeypatch)
            except (KeyError, StopIteration, SystemExit):
                problems.append(f"`sora-dist {command}` is not a command")
                continue
        parser, overrides = parsers[command]
        options = set(parser._option_string_actions)
        for flag in (arg.split("=")[0] for arg in args if arg.startswith("--")):
            if flag in options:
                continue
            if overrides and "." in flag:
                problem = config_key_problem(flag[2:])
                if problem:
                    problems.append(f"`sora-dist {command} {flag}`: {problem}")
            else:
                problems.append(f"`sora-dist {command}` has no flag {flag}")
    return problems


# --- config keys -------------------------------------------------------------------------------

def config_key_problems(markdown: str) -> list[str]:
    problems = []
    for code in re.findall(r"`([^`\n]+)`", strip_fences(markdown)):
        match = re.match(r"^(?:--)?([a-z]+)\.([a-z_][a-z0-9_]*)\b", code)
        if match and match.group(1) in SECTIONS and match.group(2) not in FILE_SUFFIXES:
            problem = config_key_problem(f"{match.group(1)}.{match.group(2)}")
            if problem:
                problems.append(f"`{code}`: {problem}")
    for block in re.findall(r"^```yaml\n(.*?)^```", markdown, flags=re.M | re.S):
        for section, values in (yaml.safe_load(block) or {}).items():
            for key in (values or {}):
                problem = config_key_problem(f"{section}.{key}")
                if problem:
                    problems.append(f"YAML block: {problem}")
    return problems


# --- the checks on the real docs ---------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(doc):
    assert link_problems(doc, doc.read_text()) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shown_commands_parse(doc, monkeypatch):
    assert command_problems(doc.read_text(), monkeypatch) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_keys_exist(doc):
    assert config_key_problems(doc.read_text()) == []


def test_the_readme_lists_every_command():
    subparsers = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = {"checkpoint verify" if name == "checkpoint" else name for name in subparsers.choices}
    listed = set(re.findall(r"^\| `([a-z][a-z -]*)` \|", (ROOT / "README.md").read_text(), flags=re.M))
    assert listed == commands, (sorted(commands - listed), sorted(listed - commands))


def test_the_readme_is_short_and_says_what_runs_where():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first_screen = "\n".join(readme.splitlines()[:60])
    assert "Nothing has run on a GPU or NPU yet" in first_screen and "| part |" in first_screen


# --- each check fails on a planted mistake -----------------------------------------------------

def test_a_planted_broken_link_or_anchor_is_found():
    doc = ROOT / "docs" / "planted.md"
    assert link_problems(doc, "see [gone](nowhere.md) and [x](checkpoints.md#no-such-heading) and [ok](checkpoints.md#checkpoint-cost)") == [
        "planted.md: link to nowhere.md: nowhere.md does not exist",
        "planted.md: link to checkpoints.md#no-such-heading: no heading #no-such-heading there",
    ]


def test_a_planted_wrong_command_flag_or_key_is_found(monkeypatch):
    planted = "```bash\nsora-dist trian --config x.yaml\nsora-dist plan --preset XL --device 8\n" \
              "torchrun --nproc-per-node 8 -m sora_dist.train --config c.yaml --parallel.tpp=2\n" \
              "NPROC=8 launch/single_node.sh --config c.yaml --optim.lr=1e-4\n```\n"
    assert command_problems(planted, monkeypatch) == [
        "`sora-dist trian` is not a command",
        "`sora-dist plan` has no flag --device",
        "`sora-dist train --parallel.tpp`: no config key 'parallel.tpp'",
    ]


def test_a_planted_wrong_config_key_is_found():
    planted = "set `checkpoint.keep_lats` or `fault.step_timeout_s`; see `sora_dist/train.py`\n```yaml\ncheckpoint:\n  every_step: 5\n```\n"
    assert config_key_problems(planted) == ["`checkpoint.keep_lats`: no config key 'checkpoint.keep_lats'",
                                            "YAML block: no config key 'checkpoint.every_step'"]
