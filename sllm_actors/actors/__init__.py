"""The actors, one per module, grouped by the process they run in: ``controller/`` (router, scheduler, node
registry, local node processes) and ``node/`` (GPUs, model instances, storage tiers). Each folder also holds
its process's entry point (``process.py``) and the context its actors share (``context.py``)."""
