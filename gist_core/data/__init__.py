"""The data stages (params.yaml ``data``; DVC stages ``embed``, ``mine`` and ``data``): classification train
splits mined into triplets with the guide's stored embeddings, MEDI, contamination checks, deduplication,
caps and the data report.

- ``stage``: the three DVC stages' entry functions (``embed_stage``, ``mine_stage``, ``combine_stage``)
- ``embed``: the ``embed`` stage, the guide's versioned embeddings (``StoredEmbeddings`` reads them back)
- ``classification``, ``medi``: reading the sources (through ``gist_core.readers``; MEDI streamed)
- ``mining``, ``guide_encoder``, ``mine``: guide-based triplet mining (the guide through the embedding store)
- ``contamination``, ``combine``, ``audit``: the union, its vectorised checks, row accounting and the report
- ``schema``: the training triplets' columns, writing and reading them
"""
