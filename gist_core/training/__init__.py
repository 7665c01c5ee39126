"""Training (params.yaml ``train``; DVC stage ``guide_cache``): the student fine-tuned with the guided loss.

- ``trainer``: ``train``, sentence-transformers' trainer with checkpoints that resume, memory-mapped triplets
- ``loss``: the GIST losses guided by the frozen model or by the guide-embedding cache
- ``guide_cache``: the DVC ``guide_cache`` stage, the guide's embedding of every training text (memory-mapped)
- ``cache_index``: the cache's key index, 64-bit hashes of the student's token ids with check hashes
- ``batching``: task-homogeneous, duplicate-free batches across processes, each pass exactly its length
- ``runtime``: device, rank and world size, seeds
"""
