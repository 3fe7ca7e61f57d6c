"""The offline analysis engine: weights in, a :class:`~ww_monitor.analysis.results.Report` out.

Nothing here knows about training loops. Built on :mod:`ww_monitor.functional` (pure math).

* :mod:`.layers`: which weight matrices each layer type yields, selection, size limits;
* :mod:`.weight_access`: reading weights without side effects, every dtype to a matrix;
* :mod:`.loading`: safe checkpoint loading (``weights_only=True``, safetensors);
* :mod:`.analyze`: ``analyze()`` orchestration (``wwm.analyze``) and ``analyze_matrices``;
* :mod:`.results`: ``LayerResult``, ``SkippedLayer``, ``Report``;
* :mod:`.phases`, :mod:`.reliability`: the 5+1 phases and when a fit/phase is trusted;
* :mod:`.options`: weightwatcher 0.7.7's optional per-layer analyses;
* :mod:`.adapters`: LoRA / PEFT adapter updates;
* :mod:`.estimate`: sampled estimate for matrices too large to decompose;
* :mod:`.model_distances`: ``wwm.distances`` between two versions of a model;
* :mod:`.synthetic`: seeded matrices in each phase (tests, calibration).
"""
