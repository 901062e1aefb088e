"""The node process (``python -m sllm_actors.actors.node``): ``process.py`` boots the NodeSupervisor over the
storage tiers and one GpuActor per device, each supervising its model instances; ``storage_client.py`` picks
the tier a checkpoint loads from; ``context.py`` is what the node's actors share."""
