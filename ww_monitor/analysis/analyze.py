"""``wwm.analyze``: weights in, a :class:`~ww_monitor.analysis.results.Report` out.

Orchestration only: the options and layer selection live in :mod:`.selection` (re-exported
here), the layer finders in :mod:`.layers`, the math in :mod:`.functional`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..functional.correlation_traps import count_correlation_traps
from ..functional.eigenvalues import batched_eigenvalues
from ..functional.fingers import DEFAULT_FINGER_THRESH, DEFAULT_MAX_FINGERS
from ..functional.marchenko_pastur import fit_marchenko_pastur
from ..functional.power_law import DEFAULT_MIN_EIGENVALUE, PowerLawFit, fit_power_law
from ..functional.sampled import DEFAULT_SAMPLE_SIZE, DEFAULT_SAMPLES
from ..functional.spectral_metrics import alpha_metrics, matrix_entropy, matrix_rank, norm_metrics, rank_tolerance
from . import options as _options
from .adapters import ZERO_UPDATE_REASON
from .estimate import estimated_layer_result, wants_estimate
from .layers import LayerMatrix
from .loading import ModelSource, load_state_dict
from .phases import phase_from_spectrum
from .reliability import is_reliable, phase_determined
from .results import LayerResult, Report, SkippedLayer
from .selection import DEFAULT_MAX_EVALS, DEFAULT_MAX_N, DEFAULT_MIN_EVALS, AnalysisConfig, select_matrices

__all__ = [
    "analyze",
    "AnalysisConfig",
    "select_matrices",
    "analyze_matrices",
    "DEFAULT_MIN_EVALS",
    "DEFAULT_MAX_EVALS",
    "DEFAULT_MAX_N",
]

log = logging.getLogger(__name__)

#: A mixed-precision (float32) ESD is kept only if its absolute error bound is at most this
#: fraction of the fitted xmin: every tail eigenvalue is then known to 1e-4 relative, which moves
#: alpha = 1 + n / sum ln(x / xmin) by < ~2e-4 / mean ln(x / xmin), inside the 1e-3 parity with
#: weightwatcher. Otherwise (a tail reaching far below lambda_max) it is solved in float64.
MIXED_TAIL_RTOL = 1e-4


def analyze_matrices(
    matrices: Sequence[LayerMatrix], config: AnalysisConfig
) -> tuple[list[LayerResult], list[SkippedLayer]]:
    """Eigenvalues (batched), metrics, power-law fit and RMT diagnostics for each matrix.

    Non-finite weights and solver failures are reported as skipped, never raised.
    """
    results: list[tuple[LayerMatrix, LayerResult]] = []
    skipped: list[SkippedLayer] = []
    order = {id(m): i for i, m in enumerate(matrices)}
    if config.estimate_above is not None:
        large = [m for m in matrices if wants_estimate(m, config.estimate_above)]
        matrices = [m for m in matrices if not wants_estimate(m, config.estimate_above)]
        results = _estimate_each(large, config, skipped)
    good: list[LayerMatrix] = []
    for m in matrices:
        if m.kind == "lora" and not bool(m.weight.any()):
            skipped.append(SkippedLayer(m.name, m.kind, tuple(m.weight.shape), ZERO_UPDATE_REASON))
        else:
            good.append(m)
    weights = [m.weight for m in good]
    errors: list[float] = []  # absolute error bound per matrix (> 0: float32 eigensolve)
    try:  # non-finite weights come back as None (detected on the way, no separate pass)
        all_evals = batched_eigenvalues(weights, method=config.method, check_finite=True, errors=errors)
    except Exception as err:  # one bad matrix must not cost the others: retry one at a time
        log.debug("batched eigensolve failed (%s); retrying per matrix", err)
        all_evals, errors = [], []
        for w in weights:
            try:
                all_evals.append(batched_eigenvalues([w], method=config.method, check_finite=True, errors=errors)[0])
            except Exception as one_err:
                all_evals.append(one_err)
                errors.append(0.0)
    for m, evals, error in zip(good, all_evals, errors):
        if evals is None:
            skipped.append(SkippedLayer(m.name, m.kind, tuple(m.weight.shape), "non-finite weights (NaN or Inf)"))
            continue
        if isinstance(evals, Exception):
            skipped.append(SkippedLayer(m.name, m.kind, tuple(m.weight.shape), f"eigensolver failed: {evals}"))
            continue
        res = layer_result(m, evals if m.eig_scale == 1.0 else evals * m.eig_scale, config)
        if error > 0 and not error * m.eig_scale <= MIXED_TAIL_RTOL * res.xmin:
            # The float32 eigenvalues are not precise enough at this fit's xmin: solve in float64.
            evals = batched_eigenvalues([m.weight], method="gram")[0]
            res = layer_result(m, evals if m.eig_scale == 1.0 else evals * m.eig_scale, config)
        results.append((m, res))
    for m, res in results:
        res.frozen = m.frozen
    return [res for _, res in sorted(results, key=lambda pair: order[id(pair[0])])], skipped


def _estimate_each(
    large: list[LayerMatrix], config: AnalysisConfig, skipped: list[SkippedLayer]
) -> list[tuple[LayerMatrix, LayerResult]]:
    """(matrix, result) pairs of sampled estimates (:mod:`.estimate`); failures go to ``skipped``."""
    results = []
    for m in large:
        try:
            res = estimated_layer_result(m, config)
        except Exception as err:
            skipped.append(SkippedLayer(m.name, m.kind, tuple(m.weight.shape), f"sampled estimate failed: {err}"))
            continue
        if res is None:
            skipped.append(SkippedLayer(m.name, m.kind, tuple(m.weight.shape), "non-finite weights (NaN or Inf)"))
        else:
            results.append((m, res))
    return results


def layer_result(m: LayerMatrix, evals: np.ndarray, config: AnalysisConfig) -> LayerResult:
    """All per-layer metrics from one ESD (``evals`` sorted ascending, already scaled)."""
    n, mm = m.N, m.M
    res = LayerResult(
        name=m.name,
        kind=m.kind,
        N=n,
        M=mm,
        Q=n / mm,
        num_evals=int(evals.size),
        num_slices=m.num_slices,
        dtype=str(m.precision).replace("torch.", ""),
        aliases=tuple(m.aliases),
    )
    for key, value in norm_metrics(evals).items():
        setattr(res, key, value)
    tol = rank_tolerance(res.lambda_max, n, mm, m.precision)
    res.matrix_rank = matrix_rank(evals, tol)
    res.rank_loss = int(evals.size - res.matrix_rank)
    res.entropy = matrix_entropy(evals, res.matrix_rank)

    # Near-zero eigenvalues (below the precision-aware rank tolerance, or weightwatcher's 1e-5)
    # are not part of any tail.
    floor = max(DEFAULT_MIN_EIGENVALUE, tol)
    fit = fit_power_law(evals, min_eigenvalue=floor)
    fit = _options.fingers_fit(res, evals, fit, floor, config)
    res.fit_ok, res.fit_reason = fit.ok, fit.reason
    res.alpha, res.xmin, res.xmax, res.D, res.sigma = fit.alpha, fit.xmin, fit.xmax, fit.D, fit.sigma
    res.num_pl_spikes = fit.num_pl_spikes
    _options.apply_tpl(res, evals, fit, config)
    res.reliable = is_reliable(res.num_evals, res.num_pl_spikes, res.fit_ok)
    for key, value in alpha_metrics(evals, res.alpha, res.lambda_max).items():
        setattr(res, key, value)

    _rmt_diagnostics(res, m, evals, fit, config)
    if config.detX:
        _options.apply_detx(res, evals)
    if config.randomize:
        _options.apply_randomize(res, m, evals, config)
    if config.keep_eigenvalues:
        res.eigenvalues = evals
    return res


def _rmt_diagnostics(
    res: LayerResult, m: LayerMatrix, evals: np.ndarray, fit: PowerLawFit, config: AnalysisConfig
) -> None:
    """Marchenko-Pastur fit, spikes, correlation traps and phase.

    The MP fit sees the same (conv-scaled) eigenvalues as every other metric, so lambda_plus
    and mp_sigma describe the reported ESD; for pooled conv layers mp_sigma is the entry scale
    of the slices after the sqrt(eig_scale) normalisation. Traps are counted on the raw
    weights (the count is scale invariant). A failure is logged at debug level and leaves the
    fields at their defaults (NaN / None), never raised. Layers with fewer than
    :data:`~ww_monitor.analysis.reliability.RELIABLE_MIN_EVALS` eigenvalues get no phase.
    """
    try:
        mp = fit_marchenko_pastur(evals, m.N, m.M, num_slices=m.num_slices)
        phase = phase_from_spectrum(
            evals, m.N, m.M, num_slices=m.num_slices, rank_loss=res.rank_loss, power_law=fit, mp=mp
        )
    except Exception as err:
        log.debug("MP fit / phase failed for %s: %s", res.name, err, exc_info=True)
    else:
        res.lambda_plus, res.mp_sigma, res.mp_ks = mp.lambda_plus, mp.sigma, mp.ks
        res.num_spikes, res.mp_softrank = mp.num_spikes, mp.mp_softrank
        # Too few eigenvalues to resolve a bulk edge: the phase is undetermined (None), not a guess.
        res.phase = phase if phase_determined(res.num_evals) else None
    if config.traps:
        try:
            res.num_traps = count_correlation_traps(m.weight, seed=config.seed)
        except Exception as err:
            log.debug("correlation traps failed for %s: %s", res.name, err, exc_info=True)


def analyze(
    model: ModelSource,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    *,
    kinds: Sequence[str] | None = None,
    conv_mode: str = "pooled",
    min_evals: int = DEFAULT_MIN_EVALS,
    max_evals: int | None = DEFAULT_MAX_EVALS,
    max_n: int | None = DEFAULT_MAX_N,
    max_matrix_bytes: int | None = None,
    method: str = "auto",
    traps: bool = False,
    seed: int = 0,
    keep_eigenvalues: bool = True,
    estimate_above: int | None = None,
    estimate_size: int = DEFAULT_SAMPLE_SIZE,
    estimate_samples: int = DEFAULT_SAMPLES,
    weights_only: bool = True,
    progress: Callable[[int, int], None] | None = None,
    detX: bool = False,
    ERG: bool = False,
    fix_fingers: str | None = None,
    max_fingers: int = DEFAULT_MAX_FINGERS,
    finger_thresh: float = DEFAULT_FINGER_THRESH,
    xmin_max: float | None = None,
    fit: str = "PL",
    randomize: bool = False,
    peft: bool | str = False,
    base_model: ModelSource | None = None,
) -> Report:
    """Analyse every weight matrix of a model, state dict or checkpoint file/folder.

    Example::

        import ww_monitor as wwm
        report = wwm.analyze(model, exclude=r"embeddings")
        print(report.summary()["alpha"])
        df = report.to_pandas()

    Args:
        model: ``nn.Module``, ``{name: tensor}`` state dict, or a path (.pt/.pth/.ckpt/.bin loaded
            with ``weights_only``, .safetensors, or a folder of them).
        include: regex (or list) matched with ``re.search`` against layer names: only these.
        exclude: regex (or list), as ``include``: not these.
        kinds: restrict to these layer kinds (see :data:`ww_monitor.analysis.layers.KINDS`).
        conv_mode: ``"pooled"`` (one ESD per conv layer from all kernel positions, each slice
            scaled by sqrt(1/2), weightwatcher's default) or ``"slices"`` (one ESD per position).
        min_evals: size limit, fewest eigenvalues; layers outside the limits are reported in ``skipped``.
        max_evals: size limit, most eigenvalues (None: none).
        max_n: size limit, longest side (None: none).
        max_matrix_bytes: skip (with a reason) matrices whose float64 copy would exceed this.
        method: eigensolver, ``"auto"`` | ``"gram"`` | ``"svd"`` (see :mod:`.functional.eigenvalues`).
        traps: also count correlation traps (one extra eigensolve per layer, seeded by ``seed``).
        keep_eigenvalues: keep each layer's ESD on its result (``LayerResult.eigenvalues``).
        estimate_above: opt-in for models too large to analyse whole: 2-D matrices whose smaller
            side exceeds this are not decomposed; alpha is estimated from ``estimate_samples``
            random submatrices with ``estimate_size`` columns and the matrix's aspect ratio
            (``method="sampled"`` on the result; see :mod:`ww_monitor.analysis.estimate`).
        weights_only: load checkpoint files with PyTorch's safe unpickler (default). Set False
            only for files you trust.
        progress: called as ``progress(done, total)`` (layers) as the analysis advances; the
            layers are then solved in small groups of one shape, with the same results.

    weightwatcher 0.7.7's options, same names and meanings (details in :mod:`.options`):

        detX / ERG: the det X = 1 tail of SETOL: ``detX_num``, ``detX_val``, ``ERG_gap``
            (``ERG`` is an alias).
        fix_fingers: ``"clip_xmax"`` (refit without the top eigenvalues when that lowers alpha
            by more than ``finger_thresh``, at most ``max_fingers``) or ``"xmin_peak"`` (xmin
            searched near the ESD's peak, up to ``xmin_max``).
        fit: ``"PL"`` (power law), ``"TPL"`` (truncated power law: alpha and ``Lambda``) or
            ``"E_TPL"`` (TPL on the ``xmin_peak`` tail).
        randomize: compare with the ESD of the shuffled weights (``rand_distance``,
            ``max_rand_eval``, ``rand_num_spikes``, ``ww_softrank``, ``ww_maxdist``), seeded by ``seed``.
        peft: LoRA adapters: ``False`` (base weights), ``True``/``"peft_only"`` (only the
            updates ``scaling * B @ A``), ``"with_base"`` (all layers, updates and merged weights),
            ``"auto"`` (base weights and updates; the training-time monitors' default).
        base_model: a model, state dict or path with the same layers: analyse ``W - W_base``
            (a fine-tuning or training delta). Layers missing from it, of another shape, or
            identical to it are reported in ``skipped``.
    """
    # AnalysisConfig.__post_init__ normalises a str, a list or None into the fields' tuples.
    config = AnalysisConfig(
        include=include,  # type: ignore[arg-type]
        exclude=exclude,  # type: ignore[arg-type]
        kinds=kinds,  # type: ignore[arg-type]
        conv_mode=conv_mode,
        min_evals=min_evals,
        max_evals=max_evals,
        max_n=max_n,
        max_matrix_bytes=max_matrix_bytes,
        method=method,
        traps=traps,
        seed=seed,
        keep_eigenvalues=keep_eigenvalues,
        detX=detX or ERG,
        fix_fingers=fix_fingers or None,
        max_fingers=max_fingers,
        finger_thresh=finger_thresh,
        xmin_max=xmin_max,
        fit=fit,
        randomize=randomize,
        peft=peft,
        estimate_above=estimate_above,
        estimate_size=estimate_size,
        estimate_samples=estimate_samples,
    )
    source = model
    if isinstance(model, (str, os.PathLike)):
        source = load_state_dict(model, weights_only=weights_only)
    with torch.no_grad():
        matrices, skipped = select_matrices(source, config)
        if base_model is not None:
            from .model_distances import subtract_base

            matrices, unmatched = subtract_base(matrices, base_model, config, weights_only=weights_only)
            skipped = skipped + unmatched
        if progress is None:
            results, failed = analyze_matrices(matrices, config)
        else:
            results, failed = _analyze_in_groups(matrices, config, progress)
    return Report(layers=results, skipped=skipped + failed)


#: Layers per group when progress is reported: small enough for a smooth progress bar, large
#: enough that same-shape layers still share batched eigensolver calls.
PROGRESS_GROUP = 8


def _analyze_in_groups(
    matrices: Sequence[LayerMatrix], config: AnalysisConfig, progress: Callable[[int, int], None]
) -> tuple[list[LayerResult], list[SkippedLayer]]:
    """:func:`analyze_matrices` over groups of same-shape layers, reporting after each group;
    results come back in input order."""
    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(tuple(m.weight.shape), []).append(i)
    groups = [idx[k : k + PROGRESS_GROUP] for idx in by_shape.values() for k in range(0, len(idx), PROGRESS_GROUP)]
    done: dict[str, list[LayerResult]] = {}
    failed: list[SkippedLayer] = []
    finished = 0
    progress(0, len(matrices))
    for group in groups:
        results, bad = analyze_matrices([matrices[i] for i in group], config)
        for r in results:
            done.setdefault(r.name, []).append(r)
        failed.extend(bad)
        finished += len(group)
        progress(finished, len(matrices))
    return [done[m.name].pop(0) for m in matrices if done.get(m.name)], failed
