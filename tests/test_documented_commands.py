"""Every documented ``python train.py ...`` command composes with Hydra and passes ``opr.config.validate``,
and every documented 7-8B command's memory plan fits the 80 GB GPUs it runs on.

The commands are collected from README.md, docs/**/*.md (not docs/results/ or docs/_build/) and
launch/README.md: every line of a fenced code block and every inline code span that runs ``train.py``
(``python train.py``, ``.venv/bin/python train.py``; under ``torchrun`` or the ``deepspeed`` launcher the
launcher and its options are stripped and the ``train.py`` part is tested). Lines ending in ``\\`` are joined
with the next; ``#`` comments and anything after ``&&`` / ``;`` / ``|`` are not part of the command.

Each command's overrides are composed as ``train.py`` would compose them (``compose(config_name="config")`` from
``conf/``, with Hydra's own config so that ``hydra/launcher=...`` and ``hydra.*`` overrides are applied too),
after these rewrites:

- ``-m`` / ``--multirun`` is dropped and each sweep list takes its first value (``seed=0,1,2`` -> ``seed=0``;
  a list in brackets, ``benchmark.tasks=[a,b]``, is one value);
- Hydra's command-line flags ``--cfg <job|hydra|all>`` and ``-p`` / ``--package <key>`` are dropped (they
  print the config instead of running; what they print is the composed config tested here);
- ``$HOME`` / ``$USER`` are expanded as the shell would (``HOME`` points into the test's temporary folder, so
  a documented ``stage_cache.dir=$HOME/...`` creates nothing outside it);
- a placeholder written ``<name>`` is replaced by an example value when it names a value
  (:data:`PLACEHOLDERS`); any other placeholder, and ``...`` standing for elided overrides, make the command
  skip with a reason naming it.

Then the config without its ``hydra`` node goes through ``opr.config.validate`` (types, ranges, known keys,
the stage cache folder), with ``run_dir`` in the temporary folder unless the command sets it. Nothing is
loaded or run.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from opr.config import validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Placeholders that stand for one value, and the value the test puts in their place.
PLACEHOLDERS = {
    "<yours>": "debug",  # a SLURM partition
    "<partition>": "debug",
    "<account>": "my_account",
    "<seed>": "0",
    "<steps>": "25",
}
LAUNCHERS = ("torchrun", "deepspeed")


def documented_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "launch" / "README.md"]
    for path in sorted((ROOT / "docs").rglob("*.md")):
        rel = path.relative_to(ROOT / "docs").parts
        if rel[0] not in ("results", "_build"):
            files.append(path)
    return [f for f in files if f.exists()]


def _fenced_and_prose(text: str) -> tuple[list[str], str]:
    """The lines of the fenced code blocks (continuations joined) and the text outside them."""
    code, prose, fence = [], [], None
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None and (stripped.startswith("```") or stripped.startswith("~~~")):
            fence = stripped[:3]
            continue
        if fence is not None and stripped.startswith(fence):
            fence = None
            if pending:
                code.append(pending)
                pending = ""
            continue
        if fence is None:
            prose.append(line)
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
        else:
            code.append(pending + stripped)
            pending = ""
    return code, "\n".join(prose)


def _strip_comment(line: str) -> str:
    """The line up to an unquoted ``#`` that starts a word (a shell comment)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _segments(line: str) -> list[str]:
    """Shell commands of one line: split at ``&&``, ``;`` and ``|`` outside quotes."""
    out, cur, quote, i = [], "", None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif line.startswith("&&", i) or ch in ";|":
            out.append(cur)
            cur = ""
            i += 2 if line.startswith("&&", i) else 1
            continue
        cur += ch
        i += 1
    return out + [cur]


def _train_command(segment: str):
    """``(argv after train.py, the command as written)`` when the segment runs train.py, else None."""
    text = " ".join(segment.split())
    if "train.py" not in text:
        return None
    try:
        words = shlex.split(text, posix=False)
    except ValueError:
        return None
    where = [i for i, w in enumerate(words) if w == "train.py" or w.endswith("/train.py")]
    if not where or not words:
        return None
    first = words[0]
    runner = Path(first).name
    if not (runner.startswith("python") or runner in LAUNCHERS):
        return None
    return words[where[0] + 1:], text


