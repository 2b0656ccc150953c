from worker.store.jobs import *  # noqa: F403
