"""Continuous control with this project's actors on Stable-Baselines3 (SAC, TD3, DDPG):
``control.tasks`` holds what the runner needs to know about the tasks (no heavy imports),
``control.sb3`` the wiring."""
