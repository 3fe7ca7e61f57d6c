"""Rows, summaries and markdown tables of ``bench_evidence.py`` (from the run records).

Every number is derived here from the records' logged series by ``evidence_metrics``; the
markdown renders those rows, nothing else.
"""

from __future__ import annotations

import math
from collections import Counter

import evidence_cases as C
import evidence_metrics as M
import evidence_ranking as R
import evidence_replay as RP


# --------------------------------------------------------------------------- rows
def _alert(a: dict | None) -> dict | None:
    return None if a is None else {k: a[k] for k in ("rule", "layer", "step", "value")}


def failure_row(rec: dict, healthy_pairs: dict) -> dict:
    spec = rec["spec"]
    kind = C.KIND_BY_NAME[spec["kind"]]
    gt = M.GROUND_TRUTHS[kind.truth](rec)
    first_any = M.first_alert(rec)
    first = M.first_alert(rec, healthy_pairs.get(spec["arch"], set()))
    es, nan, drift = M.early_stopping_step(rec), M.nan_check_step(rec), rec["alpha_drift"]["stopped_step"]
    at = first["step"] if first else None
    last = [p for p in rec["probes"] if p["epoch"] >= 0][-1]
    return {
        "label": rec["label"], "kind": spec["kind"], "arch": spec["arch"], "seed": spec["seed"],
        "truth": kind.truth, "gt_step": gt, "steps_per_epoch": rec["steps_per_epoch"],
        "final_val_acc": last["val_acc"], "best_val_acc": max(p["val_acc"] for p in rec["probes"] if p["epoch"] >= 0),
        "first_alert": _alert(first_any), "lead_gt_any": M.lead(gt, first_any["step"] if first_any else None),
        "detected": first is not None, "first_specific_alert": _alert(first), "lead_gt": M.lead(gt, at),
        "specific_rules": sorted({a["rule"] for a in M.raised(rec)
                                  if (a["rule"], a["layer"]) not in healthy_pairs.get(spec["arch"], set())}),
        "es_step": es, "es_lead_gt": M.lead(gt, es), "lead_es": M.lead(es, at),
        "nan_step": nan, "nan_lead_gt": M.lead(gt, nan), "lead_nan": M.lead(nan, at),
        "drift_step": drift, "drift_lead_gt": M.lead(gt, drift), "drift_lead_es": M.lead(es, drift),
        "drift_reason": rec["alpha_drift"]["reason"],
        "num_alerts": len(M.raised(rec)), "seconds": rec["seconds"],
    }


def healthy_row(rec: dict) -> dict:
    spec = rec["spec"]
    last = [p for p in rec["probes"] if p["epoch"] >= 0][-1]
    alarms = [_alert(a) for a in M.raised(rec)]
    return {"label": rec["label"], "arch": spec["arch"], "seed": spec["seed"], "width": spec["width"],
            "depth": spec["depth"], "optimizer": spec["optimizer"], "schedule": spec["schedule"],
            "init_std": spec.get("init_std"),
            "final_val_acc": last["val_acc"], "num_alarms": len(alarms), "alarms": alarms,
            "drift_step": rec["alpha_drift"]["stopped_step"], "drift_reason": rec["alpha_drift"]["reason"],
            "es_step": M.early_stopping_step(rec), "steps": last["step"], "seconds": rec["seconds"]}


def _epochs(steps: int | None, per_epoch: int) -> float | None:
    return None if steps is None else steps / per_epoch


def kind_summary(rows: list[dict]) -> list[dict]:
    """One line per (kind, architecture): counts and medians over its seeds."""
    out = []
    for kind in C.FAILURES:
        for arch in C.ARCHS:
            rs = [r for r in rows if r["kind"] == kind.name and r["arch"] == arch]
            if not rs:
                continue
            with_gt = [r for r in rs if r["gt_step"] is not None]
            det = [r for r in with_gt if r["detected"]]
            out.append({
                "kind": kind.name, "arch": arch, "runs": len(rs), "with_gt": len(with_gt), "detected": len(det),
                "any_alert": sum(r["first_alert"] is not None for r in with_gt),
                "before_gt": sum(r["lead_gt"] >= 0 for r in det),
                "rules": dict(Counter(r["first_specific_alert"]["rule"] for r in det)),
                "median_lead_epochs": M.median(_epochs(r["lead_gt"], r["steps_per_epoch"]) for r in det),
                "es_stopped": sum(r["es_step"] is not None for r in with_gt),
                "median_es_lead_epochs": M.median(_epochs(r["es_lead_gt"], r["steps_per_epoch"]) for r in with_gt),
                "earlier_than_es": sum((r["lead_es"] is not None and r["lead_es"] > 0)
                                       or (r["detected"] and r["es_step"] is None) for r in with_gt),
                "nan_fired": sum(r["nan_step"] is not None for r in with_gt),
                "drift_stopped": sum(r["drift_step"] is not None for r in with_gt),
                "median_drift_lead_epochs": M.median(_epochs(r["drift_lead_gt"], r["steps_per_epoch"]) for r in with_gt),
            })
    return out


