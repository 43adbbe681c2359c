"""One file per stage. Stages are Ray-agnostic: typed records in, typed records out.

A stage never imports another stage, never imports Ray or MLflow, and never reads config
files or the environment. ``stages.draw``, with ``stages.backgrounds`` and ``stages.staging``,
is the shared previz drawing helper, not a stage.
"""
