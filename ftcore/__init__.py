"""The core every package imports: error types (``ftcore.errors``) and where things live (``ftcore.paths``).

It imports nothing first-party, so ``estimator``, ``advisor``, ``runner``, ``ui`` and the ``ftadvisor`` CLI all
sit above it.
"""