def overall(rows: list[dict], healthy: list[dict]) -> dict:
    with_gt = [r for r in rows if r["gt_step"] is not None]
    det = [r for r in with_gt if r["detected"]]
    es = [r for r in with_gt if r["es_step"] is not None]
    return {
        "failure_runs": len(rows), "with_gt": len(with_gt), "detected": len(det),
        "detected_before_gt": sum(r["lead_gt"] >= 0 for r in det),
        "median_lead_epochs": M.median(_epochs(r["lead_gt"], r["steps_per_epoch"]) for r in det),
        "es_stopped": len(es), "median_es_lead_epochs": M.median(_epochs(r["es_lead_gt"], r["steps_per_epoch"])
                                                                  for r in es),
        "earlier_than_es": sum(r["detected"] and (r["es_step"] is None or r["lead_es"] > 0) for r in with_gt),
        "later_than_es": sum(r["detected"] and r["es_step"] is not None and r["lead_es"] < 0 for r in with_gt),
        "nan_fired": sum(r["nan_step"] is not None for r in with_gt),
        "drift_stopped": sum(r["drift_step"] is not None for r in with_gt),
        "median_drift_lead_epochs": M.median(_epochs(r["drift_lead_gt"], r["steps_per_epoch"]) for r in with_gt),
        "drift_before_es": sum(r["drift_step"] is not None and (r["es_step"] is None or r["drift_lead_es"] > 0)
                               for r in with_gt),
        "healthy_runs": len(healthy), "healthy_alarms": sum(h["num_alarms"] for h in healthy),
        "healthy_runs_with_alarm": sum(h["num_alarms"] > 0 for h in healthy),
        "healthy_drift_stops": sum(h["drift_step"] is not None for h in healthy),
    }


def ranking_table(rows: list[dict], n_resamples: int) -> dict:
    acc = [r["test_acc"] for r in rows]
    return {m: M.rank_correlations([r[m] for r in rows], acc, n_resamples=n_resamples)
            for m in (*R.METRICS, R.BASELINE)}


def ranking(rows: list[dict], n_resamples: int) -> dict:
    """Correlations over all variants, and over those that trained (test acc >= R.TRAINED_ACC)."""
    trained = [r for r in rows if r["test_acc"] >= R.TRAINED_ACC]
    return {"rows": rows, "correlations": ranking_table(rows, n_resamples) if len(rows) > 2 else {},
            "trained": {"threshold": R.TRAINED_ACC, "n": len(trained),
                        "correlations": ranking_table(trained, n_resamples) if len(trained) > 3 else {}}}


#: The groups of runs each what-if row is also given for (the check against over-fitting the
#: rules to these runs: a change chosen for its reason must help on every group alike).
SPLITS = {"MLP": lambda spec: spec["arch"] == "mlp", "transformer": lambda spec: spec["arch"] == "transformer",
          "seeds 0-1": lambda spec: spec["seed"] in (0, 1), "seed 2": lambda spec: spec["seed"] == 2}


def _replayed_numbers(replayed: dict) -> tuple[dict, list, list]:
    healthy = [r for r in replayed.values() if r["spec"]["kind"] == "healthy"]
    pairs = M.healthy_pairs(healthy)
    rows = [failure_row(r, pairs) for r in replayed.values() if r["spec"]["kind"] != "healthy"]
    return overall(rows, [healthy_row(r) for r in healthy]), rows, healthy


