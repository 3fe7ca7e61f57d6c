"""Front doors that translate a training framework's events into monitoring calls.

* :mod:`.lightning_callback`: ``WeightWatcherCallback`` (the shared ``WeightWatcherMixin`` and
  the ``pytorch_lightning`` class; ``ww_monitor.lightning`` builds the ``lightning.pytorch`` one);
* :mod:`.alpha_drift`: ``AlphaDriftEarlyStopping`` for Lightning.

Public entry points are ``ww_monitor.WeightWatcherCallback``, ``ww_monitor.lightning.*`` and
``ww_monitor.AlphaDriftEarlyStopping``; import those rather than these modules.
"""
