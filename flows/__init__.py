"""The Prefect layer: flows, their parameters and deployments, and the orchestration commands of `gist`.

Importing it makes every promotion also wait in Prefect's global concurrency limit of its model
when a Prefect API is configured (``flows.locks``).
"""

from flows.locks import prefect_promotion_limit
from gist_core.registry.locks import register_outer_lock

register_outer_lock(prefect_promotion_limit)
