"""Workers: the supervisor that runs one engine child per job, the reaper, the Celery app and the embedded executor.

Nothing here imports torch, transformers or FastAPI: the engine runs in its own process (`python -m sgtm_engine
run-stage …`), so the worker parent never initialises CUDA and can always kill what it started.
"""
