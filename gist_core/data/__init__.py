"""The data stages (params.yaml ``data``; DVC stages ``mine`` and ``data``): classification train splits
mined into triplets with the guide, MEDI, contamination checks, deduplication, caps and the data report.

- ``stage``: the two DVC stages' entry functions (``mine_stage``, ``combine_stage``)
- ``classification``, ``medi``: reading the sources (through ``gist_core.readers``)
- ``mining``, ``guide_encoder``, ``mine``: guide-based triplet mining
- ``contamination``, ``combine``, ``audit``: the union, its checks, row accounting and the report
- ``schema``: the training triplets' columns, writing and reading them
"""
