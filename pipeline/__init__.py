"""Orchestration: the profile and the registry of backends, the plan and the schedule (pure
data), the executor (``pipeline.dag``, the only module that imports Ray), the artifact store,
cost, tracking, and the command line.

Importing this package imports nothing heavy: Ray and MLflow are imported only by the modules
that need them (``pipeline.dag``, ``pipeline.tracking``); the registry imports the stages'
settings models, so OpenCV and Pillow load with ``pipeline.models``.
"""
