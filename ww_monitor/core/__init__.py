"""The framework-agnostic monitor, and the plain-loop front door.

* :mod:`.engine`: :class:`~ww_monitor.core.engine.MonitorEngine`: schedule, snapshot, analyse,
  collect/gather, complete, alert, write, resumable state; no training framework in it. Its
  parts: :mod:`.settings` (arguments, validated), :mod:`.run_state` (per-run state, state
  dict), :mod:`.completion` (finished analyses -> history, alerts, sinks),
  :mod:`.selection_report` (what the layer selection left out), :mod:`.hooks` (rank-zero
  warnings, the training-thread timer);
* :mod:`.sinks`: where results go without a framework's loggers (``SummaryWriter``, callables)
  and the *host* protocol the engine talks to (a Lightning ``Trainer`` is one);
* :mod:`.monitor`: ``ww_monitor.Monitor``, the engine driven by ``step()`` / ``close()``.

The framework front doors are ``ww_monitor.WeightWatcherCallback`` / ``ww_monitor.lightning``
(:mod:`ww_monitor.integrations`) and ``ww_monitor.huggingface``.
"""
