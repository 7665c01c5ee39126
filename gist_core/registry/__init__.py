"""The model registry (params.yaml ``registry``): the only package that talks to MLflow.

- ``client``: where the store is, the one MLflow client and the one retry layer
- ``tracking``: runs, params, metrics, artifacts, links
- ``versions``: registration with lineage tags; reading versions and aliases
- ``promotion``: the gate's decision applied as a compare-and-set on ``champion``, with its audit trail
- ``history``: who held champion when; rollback targets
- ``serving``: loading a registered model and embedding with it (``load_champion``, ``encode``)
"""
