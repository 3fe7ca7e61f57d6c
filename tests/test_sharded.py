"""Sharded weights, real 2-process gloo runs on CPU: FSDP2 ``fully_shard``, tensor parallel
(``parallelize_module``), a 2-D mesh (FSDP2 x TP), FSDP1 and DeepSpeed ZeRO-3, all in one process
group (tests/_sharded_runs.py). Each is compared with an unsharded replica holding the same weights:
the per-layer results (every metric, eigenvalues) agree to 1e-10, every layer is logged once per
snapshot, and the per-layer gather never holds more than one layer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_callback import read_events, scalar_steps

pytest.importorskip("peft")

HERE = Path(__file__).resolve().parent
STEPS = [0, 1]
#: What each strategy's selection holds (the Zoo model with a LoRA layer, or the MLP under TP),
#: and its frozen matrices (analysed at the first snapshot, carried forward after).
ZOO_LAYERS = 18
MLP_LAYERS = 6
ZOO_FROZEN = ["base_model.model.conv", "base_model.model.proj"]  # the LoRA base weight is `proj`
MLP_FROZEN = ["up2"]


def _checkout_path() -> str:
    import ww_monitor

    root = os.path.dirname(os.path.dirname(os.path.abspath(ww_monitor.__file__)))
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every strategy, one process group: ``{strategy: (rank-0 report, rank-1 report)}`` and the output folder."""
    out = tmp_path_factory.mktemp("sharded")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=_checkout_path())
    res = subprocess.run([sys.executable, str(HERE / "_sharded_runs.py"), str(out)], capture_output=True, text=True,
                         timeout=400, env=env, cwd=out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    reports = {}
    for name in STRATEGIES:
        reports[name] = tuple(json.loads((out / f"{name}.rank{r}.json").read_text()) for r in (0, 1))
    return reports, out


def _report(runs, strategy):
    reports, _ = runs
    r0, r1 = reports[strategy]
    if "unavailable" in r0:
        pytest.skip(f"{strategy}: {r0['unavailable']}")
    for r in (r0, r1):
        assert "error" not in r, r["error"]
    return r0, r1


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= 1e-10 * max(1.0, abs(b))


def _check_snapshot(r0, r1, n_layers, frozen, planned):
    c0, c1 = r0["collect"], r1["collect"]
    assert len(c0["reference"]) == n_layers
    assert c0["owners"] == c1["owners"] and sorted(c0["owners"]) == c0["reference"]  # every layer, one owner
    if planned:  # ownership known before anything is gathered, and the unsharded model's
        assert c0["owners_before_gather"] == c0["owners"] == c0["plain_owners"]
        assert c1["owners_before_gather"] == c1["owners"]
        # a copy failing on one rank: it walks on through every gather, then raises
        assert (c0["failed_copy"], c1["failed_copy"]) == ("copy failed", "no error")
        for c in (c0, c1):  # frozen matrices carried forward: not owned, their layers not gathered
            assert c["frozen"] == frozen and sorted(c["walked_without_frozen"]) == c["mine_without_frozen"]
            assert c["gathers_without_frozen"] < c["gathers"]
    for rank, c in enumerate((c0, c1)):
        assert c["mine"] == sorted(n for n, r in c["owners"].items() if r == rank)
        assert c["mine"], "both ranks own layers"
        assert c["unequal_weights"] == []  # the snapshot holds the full weights, exactly
        assert c["analysed"] == c["mine"] and c["result_mismatches"] == []  # every metric and eigenvalue
        assert c["model_unchanged"]  # same parameters, placements and local shards afterwards
    assert sorted(c0["mine"] + c1["mine"]) == c0["reference"]


def _check_memory(r0, r1):
    for c in (r0["collect"], r1["collect"]):
        assert 0 < c["peak_bytes"] <= c["largest_layer_bytes"] < c["model_bytes"] / 2
        assert c["live_bytes"] == 0  # nothing materialised outlives the walk


def _check_histories(got: dict, want: dict, steps: list[int], n_layers: int, frozen: list[str],
                     prefix: str = "") -> None:
    """The sharded run's history is the replica's: same snapshots, layers and values (to 1e-10);
    the frozen layers only at the first snapshot."""
    assert got["steps"] == want["steps"] == steps
    assert got["layers"] == [prefix + n for n in want["layers"]] and len(want["layers"]) == n_layers
    first, *later = got["records"]
    assert first["layers"] == got["layers"]
    assert all(rec["layers"] == [n for n in got["layers"] if n not in [prefix + f for f in frozen]] for rec in later)
    for got_rec, want_rec in zip(got["records"], want["records"]):
        assert got_rec["layers"] == [prefix + n for n in want_rec["layers"]]
        for layer, a, b in zip(got_rec["layers"], got_rec["values"], want_rec["values"]):
            assert all(_same(x, y) for x, y in zip(a, b)), (layer, a, b)


def _rows(history: dict) -> int:
    return sum(len(rec["layers"]) for rec in history["records"])


def _check_logged_once(logdir, history: dict) -> None:
    """Each layer logged once at every snapshot that analysed it (the history's records)."""
    acc = read_events(logdir)
    for layer in history["layers"]:
        steps = [rec["step"] for rec in history["records"] if layer in rec["layers"]]
        assert scalar_steps(acc, f"ww/alpha/{layer}") == steps, layer
        assert [h.step for h in acc.Histograms(f"ww/esd/{layer}")] == steps, layer
    assert scalar_steps(acc, "ww/summary/alpha") == history["steps"]


STRATEGIES = {  # strategy: (layers, frozen, ownership planned from shapes, memory counted by the gather)
    "fsdp2": (ZOO_LAYERS, ZOO_FROZEN, True, True),
    "tp": (MLP_LAYERS, MLP_FROZEN, True, True),
    "fsdp2_tp": (MLP_LAYERS, MLP_FROZEN, True, True),  # 2-D mesh
    # FSDP1 units are summoned one at a time (a LoRA layer's units together) and ownership is
    # decided unit by unit, so it is not the unsharded model's; the results are.
    "fsdp1": (ZOO_LAYERS, ZOO_FROZEN, False, False),
    "zero3": (ZOO_LAYERS, ZOO_FROZEN, True, True),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_matches_the_unsharded_model(runs, strategy):
    n_layers, frozen, planned, counted = STRATEGIES[strategy]
    r0, r1 = _report(runs, strategy)
    _check_snapshot(r0, r1, n_layers, frozen, planned)
    if counted:
        _check_memory(r0, r1)
    m0, m1 = r0["monitor"], r1["monitor"]
    for m in (m0, m1):
        _check_histories(m["sharded"], m["plain"], STEPS, n_layers, frozen)
    assert m0["sharded"] == m1["sharded"]  # every rank holds the merged history
    assert m0["here"] > 0 and m1["here"] > 0 and m0["here"] + m1["here"] == _rows(m0["sharded"])
    _check_logged_once(runs[1] / f"tb_{strategy}", m0["sharded"])


@pytest.fixture(scope="module")
def lightning(tmp_path_factory):
    """A real Trainer with ModelParallelStrategy on CPU (FSDP2 in ``configure_model``): both ranks' reports, the folder."""
    pytest.importorskip("pytorch_lightning")
    out = tmp_path_factory.mktemp("lightning")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=_checkout_path())
    res = subprocess.run([sys.executable, str(HERE / "_sharded_lightning.py"), str(out)], capture_output=True,
                         text=True, timeout=300, env=env, cwd=out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return tuple(json.loads((out / f"lightning.rank{r}.json").read_text()) for r in (0, 1)), out


def test_lightning_model_parallel_strategy(lightning):
    """The Lightning callback under ModelParallelStrategy: the same per-layer results as the
    unsharded replica, each logged once."""
    (r0, r1), out = lightning
    steps = [0, r0["global_step"]]
    assert r0["world"] == 2 and r0["global_step"] > 0 and r0["placements"] == ["(Shard(dim=0),)"]  # FSDP2 DTensors
    for r in (r0, r1):  # the LightningModule holds the model as `net`: its layers carry that prefix
        _check_histories(r["sharded"], r["plain"], steps, ZOO_LAYERS, ZOO_FROZEN, prefix="net.")
    assert r0["sharded"] == r1["sharded"] and r0["here"] > 0 and r1["here"] > 0
    assert r0["here"] + r1["here"] == _rows(r0["sharded"])
    _check_logged_once(out / "tb" / "version_0", r0["sharded"])


def test_lightning_balancers_under_model_parallel_strategy(lightning):
    """The Lightning TempBalance (its own alphas: each rank decomposes its share, gathered) and
    AlphaDecay (the monitor's analysis) on the FSDP2 model: the same factors on both ranks, and
    every optimizer step's lr / weight decay = factor x the optimizer's, per layer."""
    (r0, r1), _ = lightning
    b0, b1 = r0["balancers"], r1["balancers"]
    assert b0["failures"] == b1["failures"] == 0
    assert b0["lr"] == b1["lr"] and b0["wd"] == b1["wd"] and b0["seen"] == b1["seen"] and b0["units"] == b1["units"]
    lr, wd = b0["lr"]["records"], b0["wd"]["records"]
    assert [r["step"] for r in lr] == list(range(0, r0["global_step"] + 1, 2))
    assert [(r["step"], r["source"]) for r in wd] == [(0, "monitor:hill_median@0")]  # the monitor's baseline
    # two paths, one answer: the monitor's eigenvalues and the gathered weights (the LoRA factors A
    # and B are not layers the monitor analyses: they keep factor 1 under its analysis)
    uncovered = [n for n, a in zip(wd[0]["layers"], wd[0]["alphas"]) if a is None or a != a]
    assert uncovered == ["net.base_model.model.proj.lora_A.default", "net.base_model.model.proj.lora_B.default"]
    for layer, a, b in zip(lr[0]["layers"], lr[0]["alphas"], wd[0]["alphas"]):
        assert layer in uncovered or a == pytest.approx(b, rel=1e-6), layer
    assert any(f != 1.0 for r in lr + wd for f in r["factors"])
    mine0, mine1 = b0["owned"]["lr"], b1["owned"]["lr"]
    assert mine0 and mine1 and not set(mine0) & set(mine1)
    assert b0["owned"]["wd"] == b1["owned"]["wd"] == []  # AlphaDecay decomposed nothing itself
    unit_of = {n: u for u, names in b0["units"].items() for n in names}
    assert len(b0["seen"]) == r0["global_step"]
    for step, groups in b0["seen"]:
        lr_f = dict(zip(*[[r for r in lr if r["step"] <= step][-1][k] for k in ("layers", "factors")]))
        wd_f = dict(zip(wd[0]["layers"], wd[0]["factors"]))
        assert len(groups) >= len(b0["units"])
        for g_lr, g_wd, names in groups:
            (unit,) = {unit_of.get(n) for n in names}
            assert g_lr == pytest.approx(0.05 * lr_f.get(unit, 1.0), rel=1e-12)
            assert g_wd == pytest.approx(1e-3 * wd_f.get(unit, 1.0), rel=1e-12)
