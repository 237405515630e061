"""Prefect flows and deployments composing ``pipeline``: no ML logic of their own.

* :mod:`flows.retrain`: the retrain flow (snapshot -> fine-tune -> export -> gate -> promote).
* :mod:`flows.deployments`: the work pool, deployments and drift automation that run it on a site.

Importing this package imports neither Prefect nor torch; the submodules do.
"""
