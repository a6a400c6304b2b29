"""Model-based RL (issue 15): a probabilistic ensemble of dynamics models (:mod:`mbrl.ensemble`),
a cross-entropy-method planner with trajectory sampling (:mod:`mbrl.cem`) and the PETS loop on
gymnasium's Pendulum-v1 (:mod:`mbrl.pets`), configured by :class:`mbrl.config.PETSConfig`."""
