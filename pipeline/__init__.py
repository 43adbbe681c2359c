"""Orchestration: typed records, the render plan, the Ray graph, cache, cost and tracking.

Importing this package imports nothing heavy: Ray and MLflow are imported only by the
modules that need them (``pipeline.dag``, ``pipeline.tracking``).
"""
