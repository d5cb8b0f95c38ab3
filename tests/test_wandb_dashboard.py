"""The W&B dashboard builder (opr.tools.wandb_dashboard): the workspace and report objects offline (sections,
panels, metric names, grouping, filters), the metric names against what the logger really writes (a tiny
offline run), and the save calls against a local HTTP endpoint on 127.0.0.1 that answers W&B's GraphQL requests
and records them. Nothing here reaches a real W&B server."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

pytest.importorskip("wandb")
pytest.importorskip("wandb_workspaces")

import wandb_workspaces.reports.v2 as wr  # noqa: E402
import wandb_workspaces.workspaces as ws  # noqa: E402

from opr.run import run_experiment  # noqa: E402
from opr.tools import wandb_dashboard as D  # noqa: E402
from opr.tools.report.wandb_offline import wandb_records  # noqa: E402

TASKS = ("emotion", "arithmetic")


def _panel_metrics(panel) -> list[str]:
    """The metric names a panel reads (line y, bar metrics, media keys, table name)."""
    names: list = []
    for field in ("y", "metrics", "media_keys"):
        value = getattr(panel, field, None)
        names += list(value) if isinstance(value, list) else []
    if getattr(panel, "table_name", None):
        names.append(panel.table_name)
    for axis in ("x", "y"):  # the scatter plot's summary / config axes
        value = getattr(panel, axis, None)
        if isinstance(value, (wr.SummaryMetric, wr.Config)):
            names.append(value.name)
    return [n if isinstance(n, str) else n.name for n in names]


def _all_panels(workspace) -> list:
    return [p for s in workspace.sections for p in s.panels]


def test_workspace_has_the_sections_panels_and_grouping():
    w = D.build_workspace("ent", "proj", group="sweep1", tasks=TASKS)
    assert (w.entity, w.project, w.name) == ("ent", "proj", D.DEFAULT_NAME)
    assert [s.name for s in w.sections] == list(D.SECTIONS)
    by_section = {s.name: s.panels for s in w.sections}

    final = by_section["Final OP / BWT / FWT"]
    assert [p.metrics for p in final if isinstance(p, wr.BarPlot)] == [["final/OP"], ["final/BWT"], ["final/FWT"]]
    scatter = next(p for p in final if isinstance(p, wr.ScatterPlot))
    assert (scatter.x.name, scatter.y.name) == ("budget", "final/BWT")

    forgetting = by_section["Forgetting curves"]
    assert [p.y for p in forgetting[:2]] == [["by_stage/eval/emotion"], ["by_stage/eval/arithmetic"]]
    assert forgetting[2].metric_regex == "^by_stage/general/.*"
    assert all(p.x == "stage" for p in forgetting)

    matrix = by_section["Accuracy matrix"]
    assert _panel_metrics(matrix[0]) == ["final/accuracy_matrix"] and matrix[1].media_keys == ["final/accuracy_heatmap"]

    drift = {m for p in by_section["Drift and diagnostics"] for m in _panel_metrics(p)}
    assert "by_stage/drift/param/rel_fro/all" in drift and "by_stage/diagnostics/kl_base" in drift
    assert all(p.x == "stage" for p in by_section["Drift and diagnostics"])

    inside = by_section["Learning inside each stage"]
    assert [p.y for p in inside] == [["inside/emotion"], ["inside/arithmetic"]] and all(p.x == "Step" for p in inside)

    # seeds aggregated: runs grouped by method and budget, every line / bar shows the mean and the seeds' std
    assert [g.name for g in w.runset_settings.groupby] == ["method.name", "budget"]
    assert all(isinstance(g, ws.Config) for g in w.runset_settings.groupby)
    for p in _all_panels(w):
        if isinstance(p, (wr.LinePlot, wr.BarPlot)):
            assert (p.groupby_aggfunc, p.groupby_rangefunc) == ("mean", "stddev"), p.title
    # only the runs of the W&B group
    assert w.runset_settings.filters == """Metric("Group") == 'sweep1'"""  # wandb-workspaces keeps it as text


def test_without_tasks_one_panel_reads_every_task_and_without_group_no_filter():
    w = D.build_workspace("ent", "proj")
    by_section = {s.name: s.panels for s in w.sections}
    (every, general) = by_section["Forgetting curves"]
    assert every.metric_regex == "^by_stage/eval/.*" and not every.y
    (inside,) = by_section["Learning inside each stage"]
    assert inside.metric_regex == "^inside/.*"
    assert not w.runset_settings.filters


def test_report_has_one_grid_per_section_over_the_same_grouped_runs():
    r = D.build_report("ent", "proj", group="sweep1", tasks=TASKS)
    grids = [b for b in r.blocks if isinstance(b, wr.PanelGrid)]
    headings = [b.text for b in r.blocks if isinstance(b, wr.H2)]
    assert headings == list(D.SECTIONS) and len(grids) == len(D.SECTIONS)
    for grid, (section, panels) in zip(grids, D.section_panels(wr, TASKS).items()):
        assert [_panel_metrics(p) for p in grid.panels] == [_panel_metrics(p) for p in panels], section
        (runset,) = grid.runsets
        assert (runset.entity, runset.project, list(runset.groupby)) == ("ent", "proj", ["method.name", "budget"])
        assert runset.filters == """Metric("Group") == 'sweep1'"""


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--entity", "a/b", "--project", "p"], "--entity 'a/b'"),
        (["--entity", "e", "--project", ""], "--project ''"),
        (["--entity", "e", "--project", "p", "--group", " "], "--group ' '"),
        (["--entity", "e", "--project", "p", "--tasks", "emotion,emotion"], "emotion given twice"),
        (["--entity", "e", "--project", "p", "--tasks", "emotion,top ic"], "'top ic' is no task name"),
    ],
)
def test_bad_arguments_are_refused_naming_the_value(argv, needle, capsys):
    assert D.main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert needle in err and ("allowed" in err or "give" in err or "each task once" in err or "has no '/'" in err)


def test_dry_run_prints_the_panels_and_contacts_nobody(capsys, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: a request would fail
    assert D.main(["--entity", "e", "--project", "p", "--tasks", "emotion", "--report", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "by_stage/eval/emotion" in out and "inside/emotion" in out and "6 panel grids" in out


# ------------------------------------------------------------------------------------------ names the logger writes
@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY",
                "WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_TAGS", "WANDB_NAME", "RANK", "SLURM_PROCID",
                "WANDB_BASE_URL", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))
    return tmp_path


def test_every_metric_the_dashboard_reads_is_one_the_logger_writes(tiny_cfg, wandb_env):
    """A tiny offline run with in-stage evaluation, drift and diagnostics: each concrete metric name of the
    dashboard is in its history or summary, each regex matches a logged metric, the grouping keys are in its
    config."""
    run_dir = wandb_env / "run"
    run_experiment(tiny_cfg("method=vanilla_replay", "budget=0.2", "logger=wandb", "checkpoint.save=false",
                            "eval.every_steps=2"))
    tasks = json.loads((run_dir / "results.json").read_text())["tasks"]
    (wandb_file,) = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    records = wandb_records(wandb_file)
    logged = {k for r in records if r["type"] == "history" for k in r["history"]["item"]}
    summary = {k for r in records if r["type"] == "summary" for k in (r["summary"].get("update") or {})}
    config = next(r["run"]["config"]["update"] for r in records if r["type"] == "run")

    def written(name: str) -> bool:  # a media key shows in the summary as its fields: name.path, name._type ...
        return name in logged or name in summary or any(k.startswith(name + ".") for k in summary)

    workspace = D.build_workspace("ent", "proj", tasks=tasks)
    missing = [m for p in _all_panels(workspace) for m in _panel_metrics(p)
               if m not in ("budget",) and not written(m)]
    assert not missing, f"the dashboard reads metrics the logger never wrote: {missing}"
    regexes = [p.metric_regex for p in _all_panels(D.build_workspace("ent", "proj")) if getattr(p, "metric_regex", None)]
    assert regexes and all(any(re.match(rx, k) for k in logged) for rx in regexes), regexes
    for key in D.GROUP_BY:  # the nested config as W&B stores it
        node = config
        for part in key.split("."):
            node = node[part]
        assert node is not None, key
    assert "stage" in logged  # the x-axis of the stage panels


# ------------------------------------------------------------------------------------------ saving
class _Recorder(BaseHTTPRequestHandler):
    """Answers the GraphQL requests that saving a workspace and a report makes (the viewer, the entity's
    projects, a project's internal id, upsertView), records each one, and refuses anything else with 400 so that a new request shows up
    as a failure."""

    requests: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.requests.append({"path": self.path, "method": "GET"})
        self._send(404, {"error": f"no GET {self.path} here"})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/sdk/otel/"):  # wandb-core's own telemetry: not part of the save
            self._send(200, {})
            return
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"unparsed": raw[:200].decode("utf-8", "replace")}
        query, variables = body.get("query", ""), body.get("variables") or {}
        self.requests.append({"path": self.path, "query": query, "variables": variables,
                              "auth": self.headers.get("Authorization", "")})
        if "viewer" in query:
            data = {"viewer": {"id": "VXNlcjox", "entity": "ent", "username": "tester", "email": "t@example.org",
                               "flags": "{}", "teams": {"edges": []}, "admin": False}}
        elif "GetProjects" in query:
            node = {"__typename": "Project", "id": "UHJvamVjdDox", "name": "proj", "entityName": "ent",
                    "createdAt": "2026-01-01T00:00:00", "isBenchmark": False,
                    "user": {"id": "VXNlcjox", "name": "tester", "username": "tester", "email": "t@example.org",
                             "admin": False, "flags": "{}", "entity": "ent", "deletedAt": None,
                             "apiKeys": {"edges": []}, "teams": {"edges": []}}}
            data = {"models": {"pageInfo": {"__typename": "PageInfo", "endCursor": None, "hasNextPage": False},
                               "edges": [{"node": node}]}}
        elif "ProjectInternalId" in query:  # a report's run set names its project by id
            data = {"project": {"id": "UHJvamVjdDox", "internalId": "1"}}
        elif "upsertView" in query:
            view = {"id": "Vmlldzox", "name": variables.get("name") or "view1", "type": variables.get("type"),
                    "displayName": variables.get("displayName") or "", "description": variables.get("description") or "",
                    "spec": variables.get("spec"), "updatedAt": "2026-01-01T00:00:00",
                    "project": {"id": "UHJvamVjdDox", "name": variables.get("projectName"),
                                "entityName": variables.get("entityName")}}
            data = {"upsertView": {"view": view, "inserted": True}}
        else:
            self._send(400, {"errors": [{"message": f"the test server does not answer {query[:80]!r}"}]})
            return
        self._send(200, {"data": data})


@pytest.fixture
def recording_server(wandb_env, monkeypatch):
    """A local W&B stand-in on 127.0.0.1: at most 200 requests or 120 s, then it stops by itself."""
    _Recorder.requests = []
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    server.timeout = 0.2
    deadline = time.monotonic() + 120
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set() and time.monotonic() < deadline and len(_Recorder.requests) < 200:
            server.handle_request()  # returns after one request or 0.2 s without any
        server.server_close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_MODE", "online")
    yield url, _Recorder.requests
    import wandb

    wandb.teardown()  # the wandb-core service that carried the requests, with this server's address in it
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_saving_posts_the_workspace_and_the_report(recording_server, capsys):
    url, requests = recording_server
    rc = D.main(["--entity", "ent", "--project", "proj", "--group", "sweep1", "--tasks", "emotion,arithmetic",
                 "--report"])
    out = capsys.readouterr().out
    assert rc == 0, out
    upserts = [r for r in requests if "upsertView" in r.get("query", "")]
    assert len(upserts) == 2, [r.get("query", "")[:60] for r in requests]
    assert all(r["auth"] for r in upserts)  # the API key went along

    workspace, report = upserts
    assert workspace["variables"]["type"] == "project-view"
    assert (workspace["variables"]["entityName"], workspace["variables"]["projectName"]) == ("ent", "proj")
    assert workspace["variables"]["displayName"] == D.DEFAULT_NAME
    spec = workspace["variables"]["spec"]
    for metric in ("by_stage/eval/emotion", "by_stage/eval/arithmetic", "final/OP", "final/BWT", "final/FWT",
                   "inside/emotion", "final/accuracy_matrix", "by_stage/drift/param/rel_fro/all"):
        assert metric in spec, metric
    groupby = json.loads(spec)["section"]["runSets"][0]["grouping"]
    # config keys in W&B's stored form: each top-level key holds its value under "value"
    assert [(g["section"], g["name"]) for g in groupby] == [("config", "method.value.name"), ("config", "budget.value")]
    assert "sweep1" in json.dumps(json.loads(spec)["section"]["runSets"][0]["filters"])
    assert [s for s in D.SECTIONS if s not in spec] == []

    assert report["variables"]["type"] == "runs" and report["variables"]["projectName"] == "proj"
    report_spec = report["variables"]["spec"]
    assert "by_stage/eval/emotion" in report_spec and "sweep1" in report_spec
    assert f"workspace: {url}/ent/proj" in out and f"report: {url}/ent/proj/reports/" in out
