"""What users read: TensorBoard tags, figures, the HTML report and the ``ww-monitor`` command.

* :mod:`.tensorboard_writer`: the ``ww/...`` scalars, histograms, text and figures;
* :mod:`.figure_pipeline`: when and where figures are rendered, at a bounded cost;
* :mod:`.plotting`: ESD with fits, alpha per layer, phase heatmap (matplotlib OO API);
* :mod:`.run_data` / :mod:`.run_checkpoint`: what a report shows, read from a TensorBoard log or a checkpoint;
* :mod:`.offline_report`: ``ww-monitor report`` (HTML report of a run or checkpoint);
* :mod:`.cli`: the ``ww-monitor`` console script (``python -m ww_monitor``).
"""
