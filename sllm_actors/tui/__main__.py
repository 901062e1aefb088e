from sllm_actors.tui import main

raise SystemExit(main())
