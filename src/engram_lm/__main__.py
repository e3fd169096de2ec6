from engram_lm.cli import main

raise SystemExit(main())
