"""Layer 3, costs: what an exchange costs and which one to use.

- :mod:`~lightning_gaussk.costs.model`: the alpha-beta model of links and host work, bytes and
  times of each exchange, and the rule (dense or sparse, which exchange);
- :mod:`~lightning_gaussk.costs.probe`: measuring a link with the job's own collectives.

Imports: the layers below.
"""
