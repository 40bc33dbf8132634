"""Notebook hygiene and the papermill contract (parameters cell, type checks, figures)."""
import json
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


def _run(tmp_path, **parameters):
    env = {**os.environ, "HDKD_FIGURES": str(tmp_path / "figures")}
    out = tmp_path / "out.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "01_toy_dense_kd.ipynb"), str(out),
           "--cwd", str(ROOT / "notebooks")]
    for k, v in parameters.items():
        cmd += ["-p", k, str(v)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env), out


def test_papermill_wrong_type_fails_naming_the_parameter(tmp_path):
    result, out = _run(tmp_path, steps="many")
    assert result.returncode != 0
    assert "parameter 'steps' must be int, got str 'many'" in result.stderr + result.stdout
    assert not (tmp_path / "figures").exists() or not any((tmp_path / "figures").iterdir())


def test_papermill_runs_toy_notebook_with_a_parameter_and_writes_figures(tmp_path):
    result, out = _run(tmp_path, seed=3, steps=60, n_points=900)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"01_toy_dense_kd.png", "01_toy_dense_kd.svg", "01_toy_weights.png"} <= figures
    executed = json.loads(out.read_text())
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert "seed = 3" in "".join(injected[0]["source"])


@pytest.mark.parametrize("name,parameter,value,message", [
    ("03_cifar100.ipynb", "method", "hdkdd", "parameter 'method' is 'hdkdd'; valid values: ce, dbt"),
    ("03_cifar100.ipynb", "epochs", "ten", "parameter 'epochs' must be int, got str 'ten'"),
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
    """Notebooks 01, 03 and 06 executed by papermill as `make run` does (quick parameters where they exist)."""
    tmp = tmp_path_factory.mktemp("executed")
    env = {**os.environ, "HDKD_RUNS": str(tmp / "runs"), "HDKD_FIGURES": str(tmp / "figures")}
    out = {}
    for name, params in (("01_toy_dense_kd.ipynb", ["-p", "steps", "100"]), ("03_cifar100.ipynb", []),
                         ("06_exit_thresholds.ipynb", ["-p", "steps", "200"])):
        out[name] = tmp / name
        result = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / name), str(out[name]),
                                 "--cwd", str(ROOT / "notebooks"), *params], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    return out


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


def test_notebook_06_as_static_html_shows_the_explorer_state(executed, tmp_path):
    """nbconvert's HTML of the executed notebook, read without running any script (GitHub, an e-mailed report):
    the explorer's histogram is an <img> and its numbers are text, beside the note saying to run the cells."""
    import html.parser
    import re

    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--output-dir", str(tmp_path),
                    str(executed["06_exit_thresholds.ipynb"])], check=True, capture_output=True)
    page = (tmp_path / "06_exit_thresholds.html").read_text()

    class Visible(html.parser.HTMLParser):  # what a browser shows with scripts off: everything outside <script>
        def __init__(self):
            super().__init__()
            self.depth, self.images, self.text, self.in_copy = 0, [], [], 0

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.depth += tag == "script"
            if self.depth == 0 and "hdkd-static-copy" in (attrs.get("class") or ""):
                self.in_copy += 1
            if self.depth == 0 and self.in_copy and tag == "img":
                self.images.append(attrs.get("src", ""))

        def handle_endtag(self, tag):
            self.depth -= tag == "script"

        def handle_data(self, data):
            if self.depth == 0 and self.in_copy:
                self.text.append(data)

    seen = Visible()
    seen.feed(page)
    assert seen.images and seen.images[0].startswith("data:image/png;base64,")
    text = " ".join(seen.text)
    assert re.search(r"accuracy \d+\.\d\d% \| mean cost [\d.]+ k?FLOPs", text), text[:300]
    assert "run the notebook's cells to use the sliders" in text


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
