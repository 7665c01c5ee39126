"""Training (params.yaml ``train``; DVC stage ``guide_cache``): the student fine-tuned with the guided loss.

- ``trainer``: ``train``, sentence-transformers' trainer with checkpoints that resume
- ``loss``: the GIST losses guided by the frozen model or by the guide-embedding cache
- ``guide_cache``: the DVC ``guide_cache`` stage, the guide's embedding of every training text
- ``batching``: task-homogeneous, duplicate-free batches across processes
- ``runtime``: device, rank and world size, seeds
"""
