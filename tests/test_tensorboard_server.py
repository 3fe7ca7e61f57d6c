"""The real ``tensorboard`` program serves what the callback logged.

The quickstart (1 epoch) writes a log folder; ``python -m tensorboard.main`` serves it on
127.0.0.1 and its HTTP API must list our scalar, histogram, image and text tags and load the
custom-scalars layout. The server is always stopped.
"""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from test_examples import run_quickstart

pytest.importorskip("tensorboard")

TIMEOUT_S = 60.0
# No proxy, whatever the environment says: the server is local.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(base: str, path: str):
    with _OPENER.open(base + path, timeout=10) as resp:
        return json.loads(resp.read().decode("utf-8"))


def poll(base: str, path: str, ready, deadline: float):
    """GET ``path`` until ``ready(payload)`` holds (the server loads event files lazily)."""
    last = None
    while time.monotonic() < deadline:
        try:
            last = get_json(base, path)
            if ready(last):
                return last
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{path}: not ready within {TIMEOUT_S:g} s; last answer: {last!r}")


def tags_of(payload) -> set:
    """Tags over all runs, for the {run: {tag: ...}} and {run: [tag, ...]} answer formats."""
    out = set()
    for run_tags in payload.values():
        out.update(run_tags)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    res, logdir = run_quickstart(tmp_path_factory)
    assert res.returncode == 0, res.stderr[-3000:]
    port = free_port()
    log = open(logdir.parent / "tensorboard.log", "w")  # noqa: SIM115 (open while the server runs; closed at teardown)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast=false", "--reload_interval", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}", time.monotonic() + TIMEOUT_S, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_tensorboard_serves_our_tags(server):
    base, deadline, proc = server
    layers = ("fc1", "fc2", "out")
    scalars = poll(base, "/data/plugin/scalars/tags", lambda p: "ww/summary/alpha" in tags_of(p), deadline)
    tags = tags_of(scalars)
    assert {f"ww/alpha/{l}" for l in layers} | {f"ww/phase/{l}" for l in layers} <= tags
    hist = poll(base, "/data/plugin/histograms/tags", lambda p: bool(tags_of(p)), deadline)
    assert {f"ww/esd/{l}" for l in layers} <= tags_of(hist)
    images = poll(base, "/data/plugin/images/tags", lambda p: bool(tags_of(p)), deadline)
    assert "ww/plots/alpha_per_layer" in tags_of(images) and "ww/plots/phases" in tags_of(images)
    assert any(t.startswith("ww/plots/esd/") for t in tags_of(images))
    text = poll(base, "/data/plugin/text/tags", lambda p: bool(tags_of(p)), deadline)
    assert any(t.startswith("ww/layers") for t in tags_of(text))
    assert proc.poll() is None  # still serving

    # the values themselves are served, at the snapshot steps
    (run,) = scalars
    q = urllib.parse.urlencode({"run": run, "tag": "ww/summary/alpha"})
    points = get_json(base, f"/data/plugin/scalars/scalars?{q}")
    assert [p[1] for p in points] == [0, 23]  # [wall_time, step, value]: baseline and final snapshot

    layout = poll(base, "/data/plugin/custom_scalars/layout", lambda p: bool(p), deadline)
    categories = {c["title"]: c for c in layout["category"]}
    assert {"ww per-layer", "ww summary"} <= set(categories)
    charts = {chart["title"] for chart in categories["ww per-layer"]["chart"]}
    assert {"alpha", "phase"} <= charts
