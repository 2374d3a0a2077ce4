"""Spatial-temporal food-ordering ad log simulator (see `engine` for the behaviour model)."""

from features.simulator.config import SimConfig, load_sim_config
from features.simulator.run import simulate

__all__ = ["SimConfig", "load_sim_config", "simulate"]
