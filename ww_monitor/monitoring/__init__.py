"""Training-time machinery with no training framework in it.

* :mod:`.snapshot`: consistent copies of the selected matrices, taken on the training thread;
* :mod:`.worker`: background analysis (thread or subprocess) off the training thread;
* :mod:`.distributed`: sharding a snapshot across ranks and gathering the results;
* :mod:`.history`: compact per-snapshot history of every layer's metrics;
* :mod:`.alerts`: alert rules with confirmation and deduplication;
* :mod:`.early_stopping`: alpha-drift stopping rules (a pure state machine);
* :mod:`.device`: analysis device, CUDA streams/events, device memory budget;
* :mod:`.cost`: per-process cost model (seconds per snapshot on this machine).
"""
