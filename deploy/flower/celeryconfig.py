"""Celery settings for Flower (compose profile `monitoring`).

The mher/flower image has no harmprune code, so this mirrors the broker settings of
workers/client.py:make_celery (tests/test_deploy.py checks they agree): without the same key
prefix Flower finds no queue and no worker.
"""

import os

broker_url = os.environ.get("HARMPRUNE_REDIS_URL", "redis://redis:6379/0")
broker_transport_options = {
    "global_keyprefix": f"{os.environ.get('HARMPRUNE_KEY_PREFIX', 'harmprune')}:broker:",
}
