"""Memory (torch only): the planner that predicts a step's peak, the measured footprint, the live-tensor tracker."""

from lightning_qlora.memory.footprint import Footprint, measure_footprint
from lightning_qlora.memory.planner import MemoryPlan, plan_memory
from lightning_qlora.memory.tracker import LiveTensorTracker

__all__ = ["Footprint", "LiveTensorTracker", "MemoryPlan", "measure_footprint", "plan_memory"]
