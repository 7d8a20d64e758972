"""Integrations with the engines people run federated learning and experiments on.

* :mod:`gradleak.integrations.flower`: :class:`~gradleak.integrations.flower.AuditStrategy`, a
  Flower strategy wrapper that audits what clients send (needs ``pip install 'gradleak[fl]'``).
* :mod:`gradleak.integrations.capture`: the framework-independent part: parameters, number of
  examples and local hyperparameters to a :class:`~gradleak.types.ClientUpdate` and an audit folder.

Nothing here is imported by the rest of gradleak, and Flower is imported only by the module that
needs it. Sweeps over grids of settings are in :mod:`gradleak.sweep`.
"""
