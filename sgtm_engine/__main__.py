"""`python -m sgtm_engine …` is the `sgtm` CLI (the service spawns `python -m sgtm_engine run-stage …`)."""

from sgtm_engine.cli import main

main()
