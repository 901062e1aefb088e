"""Evaluation tooling, apart from the library: trace replay against a live cluster (``replay``), the
discrete-event simulator and its validation (``simulator``, ``sim_validate``), workloads (``workload``), the
live wire fuzz (``fuzz``), the soak and chaos load (``soak``), the storage benchmark and architecture sweep
(``storage_bench``, ``arch_sweep``), tiny random-weight models for tests (``tiny_models``, ``tiny_configs``), a
static file server for model repositories over HTTP (``repository_server``) and hosts as network namespaces
(``hosts``). The ``sllm`` CLI imports it for
``sllm bench``, ``sllm simulate`` and ``sllm store bench``."""
