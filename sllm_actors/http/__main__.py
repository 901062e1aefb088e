"""``python -m sllm_actors.http``: the HTTP front end's process (``sllm up`` starts it; see process.py)."""

from sllm_actors.http.server import main

raise SystemExit(main())
