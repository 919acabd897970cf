"""DiTFastAttn nodes: calibrate a per-step / per-layer attention plan inside the graph and apply it
to ComfyUI's native DiTs through documented patch points only (see docs/ditfastattn_nodes.md)."""
from __future__ import annotations

from .apply_node import DiTFastAttnApply
from .calibrate_node import DiTFastAttnCalibrate
from .plan_io_nodes import DiTFastAttnLoadPlan, DiTFastAttnSavePlan
from .report_node import DiTFastAttnCompare, DiTFastAttnReport

NODES = [
    DiTFastAttnCalibrate,
    DiTFastAttnApply,
    DiTFastAttnLoadPlan,
    DiTFastAttnSavePlan,
    DiTFastAttnReport,
    DiTFastAttnCompare,
]


def register() -> None:
    from .._folders import PLAN_EXTENSIONS, PLANS_FOLDER, register_model_folder

    register_model_folder(PLANS_FOLDER, PLAN_EXTENSIONS)
