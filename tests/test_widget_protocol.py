"""The threshold explorer driven the way JupyterLab drives it: a real kernel, the Jupyter widget
protocol (comm_open / comm_msg), a slider moved by a "frontend" message, the label updated in reply."""
import sys
import time

import pytest
from jupyter_client.manager import KernelManager

CODE = """
import torch
from hdkdlib.widgets import threshold_explorer
g = torch.Generator().manual_seed(0)
probs = torch.softmax(torch.randn(3, 200, 5, generator=g) * 3, 2)
y = torch.randint(0, 5, (200,), generator=g)
box = threshold_explorer(probs, y, [1.0, 2.0, 3.0], thresholds=[1.0, 1.0, float("-inf")])
"""


def _drain(kc, until_idle=True, timeout=60):
    messages, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except Exception:
            continue
        messages.append(msg)
        if until_idle and msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    return messages


@pytest.fixture
def kernel():
    km = KernelManager(kernel_name="python3")
    km.kernel_cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    yield kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def test_slider_update_from_the_frontend_updates_the_summary(kernel):
    kernel.execute(CODE)
    states, displays = {}, []  # the latest state of every widget model, as a frontend would hold it
    for m in _drain(kernel):
        if m["msg_type"] == "display_data":
            displays.append(m["content"]["data"])
        elif m["msg_type"] == "comm_open":
            states[m["content"]["comm_id"]] = dict(m["content"]["data"]["state"])
        elif m["msg_type"] == "comm_msg" and m["content"]["data"].get("method") == "update":
            states[m["content"]["comm_id"]].update(m["content"]["data"]["state"])
    sliders = [cid for cid, s in states.items() if s.get("_model_name") == "FloatSliderModel"]
    labels = [cid for cid, s in states.items() if "accuracy" in str(s.get("value", ""))]
    assert len(sliders) == 2 and len(labels) == 1
    assert "leaving per exit: 0% 0% 100%" in states[labels[0]]["value"]  # thresholds 1.0: all reach the end
    # one output, three views of it: the widget, a PNG of its state and the same line as text
    assert len(displays) == 1
    assert set(displays[0]) == {"application/vnd.jupyter.widget-view+json", "image/png", "text/plain"}
    assert "leaving per exit: 0% 0% 100%" in displays[0]["text/plain"]
    images = [cid for cid, s in states.items() if s.get("_model_name") == "ImageModel"]
    assert len(images) == 1

    msg = kernel.session.msg("comm_msg", {"comm_id": sliders[0],
                                          "data": {"method": "update", "state": {"value": 0.0}, "buffer_paths": []}})
    kernel.shell_channel.send(msg)
    replies = [m for m in _drain(kernel, timeout=30) if m["msg_type"] == "comm_msg"]
    updates = [m for m in replies if m["content"]["comm_id"] == labels[0]]
    assert updates, "the summary label did not update"
    assert "leaving per exit: 100% 0% 0%" in updates[-1]["content"]["data"]["state"]["value"]
    assert any(m["content"]["comm_id"] == images[0] for m in replies), "the histogram image did not update"


def test_a_headless_run_gets_the_picture_and_the_line_without_widgets(kernel):
    """papermill and nbconvert --execute ask with allow_stdin false: nobody can move a slider, so the explorer
    opens no widget (the executed notebook keeps no widget state) and its one output is the PNG and the line."""
    kernel.execute(CODE + "print(type(box).__name__, [s.min for s in box.sliders])", allow_stdin=False)
    messages = _drain(kernel)
    assert not [m for m in messages if m["msg_type"] == "comm_open"]
    displays = [m["content"]["data"] for m in messages if m["msg_type"] == "display_data"]
    assert len(displays) == 1 and set(displays[0]) == {"image/png", "text/plain"}
    assert "leaving per exit: 0% 0% 100%" in displays[0]["text/plain"]
    printed = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
    assert printed.strip() == "StaticExplorer [0.2, 0.2]"  # 5 classes: thresholds from 1/5
