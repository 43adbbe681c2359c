"""One file per stage. Stages are Ray-agnostic: typed records in, typed records out.

A stage never imports another stage or ``pipeline``, never imports Ray or MLflow, and never
reads config files or the environment (``tests/test_layering.py`` walks the imports). The
records stages and the pipeline share, and the error hierarchy, live in ``stages.records``;
each stage takes a narrow input of its own (``ShotScene``, ``KeyframeRequest``,
``TimelineClip``) and keeps its backends' settings models beside it. ``stages.draw``, with
``stages.backgrounds`` and ``stages.staging``, is the shared previz drawing helper, not a stage.
"""
