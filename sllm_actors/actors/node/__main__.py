"""``python -m sllm_actors.actors.node``: a node process (``sllm up`` starts local ones; see process.py)."""

import sys

from sllm_actors.actors.node.process import main

sys.exit(main())
