"""Evaluation (params.yaml ``evaluate``): models scored on MTEB tasks through a result cache, and compared.

- ``tasks``: mteb task classes for the local pack (``gist_core.catalogue``), custom and Hub tasks
- ``evaluate``: ``evaluate_model`` / ``score_model`` with mteb's ``evaluate`` and ``ResultCache``
- ``encoding``: the encoder mteb runs, each distinct text encoded once
- ``summary``: per task, per category and overall scores with deltas; Markdown, metrics, a chart
"""