def what_if(records: dict, configs: dict) -> list[dict]:
    """The headline numbers with the alert rules replayed (``evidence_replay``) under each
    ``AlertConfig(**kwargs)`` of ``configs`` on the same runs (``low_phases`` in kwargs: the
    replay-only candidate of ``evidence_replay.candidate_tracker``), overall and per group of
    :data:`SPLITS` (detections count against the healthy runs of the same group). AlphaDrift and
    the baselines do not depend on the alert rules."""
    from ww_monitor.monitoring.alerts import AlertConfig

    out = []
    for name, kwargs in configs.items():
        kwargs = dict(kwargs)
        low_phases = kwargs.pop("low_phases", None)
        config = AlertConfig(**kwargs)
        replayed = {k: dict(r, alerts=RP.replay(r["layer_history"], config, RP.candidate_tracker(config, low_phases)))
                    for k, r in records.items()}
        o, rows, healthy = _replayed_numbers(replayed)
        splits = {}
        for split, member in SPLITS.items():
            part = {k: r for k, r in replayed.items() if member(r["spec"])}
            if part:
                so = _replayed_numbers(part)[0]
                splits[split] = {k: so[k] for k in ("with_gt", "detected", "healthy_runs", "healthy_alarms")}
        by_rule = Counter(a["rule"] for r in healthy for a in M.raised(r))
        out.append({"name": name, "config": configs[name], "healthy_alarms_by_rule": dict(by_rule),
                    "detected_kinds": sorted({(r["kind"], r["arch"]) for r in rows if r["detected"]}),
                    "splits": splits,
                    **{k: o[k] for k in ("with_gt", "detected", "detected_before_gt", "median_lead_epochs",
                                         "earlier_than_es", "healthy_runs", "healthy_alarms",
                                         "healthy_runs_with_alarm")}})
    return out


# --------------------------------------------------------------------------- markdown
def _f(v, fmt=".1f", none="-"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, fmt)


def _a(a: dict | None) -> str:
    return "-" if a is None else f"`{a['rule']}` {a['layer']} @{a['step']}"


