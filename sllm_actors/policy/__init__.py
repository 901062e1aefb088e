"""Where a request runs: the locality-aware placement decision (``placement``), a pure function of the
cluster's state that the scheduler actor and the simulator both call."""