def collect() -> list[tuple[str, list[str], str]]:
    """``(file:line, argv, command)`` for every documented train.py command."""
    found = []
    for path in documented_files():
        text = path.read_text()
        code, prose = _fenced_and_prose(text)
        lines = [(line, "code") for line in code]
        lines += [(" ".join(span.split()), "inline") for span in re.findall(r"`([^`]*train\.py[^`]*)`", prose)]
        for line, kind in lines:
            line = _strip_comment(line)
            for segment in _segments(line):
                cmd = _train_command(segment)
                if cmd is not None:
                    found.append((f"{path.relative_to(ROOT)} ({kind})", cmd[0], cmd[1]))
    return found


def _split_top(value: str) -> list[str]:
    """A sweep list's values: commas outside brackets, braces and quotes."""
    out, cur, depth, quote = [], "", 0, None
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    return out + [cur]


def _unquote(word: str) -> str:
    """What the shell passes for one word (outer quotes removed, as posix shlex would)."""
    return shlex.split(word)[0] if word else word


def overrides_of(argv: list[str]) -> list[str]:
    """Hydra overrides of a documented argv: flags dropped, sweep lists at their first value, placeholders
    filled in; ``pytest.skip`` for an elided or unknown placeholder."""
    out, skip_next = [], False
    for word in argv:
        if skip_next:
            skip_next = False
            continue
        if word in ("-m", "--multirun"):
            continue
        if word in ("--cfg", "-c", "-p", "--package"):
            skip_next = True
            continue
        if word == "..." or word.endswith("=..."):
            pytest.skip(f"elided overrides ('...'): {' '.join(argv)}")
        word = os.path.expandvars(_unquote(word))
        for placeholder, value in PLACEHOLDERS.items():
            word = word.replace(placeholder, value)
        left = re.search(r"<[^<>\s]*>", word)
        if left:
            pytest.skip(f"placeholder {left.group(0)} has no example value: {' '.join(argv)}")
        if "$" in word:
            raise AssertionError(f"shell variable left in a documented command: {word!r}")
        key, eq, value = word.partition("=")
        if eq:
            value = _split_top(value)[0]
        out.append(key + eq + value)
    return out


COMMANDS = collect()


def test_commands_were_found():
    """The collector sees the README's quickstart and the docs' commands (guards against a collector that
    silently finds nothing)."""
    where = {c[0].split(" ")[0] for c in COMMANDS}
    assert "README.md" in where and "launch/README.md" in where
    assert any(w.startswith("docs/methods/") for w in where) and any(w.startswith("docs/studies/") for w in where)
    assert len(COMMANDS) >= 40, len(COMMANDS)


