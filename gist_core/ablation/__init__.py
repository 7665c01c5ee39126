"""The ablation (params.yaml ``ablation``; ``gist ablation``): does the guide help?

The same student, data version, steps, batch and seeds under several arms (the untrained student,
MNRL without a guide, the guided GIST loss), on clean data and with injected noise.

- ``plan``: the runs, their folders and their reuse keys
- ``noise``: corrupting a controlled share of the triplets
- ``runner``: preparing the data variants, training and scoring one run
- ``report``: means and spreads over seeds, verdicts, the Markdown table and chart
"""
