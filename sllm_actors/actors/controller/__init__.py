"""The controller process: ``process.py`` boots the ClusterSupervisor over the router, the scheduler, the node
registry and the local node processes; ``context.py`` holds what they share (sockets, directory, request table)."""