@pytest.mark.parametrize("where,argv,command", COMMANDS, ids=[f"{c[0]}: {c[2]}"[:150] for c in COMMANDS])
def test_documented_command_composes(where, argv, command, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USER", "tester")
    overrides = overrides_of(argv)
    if not any(o.split("=", 1)[0].lstrip("+") == "run_dir" for o in overrides):
        overrides.append(f"run_dir={tmp_path / 'run'}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        del cfg["hydra"]
    if cfg.rollout.backend == "vllm":
        pytest.importorskip("vllm", reason=f"rollout.backend=vllm needs vllm: {command}")
    validate(cfg)


# ------------------------------------------------------------------------------------------ 7-8B commands fit
# On a GPU train.py refuses, before the model loads, a run whose memory plan (opr.memory_plan) does not fit
# (check_memory), so a documented 7-8B command whose plan does not fit 80 GB GPUs is a command that fails.
LARGE = ("qwen2_5_7b_instruct", "qwen3_8b", "llama3_1_8b_instruct", "experiment=trace_7b", "experiment=trace_paper")
GPU_GB = 80.0


def gpus_of(command: str) -> int:
    """The GPUs a documented command runs on: ``torchrun --nproc_per_node N``, ``deepspeed --num_gpus N``, the
    ``slurm_gpu`` launcher's GPUs, else one."""
    words = command.split()
    for flag in ("--nproc_per_node", "--num_gpus"):
        for i, word in enumerate(words):
            if word == flag:
                return int(words[i + 1])
            if word.startswith(flag + "="):
                return int(word.split("=", 1)[1])
    if "hydra/launcher=slurm_gpu" in command.split():
        launcher = yaml.safe_load((CONF / "hydra" / "launcher" / "slurm_gpu.yaml").read_text())
        return launcher["gpus_per_node"] * launcher["nodes"]
    return 1


def sweep_points(argv: list[str]) -> list[list[str]]:
    """The overrides of every run of a documented sweep (each combination of its lists' values), Hydra's own
    settings left out (they do not change what a rank holds)."""
    choices = []
    for word in argv:
        key, eq, value = word.partition("=")
        sweep = eq and not key.startswith(("hydra.", "hydra/")) and not value.startswith(("[", "{", "'", '"'))
        choices.append([key + eq + v for v in _split_top(value)] if sweep else [word])
    return [[o for o in overrides_of(list(point)) if not o.startswith(("hydra.", "hydra/"))]
            for point in itertools.product(*choices)]


LARGE_COMMANDS = [c for c in COMMANDS if any(name in c[2] for name in LARGE)]


def test_large_commands_were_found():
    assert len(LARGE_COMMANDS) >= 6, LARGE_COMMANDS
    assert any(c[2].startswith("torchrun") for c in LARGE_COMMANDS) and any("slurm_gpu" in c[2] for c in LARGE_COMMANDS)


@pytest.mark.parametrize("where,argv,command", LARGE_COMMANDS, ids=[f"{c[0]}: {c[2]}"[:150] for c in LARGE_COMMANDS])
def test_documented_7_8b_command_fits_80gb_gpus(where, argv, command):
    from opr.memory_plan import GB
    from opr.tools.plan import build_plan

    gpus = gpus_of(command)
    for overrides in sweep_points(argv):
        result, _ = build_plan(overrides, gpus, GPU_GB)
        assert result.fits(), (f"{where}: `{command}` needs {result.peak_bytes / GB:.1f} GB per GPU on {gpus} GPU(s) "
                               f"({' '.join(overrides)}); the largest items: "
                               + ", ".join(f"{i.name} {i.gpu / GB:.1f} GB" for i in result.largest()))


def test_gpus_and_sweep_points_of_a_command():
    assert gpus_of("torchrun --nproc_per_node 4 train.py method=opr") == 4
    assert gpus_of("torchrun --nproc_per_node=2 train.py method=opr") == 2
    assert gpus_of("deepspeed --num_gpus 8 train.py method=opr") == 8
    assert gpus_of("python train.py -m method=opr hydra/launcher=slurm_gpu") == 8
    assert gpus_of("python train.py method=opr") == 1
    assert sweep_points(["-m", "method=seq_sft,opr", "budget=0.1,0.2", "hydra.launcher.partition=<yours>",
                         "benchmark.tasks=[a,b]"]) == [
        ["method=seq_sft", "budget=0.1", "benchmark.tasks=[a,b]"], ["method=seq_sft", "budget=0.2", "benchmark.tasks=[a,b]"],
        ["method=opr", "budget=0.1", "benchmark.tasks=[a,b]"], ["method=opr", "budget=0.2", "benchmark.tasks=[a,b]"]]


def test_placeholders_and_sweeps_are_rewritten():
    assert overrides_of(["-m", "method=seq_sft,opr", "seed=0,1,2", "benchmark.tasks=[emotion,topic]"]) == [
        "method=seq_sft", "seed=0", "benchmark.tasks=[emotion,topic]"]
    assert overrides_of(["hydra.launcher.partition=<yours>", "--cfg", "hydra", "-p", "hydra.launcher"]) == [
        "hydra.launcher.partition=debug"]
    assert overrides_of(['"stage_cache.dir=\'~/x\'"']) == ["stage_cache.dir='~/x'"]
    with pytest.raises(pytest.skip.Exception, match="<overrides>"):
        overrides_of(["-m", "<overrides>", "hydra/launcher=slurm_cpu"])
    with pytest.raises(pytest.skip.Exception, match="elided"):
        overrides_of(["engine=deepspeed", "..."])


def test_collector_reads_launchers_continuations_and_comments():
    code, _ = _fenced_and_prose("```bash\ntorchrun --nproc_per_node 8 train.py engine=deepspeed \\\n"
                                "    method=opr   # a comment\n```\n")
    assert len(code) == 1
    argv, _ = _train_command(_strip_comment(code[0]))
    assert argv == ["engine=deepspeed", "method=opr"]
    assert _train_command("bash launch/install.sh") is None
    assert [_train_command(s) for s in _segments("bash launch/install.sh && .venv/bin/python train.py")][1][0] == []
    assert _train_command("`train.py` makes each task a rank") is None


def test_the_api_page_lists_every_module():
    import pkgutil
    import re

    import opr

    modules = {"opr"} | {m.name for m in pkgutil.walk_packages(opr.__path__, "opr.") if not m.name.endswith("__main__")}
    listed = set(re.findall(r"automodule:: (\S+)", (ROOT / "docs" / "api.md").read_text()))
    assert modules - listed == set(), "add these to docs/api.md"
    assert listed - modules == set(), "docs/api.md names modules that do not exist"
