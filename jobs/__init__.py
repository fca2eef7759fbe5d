"""The job layer (`harmprune.jobs`): the Redis job store, submission and routing, the runner
that a worker calls, and publishing glue. No torch at import time: the API imports this
package; only `harmprune.jobs.runner` reaches into the engine, lazily, inside a job process.
"""
