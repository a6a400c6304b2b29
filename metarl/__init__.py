"""Model-based meta-RL on a family of Pendulum-v1 tasks (issue 15, item 3): the task family and its
splits (:mod:`metarl.family`), the settings (:mod:`metarl.config`), the meta-learned dynamics
models with MAML, Reptile and a PEARL-style context encoder (:mod:`metarl.learners`) and the
training and adaptation runs behind ``task: pendulum_meta`` (:mod:`metarl.train`)."""
