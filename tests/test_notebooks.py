"""Notebook hygiene and the papermill contract (parameters cell, type checks, figures)."""
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from hdkdlib.notebook import check_parameters

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))


def test_notebooks_exist_and_are_ordered():
    """01..06 in story order: each file's number is its place, with no gap and no repeat."""
    names = [p.name for p in NOTEBOOKS]
    assert [int(n[:2]) for n in names] == list(range(1, len(names) + 1))
    assert names[:3] == ["01_toy_dense_kd.ipynb", "02_multi_exit_models.ipynb", "03_cifar100.ipynb"]
    assert len(names) == 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path):
    """Committed without volatile outputs or widget state (`make strip` fixes a dirty one)."""
    result = subprocess.run([Path(sys.executable).parent / "nbstripout", "--keep-count", "--verify", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{path.name} carries outputs or metadata nbstripout would strip: run `make strip`"
    assert "application/vnd.jupyter.widget-state+json" not in path.read_text()
    counted = [i for i, c in enumerate(nbformat.read(path, as_version=4).cells)
               if c.cell_type == "code" and not c.outputs and c.execution_count is not None]
    assert not counted, f"{path.name}: unrun cells {counted} show execution counts: run `make strip`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_one_parameters_cell_followed_by_the_check(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'"
    declared = pm.inspect_notebook(str(path))
    assert declared, "the parameters cell declares nothing"
    assert all(p["inferred_type_name"] != "None" for p in declared.values()), "declare every parameter's type"
    assert "set_up(globals()" in nb.cells[tagged[0] + 1].source  # check_parameters, first thing after it


def test_check_parameters_accepts_right_types_and_names_the_wrong_one():
    ns = {"__annotations__": {"epochs": int, "lr": float, "method": str, "fast": bool},
          "epochs": 3, "lr": 1, "method": "hdkd", "fast": True}
    assert check_parameters(ns) == {"epochs": 3, "lr": 1.0, "method": "hdkd", "fast": True}
    assert isinstance(ns["lr"], float)
    with pytest.raises(TypeError, match="parameter 'epochs' must be int, got str '3x'"):
        check_parameters({**ns, "epochs": "3x"})
    with pytest.raises(TypeError, match="parameter 'epochs' must be int, got bool"):
        check_parameters({**ns, "epochs": True})
    with pytest.raises(ValueError, match="parameter 'method' is 'foo'; valid values: ce, hdkd"):
        check_parameters({**ns, "method": "foo"}, choices={"method": ("ce", "hdkd")})
    # a misspelt name (papermill -p epoch 300) is refused, listing what the notebook declares; imports are not
    with pytest.raises(NameError, match="unknown parameter 'epoch': this notebook declares epochs, lr, method, fast"):
        check_parameters({**ns, "epoch": 300, "pd": pytest, "In": [], "_": 3})
    assert check_parameters({**ns, "pd": pytest, "check_parameters": check_parameters, "In": [""], "Out": {}})


@pytest.mark.parametrize("name,parameter,value,message", [
    ("03_cifar100.ipynb", "method", "hdkdd", "parameter 'method' is 'hdkdd'; valid values: ce, dbt"),
    ("01_toy_dense_kd.ipynb", "steps", "many", "parameter 'steps' must be int, got str 'many'"),
    ("04_imagenet.ipynb", "seed", "1.5", "parameter 'seed' must be int, got float 1.5"),
    ("05_ablations.ipynb", "methods", "ce,foo", "parameter 'methods': unknown ['foo']"),
    ("06_exit_thresholds.ipynb", "method", "x", "parameter 'method' is 'x'"),
    ("03_cifar100.ipynb", "epoch", "300", "unknown parameter 'epoch': this notebook declares epochs, method"),
])
def test_bad_parameters_stop_at_the_check_cell(tmp_path, name, parameter, value, message):
    out = tmp_path / "out.ipynb"
    result = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / name), str(out),
                             "--cwd", str(ROOT / "notebooks"), "-p", parameter, value],
                            capture_output=True, text=True, env={**os.environ, "HDKD_RUNS": str(tmp_path / "runs")})
    assert result.returncode != 0 and message in result.stdout + result.stderr
    cells = [c for c in json.loads(out.read_text())["cells"]  # without papermill's own error-marker cells
             if "papermill-error-cell-tag" not in c["metadata"].get("tags", [])]
    failed = [i for i, c in enumerate(cells) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    tagged = [i for i, c in enumerate(cells) if "injected-parameters" in c["metadata"].get("tags", [])]
    assert failed == [tagged[0] + 1]  # the first cell after the parameters: nothing ran before the check


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Notebooks 01, 03 and 06 executed by papermill as `make run` does (quick parameters where they exist;
    notebook 01 with three given, as a user would; 06's real early exit on 700 of its 1,500 test points)."""
    tmp = tmp_path_factory.mktemp("executed")
    env = {**os.environ, "HDKD_RUNS": str(tmp / "runs"), "HDKD_FIGURES": str(tmp / "figures")}
    out = {}
    for name, params in (("01_toy_dense_kd.ipynb", ["-p", "seed", "3", "-p", "steps", "60", "-p", "n_points", "900"]),
                         ("03_cifar100.ipynb", []),
                         ("06_exit_thresholds.ipynb", ["-p", "steps", "200", "-p", "early_exit_images", "700"])):
        out[name] = tmp / name
        result = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / name), str(out[name]),
                                 "--cwd", str(ROOT / "notebooks"), *params], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_papermill_runs_toy_notebook_with_a_parameter_and_writes_figures(executed):
    figures = {p.name for p in (executed["01_toy_dense_kd.ipynb"].parent / "figures").iterdir()}
    assert {"01_toy_dense_kd.png", "01_toy_dense_kd.svg", "01_toy_weights.png"} <= figures
    notebook = json.loads(executed["01_toy_dense_kd.ipynb"].read_text())
    injected = [c for c in notebook["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert "seed = 3" in "".join(injected[0]["source"])


def test_executed_notebooks_hold_no_machine_paths_or_echoed_values(executed):
    """No output names a folder of this machine (the checkout, the runs folder, the home folder) or echoes a
    return value such as the paths plots.save returns."""
    machine = [str(ROOT), str(Path.home()), str(next(iter(executed.values())).parent)]
    for name, path in executed.items():
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            for output in cell.get("outputs", []):
                text = json.dumps({k: v for k, v in output.get("data", {}).items() if not k.startswith("image/")}) \
                    + "".join(output.get("text", ""))
                assert "PosixPath(" not in text, f"{name} cell {i} echoes a path: {text[:200]}"
                for folder in machine:
                    assert folder not in text, f"{name} cell {i} names the machine folder {folder}: {text[:300]}"


def test_notebook_06_real_early_exit_on_the_leading_test_images_matches_the_simulation(executed):
    """The real early exit runs on the first early_exit_images test points, compared with the simulated protocol
    on the same ones: a slice that missed its predictions would show "False" or another cost."""
    notebook = json.loads(executed["06_exit_thresholds.ipynb"].read_text())
    (cell,) = [c for c in notebook["cells"] if "leading_inputs(" in "".join(c["source"])]
    table = "".join(cell["outputs"][-1]["data"]["text/html"])  # the text form wraps at the display width
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>\s*<th>\d+</th>(.*?)</tr>", table, re.S)]
    assert len(rows) == 5 and all(len(r) == 5 for r in rows), table
    for p, expected, spent, same, _ in rows:
        assert same == "True" and float(spent) == pytest.approx(float(expected), abs=0.011), table


def _explorer_outputs(notebook: dict) -> list:
    return [o for c in notebook["cells"] if "threshold_explorer(val_probs" in "".join(c["source"])
            for o in c.get("outputs", [])]


def test_executed_notebook_06_keeps_the_explorer_as_one_picture_without_widget_state(executed):
    """papermill's output: nobody could move a slider, so the explorer's one output is its PNG and its line, and
    the notebook holds no widget state (a live front end is the only one that would use it)."""
    import base64

    notebook = json.loads(executed["06_exit_thresholds.ipynb"].read_text())
    outputs = _explorer_outputs(notebook)
    assert len(outputs) == 1 and outputs[0]["output_type"] == "display_data"
    data = outputs[0]["data"]
    assert set(data) == {"image/png", "text/plain"}
    assert base64.b64decode(data["image/png"])[:4] == b"\x89PNG"
    assert re.search(r"accuracy \d+\.\d\d% \| mean cost [\d.]+ k?FLOPs", "".join(data["text/plain"]))
    assert "widgets" not in notebook["metadata"]


def test_notebook_06_as_static_html_shows_the_explorer_picture_offline(executed, tmp_path):
    """nbconvert's HTML of the executed notebook shows the explorer's PNG as an <img> of the page itself, and
    loads no widget renderer from a CDN (offline it would show nothing)."""
    import html.parser

    notebook = json.loads(executed["06_exit_thresholds.ipynb"].read_text())
    (tmp_path / "06.ipynb").write_text(json.dumps(notebook))
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", str(tmp_path / "06.ipynb")],
                   check=True, capture_output=True)
    picture = _explorer_outputs(notebook)[0]["data"]["image/png"]

    class Views(html.parser.HTMLParser):  # the explorer's views in the page: its PNG as an <img>, its widget view
        def __init__(self):
            super().__init__()
            self.png = self.widget = 0

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.png += tag == "img" and (attrs.get("src") or "").endswith(picture)
            self.widget += tag == "script" and attrs.get("type") == "application/vnd.jupyter.widget-view+json"

    views = Views()
    page = (tmp_path / "06.html").read_text()
    views.feed(page)
    assert (views.png, views.widget) == (1, 0)
    assert "html-manager" not in page  # no widget renderer to fetch


def test_jupyterlab_settings_are_installed_and_name_real_settings():
    """Our JupyterLab settings (saving widget state) are installed in this environment by `make env`, and each
    names a setting the installed extension declares, with a value of its type: JupyterLab ignores a typo."""
    from jupyter_core.paths import jupyter_path

    ours = ROOT / "notebooks" / "jupyterlab-settings" / "hdkdlib.json"
    installed = Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.d" / "hdkdlib.json"
    assert installed.is_file() and installed.read_text() == ours.read_text(), "run `make lab-settings`"
    types = {bool: "boolean", int: "integer", str: "string", float: "number"}
    for plugin, values in json.loads(ours.read_text()).items():
        package, name = plugin.split(":")
        schemas = [Path(p) / package / "schemas" / package / f"{name}.json" for p in jupyter_path("labextensions")]
        schema = json.loads(next(p for p in schemas if p.is_file()).read_text())
        for key, value in values.items():
            assert schema["properties"][key]["type"] == types[type(value)], (plugin, key)


def test_use_idle_cores_sets_torch_threads_to_the_idle_cores(monkeypatch):
    import torch

    from hdkdlib import distributed, notebook
    before = torch.get_num_threads()
    try:
        with distributed.cpu_threads(2):
            monkeypatch.setattr(distributed, "idle_cores", lambda seconds=0.2: 0.7)  # one core busy of two
            assert notebook.use_idle_cores() == 1 and torch.get_num_threads() == 1
            torch.set_num_threads(2)
            monkeypatch.setattr(distributed, "idle_cores", lambda seconds=0.2: 6.0)  # never above torch's default
            assert notebook.use_idle_cores() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_picks_its_threads_after_the_check(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])][0]
    assert "set_up(globals()" in nb.cells[tagged + 1].source  # set_up calls use_idle_cores


