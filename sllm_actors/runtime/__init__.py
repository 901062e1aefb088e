"""What every process of the cluster runs on: the ZeroMQ transport and its envelope codec (``transport``,
``wire``), OTP-style supervision (``supervisor``), CURVE keys, ZAP and roles (``security``) and the topology
file (``topology``). Nothing here imports torch."""
