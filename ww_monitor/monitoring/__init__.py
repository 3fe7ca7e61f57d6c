"""Training-time machinery with no training framework in it.

* :mod:`.snapshot`: consistent copies of the selected matrices, taken on the training thread;
* :mod:`.worker`: background workers (inline, thread, process) off the training thread, and
  :mod:`.subprocess_worker` (a child interpreter, for figures);
* :mod:`.analysis_job`: the job a worker runs: one snapshot's analysis, histograms binned;
* :mod:`.distributed`: sharding a snapshot across ranks; the collectives that gather results
  (``torch.distributed`` or a Lightning strategy);
* :mod:`.sharded`: sharded weights (FSDP2 / tensor-parallel DTensors, DeepSpeed ZeRO-3) planned
  from global shapes and gathered one layer at a time, through views of the model
  (:mod:`.model_view`);
* :mod:`.history`: compact per-snapshot history of every layer's metrics;
* :mod:`.alerts`: alert rules with confirmation and deduplication;
* :mod:`.early_stopping`: alpha-drift stopping rules (a pure state machine);
* :mod:`.device`: analysis device, CUDA streams/events, device memory budget;
* :mod:`.cost`: per-process cost model (seconds per snapshot on this machine).
"""
