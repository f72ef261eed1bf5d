"""Layer 3, costs: what an exchange costs and which one to use.

- :mod:`~lightning_gaussk.costs.model`: the alpha-beta model of links and host work, the bytes
  and times of every registered exchange, and ``bucket_k`` (the one formula of k);
- :mod:`~lightning_gaussk.costs.policy`: the one exchange policy of every engine (dense or
  sparse, which exchange);
- :mod:`~lightning_gaussk.costs.planning`: node-mode and step times, and fitting the model to
  measurements (the pre-flight check and the benchmarks);
- :mod:`~lightning_gaussk.costs.probe`: measuring a link with the job's own collectives.

Imports: the layers below.
"""