def test_executed_notebooks_store_one_progress_line_per_bar(executed):
    """A progress bar in a notebook is one plain-text output updated in place (hdkdlib.progress): papermill
    stores its final state, one line per bar, never one stderr output per refresh (a pink box in JupyterLab,
    ninety lines in an exported notebook)."""
    bars = {"01_toy_dense_kd.ipynb": 3, "03_cifar100.ipynb": 1, "06_exit_thresholds.ipynb": 1}  # methods, epochs, fits
    for name, path in executed.items():
        lines = []
        for cell in json.loads(path.read_text())["cells"]:
            for output in cell.get("outputs", []):
                text = "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
                if re.search(r"\d+%\|", text):
                    assert output["output_type"] == "display_data", f"{name}: a bar written as a stream: {text[:200]}"
                    lines.append(text)
                assert output.get("name") != "stderr", f"{name}: stderr output {text[:200]}"
        assert len(lines) == bars[name], f"{name}: {len(lines)} progress outputs: {lines[:5]}"
        assert all("100%|" in line and "\n" not in line.strip() for line in lines), lines


def test_tables_report_accuracy_in_percent_with_exits_numbered_from_one():
    """Every notebook's accuracy table is in percent, its columns saying so, the exits numbered 1..K: a reader
    never meets "top1 1.0" meaning 1% in one notebook and 100% in the next."""
    import torch

    from hdkdlib import evaluation
    from hdkdlib.notebook import accuracy_by_exit, anytime_table, budget_table

    g = torch.Generator().manual_seed(0)
    probs, y = torch.softmax(3 * torch.randn(3, 400, 10, generator=g), 2), torch.randint(0, 10, (400,), generator=g)
    flops = [2e6, 4e6, 6e6]
    rows = evaluation.anytime(probs, y, flops)
    table = anytime_table(rows)
    assert list(table.index) == [1, 2, 3] and table.index.name == "exit"
    assert list(table.columns) == ["MFLOPs", "top-1 (%)", "top-5 (%)"]
    assert table["top-1 (%)"].tolist() == [round(100 * r["top1"], 2) for r in rows]
    assert table["top-5 (%)"].tolist() == [round(100 * r["top5"], 2) for r in rows]
    assert table["MFLOPs"].tolist() == [2.0, 4.0, 6.0]
    assert list(anytime_table(evaluation.anytime(probs, y, [2e3, 4e3, 6e3])).columns)[0] == "kFLOPs"  # a toy's cost

    curve = evaluation.budgeted(probs, y, probs, y, flops)
    budget = budget_table(curve, every=4)
    assert list(budget.columns) == ["MFLOPs/img", "accuracy (%)"] and budget.index.name == "p"
    assert budget["accuracy (%)"].tolist() == [round(100 * r["accuracy"], 2) for r in curve[::4]]

    by_exit = accuracy_by_exit({"ce": [0.5, 0.75], "hdkd": [0.6, 1.0]})
    assert list(by_exit.columns) == [1, 2] and "(%)" in by_exit.columns.name
    assert by_exit.loc["hdkd"].tolist() == [60.0, 100.0]
