"""Packaging: setup.cfg is the one list of dependencies (the requirements files repeat it), its console scripts
resolve to working commands, and ``python -m opr.tools.report`` runs the report package."""

from __future__ import annotations

import configparser
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools.config.setupcfg import read_configuration

ROOT = Path(__file__).resolve().parent.parent
SETUP_CFG = ROOT / "setup.cfg"


def _requirements(lines) -> dict[str, str]:
    """{canonical name: specifier (sorted, as text) plus markers} of requirement lines; comments and blank
    lines skipped."""
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in out:
            raise AssertionError(f"{name} is listed twice")
        spec = ",".join(sorted(str(s) for s in req.specifier))
        out[name] = spec + (f"; {req.marker}" if req.marker else "")
    return out


def _file_requirements(name: str) -> dict[str, str]:
    return _requirements((ROOT / name).read_text(encoding="utf-8").splitlines())


def _options() -> dict:
    return read_configuration(str(SETUP_CFG))["options"]


@pytest.mark.parametrize(
    ("requirements_file", "extra"),
    [("requirements.txt", None), ("requirements-dev.txt", "dev"), ("requirements-bench.txt", "bench")],
)
def test_requirements_files_repeat_setup_cfg(requirements_file, extra):
    options = _options()
    declared = options["install_requires"] if extra is None else options["extras_require"][extra]
    want, have = _requirements(declared), _file_requirements(requirements_file)
    where = "install_requires" if extra is None else f"extras_require {extra!r}"
    assert have == want, (
        f"{requirements_file} differs from setup.cfg's {where}: only in the file "
        f"{ {k: v for k, v in have.items() if want.get(k) != v} }, only in setup.cfg "
        f"{ {k: v for k, v in want.items() if have.get(k) != v} }"
    )


def test_torch_pin_of_install_sh_satisfies_setup_cfg():
    """launch/install.sh installs one exact torch first; setup.cfg's torch range must accept it, or the next
    pip call would swap it."""
    from packaging.specifiers import SpecifierSet

    lines = [ln for ln in (ROOT / "launch/install.sh").read_text().splitlines() if "pip install" in ln and "torch==" in ln]
    assert len(lines) == 1, f"expected one exact torch install in launch/install.sh, found {lines}"
    version = lines[0].split("torch==", 1)[1].split()[0]
    spec = SpecifierSet(_requirements(_options()["install_requires"])["torch"])
    assert version in spec, f"install.sh installs torch {version}, outside setup.cfg's torch{spec}"


def test_setup_cfg_configures_only_tools_the_project_runs():
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    allowed = {"metadata", "options", "options.packages.find", "options.extras_require", "options.entry_points",
               "tool:pytest"}
    assert set(parser.sections()) <= allowed, f"unexpected setup.cfg sections {set(parser.sections()) - allowed}"


def _console_scripts() -> list[tuple[str, str]]:
    scripts = _options().get("entry_points", {}).get("console_scripts", [])
    return [tuple(part.strip() for part in line.split("=", 1)) for line in scripts]


def test_console_scripts_are_declared():
    names = {name for name, _ in _console_scripts()}
    assert {"opr-report", "opr-evaluate", "opr-rescore"} <= names, f"console scripts: {sorted(names)}"


@pytest.mark.parametrize(("name", "target"), _console_scripts())
def test_console_script_target_prints_its_help(name, target, capsys):
    module, _, attr = target.partition(":")
    main = getattr(importlib.import_module(module), attr)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0, f"{name} ({target}) --help exited {exit_info.value.code}"
    assert capsys.readouterr().out.startswith("usage: "), f"{name} ({target}) printed no usage"


def test_python_dash_m_runs_the_report_package(tmp_path):
    """``python -m opr.tools.report`` goes through the package's __main__: a bad input exits 2 naming it."""
    missing = tmp_path / "no_such_runs"
    proc = subprocess.run([sys.executable, "-m", "opr.tools.report", str(missing), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"report input {str(missing)!r} does not exist" in proc.stderr
