"""TempBalance / AlphaDecay on sharded models, real 2-process gloo runs on CPU (one process group for
every setup: tests/_sharded_balancing.py): FSDP2 ``fully_shard``, FSDP1 (``use_orig_params=True``)
tensor parallel and both on a 2-D mesh train with per-layer lr and weight decay exactly as an unsharded replica does;
every rank applies the same factors; each rank decomposes its share of the layers; a monitor's
analysis is reused without a second eigensolve; DeepSpeed ZeRO-2/3 and FSDP with
``use_orig_params=False`` raise at attach."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_sharded import _checkout_path, _report

pytest.importorskip("peft")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _sharded_balancing import GAMMA, LR, SETUPS, STEP_SIZE, STEPS, WD  # noqa: E402

LR_STEPS, WD_STEPS = [0, 2, 4], [0, 1, 2, 3, 4]  # TempBalance every 2 steps, AlphaDecay every step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_balancing")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=_checkout_path())
    res = subprocess.run([sys.executable, str(HERE / "_sharded_balancing.py"), str(out)], capture_output=True,
                         text=True, timeout=400, env=env, cwd=out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return {name: tuple(json.loads((out / f"{name}.rank{r}.json").read_text()) for r in (0, 1)) for name in SETUPS}, out


def _in_effect(history: dict, step: int) -> dict[str, float]:
    """The factors an optimizer step runs with: those of the last update at or before it."""
    record = [r for r in history["records"] if r["step"] <= step][-1]
    return dict(zip(record["layers"], record["factors"]))


def _check_steps(run: dict, units: dict[str, list[str]]) -> None:
    """Every optimizer step: each group's lr = lr factor x StepLR's lr and weight decay = wd factor
    x the optimizer's, its parameters all of one layer (``units``: the unsharded model's), every
    parameter in one group."""
    unit_of = {name: unit for unit, names in units.items() for name in names}
    assert len(run["seen"]) == STEPS
    for k, groups in enumerate(run["seen"]):
        lr_f, wd_f = _in_effect(run["lr"], k), _in_effect(run["wd"], k)
        scheduled = LR * GAMMA ** (k // STEP_SIZE)
        assert len(groups) >= len(units)  # a group per layer at least, not the user's single group
        stepped = []
        for lr, wd, names in groups:
            owners = {unit_of.get(n) for n in names}
            assert len(owners) == 1, names
            unit = owners.pop()
            assert lr == pytest.approx(scheduled * lr_f.get(unit, 1.0), rel=1e-12)
            assert wd == pytest.approx(WD * wd_f.get(unit, 1.0), rel=1e-12)
            stepped += names
        assert sorted(stepped) == sorted(set(stepped)) and set(unit_of) <= set(stepped)


def _same_history(got: dict, want: dict) -> None:
    assert [r["step"] for r in got["records"]] == [r["step"] for r in want["records"]]
    for a, b in zip(got["records"], want["records"]):
        assert a["layers"] == b["layers"] and a["balanced"] == b["balanced"]
        assert a["alphas"] == pytest.approx(b["alphas"], rel=1e-5, nan_ok=True)
        assert a["factors"] == pytest.approx(b["factors"], rel=1e-5)


@pytest.mark.parametrize("setup", ["fsdp2", "fsdp1", "tp", "fsdp2_tp"])
def test_sharded_balancing_trains_as_the_unsharded_model(runs, setup):
    r0, r1 = _report(runs, setup)
    s0, s1, plain = r0["sharded"], r1["sharded"], r0["plain"]
    assert s0["failures"] == s1["failures"] == 0
    assert [r["step"] for r in s0["lr"]["records"]] == LR_STEPS
    assert [r["step"] for r in s0["wd"]["records"]] == WD_STEPS
    for key in ("lr", "wd"):
        assert s0[key] == s1[key]  # identical factors on every rank
        assert any(f != 1.0 for r in s0[key]["records"] for f in r["factors"])
        _same_history(s0[key], plain[key])  # the unsharded model's alphas and factors
    # the same layers steer the same parameters as in the unsharded model, by name
    assert s0["units"] == s1["units"] == plain["units"]
    assert s0["groups"] == s1["groups"] == 1  # the user's group back after every step
    for run in (s0, s1, plain):
        _check_steps(run, plain["units"])
    assert s0["seen"] == s1["seen"]
    # each rank decomposed its share of the layers (gathered to it), each layer once
    for key in ("lr", "wd"):
        mine0, mine1 = s0["owned"][key], s1["owned"][key]
        assert mine0 and mine1 and not set(mine0) & set(mine1)
        assert sorted(mine0 + mine1) == s0["matrices"]
    if setup != "fsdp1":  # DTensor: gathered one layer at a time (FSDP1 summons a unit on every rank)
        for r in (s0, s1):
            assert 0 < r["peak_bytes"] <= r0["largest_layer_bytes"]
    # trained with per-layer lr and weight decay as the replica was (float32 rounding apart)
    assert r0["compared"] > 0 and r0["max_weight_diff"] < 1e-5 and r1["max_weight_diff"] < 1e-5


def test_sharded_balancer_reuses_the_monitors_analysis(runs):
    r0, r1 = _report(runs, "monitor")
    assert r0["monitor_steps"] == WD_STEPS
    assert r0["failures"] == r1["failures"] == 0
    for key in ("lr", "wd"):
        assert r0[key] == r1[key]
    lr, wd = r0["lr"]["records"], r0["wd"]["records"]
    assert [(r["step"], r["source"]) for r in lr] == [(s, f"monitor:hill_median@{s}") for s in LR_STEPS]
    assert r0["owned"]["lr"] == r1["owned"]["lr"] == []  # no eigensolve of its own on any rank
    assert r0["owned"]["wd"] and r1["owned"]["wd"]  # the AlphaDecay without the monitor decomposes
    by_step = {r["step"]: r for r in wd}
    for rec in lr:  # the monitor's eigenvalues give the alphas of the weights, gathered and decomposed
        assert rec["layers"] == by_step[rec["step"]]["layers"]
        assert rec["alphas"] == pytest.approx(by_step[rec["step"]]["alphas"], rel=1e-6)
    assert any(f != 1.0 for r in lr for f in r["factors"])
    _check_steps(r0, r0["units"])


@pytest.mark.parametrize("setup, named", [("zero3", "ZeRO stage 3"), ("zero2", "ZeRO stage 1/2")])
def test_deepspeed_zero_raises_at_attach(runs, setup, named):
    r0, r1 = _report(runs, setup)
    for r in (r0, r1):
        message = r["raised"]
        assert message is not None, "attach did not raise"
        assert message.startswith("TempBalance: per-layer balancing cannot run under DeepSpeed")
        assert named in message and "flattens" in message and "FSDP2" in message


def test_fsdp_with_flat_parameters_raises_at_attach(runs):
    r0, r1 = _report(runs, "fsdp1_flat")
    for r in (r0, r1):
        assert r["raised"] is not None and "use_orig_params=False" in r["raised"]
        assert "use_orig_params=True" in r["raised"]
