"""Meta-learning of qubit control pulses across noise settings: policies, tasks and losses,
MAML / FOMAML / Reptile, baselines, and the ``qubit_meta`` training run; and the adaptation
library (meta/adaptation.py): ``MetaMAML``, ``Adapter``, ``AdaptationConfig``."""

from meta.adaptation import AdaptationConfig, Adapter, MetaMAML

__all__ = ["AdaptationConfig", "Adapter", "MetaMAML"]
