"""``python -m sllm_actors.actors.controller``: the controller's process (``sllm up`` starts it; see launcher.py)."""

from sllm_actors.actors.controller.process import main

raise SystemExit(main())
