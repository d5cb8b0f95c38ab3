"""The 7-8B commands the docs show fit the GPUs they are written for.

On a GPU, ``train.py`` refuses before the model loads a run whose memory plan (:mod:`opr.memory_plan`) does
not fit (``check_memory``), so a documented command whose plan does not fit 80 GB GPUs is a command that
fails. Every ``train.py`` command of the Markdown docs that names a 7-8B backbone or the ``trace_7b`` preset
is planned here with the GPUs it runs on (``torchrun --nproc_per_node N``, ``deepspeed --num_gpus N``, the
``slurm_gpu`` launcher's GPUs per node, else one) and each value of a sweep (``method=seq_sft,opr``).
"""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "launch" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LARGE = ("qwen2_5_7b_instruct", "qwen3_8b", "llama3_1_8b_instruct", "experiment=trace_7b")
GPU_GB = 80.0


def shell_commands(text: str) -> list[str]:
    """The commands of the Markdown text's code blocks: continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, flags=re.S):
        lines, current = [], ""
        for raw in block.splitlines():
            line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
            if line.endswith("\\"):
                current += line[:-1] + " "
                continue
            lines.append(current + line)
            current = ""
        out += [c.strip() for c in lines if "train.py" in c]
    return out


def documented_large_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for command in shell_commands(doc.read_text()):
            if any(name in command for name in LARGE):
                found.append((str(doc.relative_to(ROOT)), command))
    return found


def gpus_of(words: list[str]) -> int:
    for flag in ("--nproc_per_node", "--num_gpus"):
        if flag in words:
            return int(words[words.index(flag) + 1])
    if "hydra/launcher=slurm_gpu" in words:
        launcher = yaml.safe_load((ROOT / "conf" / "hydra" / "launcher" / "slurm_gpu.yaml").read_text())
        return launcher["gpus_per_node"] * launcher["nodes"]
    return 1


def plans_of(command: str) -> list[tuple[list[str], int]]:
    """(overrides, GPUs) of each run of the command (a sweep's comma lists expanded); Hydra's own settings and
    the launcher left out (they do not change what a rank holds)."""
    words = shlex.split(command)
    overrides = [w for w in words[words.index("train.py") + 1:]
                 if "=" in w and not w.startswith(("hydra.", "hydra/"))]
    choices = []
    for override in overrides:
        key, value = override.split("=", 1)
        multi = "," in value and not value.startswith(("[", "{"))
        choices.append([f"{key}={v}" for v in value.split(",")] if multi else [override])
    return [(list(combo), gpus_of(words)) for combo in itertools.product(*choices)]


COMMANDS = documented_large_commands()


def test_the_docs_show_large_commands():
    """The parser finds the documented 7-8B commands (one per launcher at least), so the test below checks
    something."""
    assert len(COMMANDS) >= 4, COMMANDS
    assert any("torchrun" in c for _, c in COMMANDS) and any("slurm_gpu" in c for _, c in COMMANDS)


@pytest.mark.parametrize("doc, command", COMMANDS, ids=[f"{d}:{i}" for i, (d, _) in enumerate(COMMANDS)])
def test_each_documented_large_command_fits_80gb_gpus(doc, command, tmp_path):
    from opr.memory_plan import GB
    from opr.tools.plan import build_plan

    for overrides, gpus in plans_of(command):
        overrides = [o for o in overrides if not o.startswith("benchmark.root=")]
        if "benchmark=trace" in overrides or "experiment=trace_7b" in overrides:
            overrides.append(f"benchmark.root={tmp_path}")  # the plan reads no data
        result, _ = build_plan(overrides, gpus, GPU_GB)
        assert result.fits(), (f"{doc}: `{command}` needs {result.peak_bytes / GB:.1f} GB per GPU on {gpus} "
                               f"GPU(s) ({' '.join(overrides)}); the largest items: "
                               + ", ".join(f"{i.name} {i.gpu / GB:.1f} GB" for i in result.largest()))


def test_the_parser_on_a_hand_written_block():
    text = ("intro\n```bash\n# a comment\ntorchrun --nproc_per_node 4 train.py engine=deepspeed \\\n"
            "    method=seq_sft,opr budget=0.1   # trailing comment\npython other.py\n```\n")
    [command] = shell_commands(text)
    assert command == "torchrun --nproc_per_node 4 train.py engine=deepspeed      method=seq_sft,opr budget=0.1"
    assert plans_of(command) == [(["engine=deepspeed", "method=seq_sft", "budget=0.1"], 4),
                                 (["engine=deepspeed", "method=opr", "budget=0.1"], 4)]
    assert plans_of("python train.py -m method=opr hydra/launcher=slurm_gpu hydra.launcher.partition=p") == [
        (["method=opr"], 8)]