def markdown(result: dict) -> str:
    out = []
    o = result["overall"]
    if result["failures"]:
        out += ["## Failure corpus: summary", "",
                f"Detected {o['detected']} of {o['with_gt']} failure runs that went wrong by their ground truth "
                f"({o['detected_before_gt']} before it); median lead {_f(o['median_lead_epochs'])} epochs. "
                f"EarlyStopping(val_loss, patience={M.ES_PATIENCE}) stopped {o['es_stopped']} (median lead "
                f"{_f(o['median_es_lead_epochs'])} epochs); the alert came first in {o['earlier_than_es']} runs, "
                f"later in {o['later_than_es']}. The NaN/Inf-loss check fired in {o['nan_fired']}. "
                f"AlphaDriftEarlyStopping() stopped {o['drift_stopped']} (median lead "
                f"{_f(o['median_drift_lead_epochs'])} epochs; before EarlyStopping in {o['drift_before_es']}).", "",
                "| kind | arch | runs (with ground truth) | detected (before GT) | by rule | median lead, epochs | "
                "any alert | EarlyStopping stopped, median lead | alert before ES | NaN check | AlphaDrift stopped, "
                "median lead |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in result["kind_summary"]:
            rules = ", ".join(f"{r} {n}" for r, n in sorted(s["rules"].items())) or "-"
            out.append(f"| {s['kind']} | {s['arch']} | {s['runs']} ({s['with_gt']}) | {s['detected']} "
                       f"({s['before_gt']}) | {rules} | {_f(s['median_lead_epochs'])} | {s['any_alert']} | "
                       f"{s['es_stopped']}, {_f(s['median_es_lead_epochs'])} | {s['earlier_than_es']} | "
                       f"{s['nan_fired']} | {s['drift_stopped']}, {_f(s['median_drift_lead_epochs'])} |")
        skipped = [f"* {k.name} on the transformer: {k.why_not}" for k in C.FAILURES
                   if k.why_not and any(r["kind"] == k.name for r in result["failures"])]
        out += ["", *skipped, "", "## Failure corpus: every run (steps)", "",
                "| run | ground truth | final / best val acc | first new alert (lead) | rules of the new alerts | "
                "first alert of any rule (lead) | EarlyStopping (lead vs GT; alert lead) | NaN check (alert lead) | "
                "AlphaDrift (lead; vs ES) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in result["failures"]:
            out.append(f"| {r['label']} | {_f(r['gt_step'], 'd', 'none')} | {_f(r['final_val_acc'], '.3f')} / "
                       f"{_f(r['best_val_acc'], '.3f')} | {_a(r['first_specific_alert'])} ({_f(r['lead_gt'], 'd')}) | "
                       f"{', '.join(r['specific_rules']) or '-'} | "
                       f"{_a(r['first_alert'])} ({_f(r['lead_gt_any'], 'd')}) | {_f(r['es_step'], 'd', 'never')} "
                       f"({_f(r['es_lead_gt'], 'd')}; {_f(r['lead_es'], 'd')}) | {_f(r['nan_step'], 'd', 'never')} "
                       f"({_f(r['lead_nan'], 'd')}) | "
                       f"{_f(r['drift_step'], 'd', 'never')} ({_f(r['drift_lead_gt'], 'd')}; "
                       f"{_f(r['drift_lead_es'], 'd')}) |")
    if result["healthy"]:
        out += ["", "## Healthy corpus: false alarms at the defaults", "",
                f"{o['healthy_alarms']} alarms in {o['healthy_runs']} healthy runs "
                f"({o['healthy_alarms'] / max(o['healthy_runs'], 1):.2f} per run; {o['healthy_runs_with_alarm']} runs "
                f"with at least one); AlphaDriftEarlyStopping() would have stopped {o['healthy_drift_stops']}.", "",
                "| run | width x depth | optimizer, schedule, init | final val acc | alarms | AlphaDrift stop |",
                "|---|---|---|---|---|---|"]
        for h in result["healthy"]:
            alarms = "; ".join(f"`{a['rule']}` {a['layer']} @{a['step']} ({a['value']:.2f})" for a in h["alarms"])
            init = f"N(0, {h['init_std']:g}^2)" if h.get("init_std") is not None else "PyTorch default"
            out.append(f"| {h['label']} | {h['width']} x {h['depth']} | {h['optimizer']}, {h['schedule']}, {init} | "
                       f"{h['final_val_acc']:.3f} | {h['num_alarms']}{': ' + alarms if alarms else ''} | "
                       f"{_f(h['drift_step'], 'd', 'none')} |")
    if result.get("what_if"):
        out += ["", "## The same runs with the alert rules replayed under other settings", "",
                "| alert settings | detected (before GT) of runs with GT | median lead, epochs | alert before ES | "
                "healthy alarms (runs with one) | healthy alarms by rule |", "|---|---|---|---|---|---|"]
        for w in result["what_if"]:
            rules = ", ".join(f"{r} {n}" for r, n in sorted(w["healthy_alarms_by_rule"].items())) or "-"
            out.append(f"| {w['name']} | {w['detected']} ({w['detected_before_gt']}) of {w['with_gt']} | "
                       f"{_f(w['median_lead_epochs'])} | {w['earlier_than_es']} | {w['healthy_alarms']} "
                       f"({w['healthy_runs_with_alarm']} of {w['healthy_runs']}) | {rules} |")
        splits = [s for s in SPLITS if any(s in w.get("splits", {}) for w in result["what_if"])]
        if splits:
            out += ["", "By group of runs (detected of runs with GT; healthy alarms in healthy runs):", "",
                    "| alert settings | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
            for w in result["what_if"]:
                cells = [(lambda g: f"{g['detected']}/{g['with_gt']}; {g['healthy_alarms']} in {g['healthy_runs']}")(
                    w["splits"][s]) if s in w.get("splits", {}) else "-" for s in splits]
                out.append(f"| {w['name']} | " + " | ".join(cells) + " |")
    rk = result["ranking"]
    if rk["rows"]:
        rows = rk["rows"]
        for title, corr in ((f"all {len(rows)} variants", rk["correlations"]),
                            (f"the {rk['trained']['n']} variants with test accuracy >= {rk['trained']['threshold']}",
                             rk["trained"]["correlations"])):
            if not corr:
                continue
            out += ["", f"## Model ranking: correlation with test accuracy, {title}", "",
                    "| metric | Spearman rho [95% CI] | p | Kendall tau [95% CI] | p |", "|---|---|---|---|---|"]
            for m, c in corr.items():
                s, k = c["spearman"], c["kendall"]
                name = f"final {m.replace('_', ' ')} (baseline)" if m == R.BASELINE else f"mean {m}"
                out.append(f"| {name} | {s['r']:+.2f} [{s['ci'][0]:+.2f}, {s['ci'][1]:+.2f}] | {s['p']:.2g} | "
                           f"{k['r']:+.2f} [{k['ci'][0]:+.2f}, {k['ci'][1]:+.2f}] | {k['p']:.2g} |")
        keys = (*R.GRID, "test_acc", R.BASELINE, *R.METRICS)
        out += ["", "Per variant:", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            out.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(out) + "\n"
