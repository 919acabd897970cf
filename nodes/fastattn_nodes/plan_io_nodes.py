"""Load and save DiTFastAttn plans (``models/ditfastattn_plans``, or JSON embedded in a workflow)."""
from __future__ import annotations

import os
import re

from .._compat import io, ui
from ...fastattn.plan import Plan, PlanFormatError
from .report import plan_summary
from .sockets import CATEGORY, DiTFastAttnPlan

EMBEDDED = "(use plan_json)"


def plans_folder_files() -> list[str]:
    import folder_paths

    from .._folders import PLANS_FOLDER

    try:
        return sorted(folder_paths.get_filename_list(PLANS_FOLDER))
    except KeyError:
        return []


def filename_prefix_problem(filename_prefix: str) -> str | None:
    """Why ``filename_prefix`` cannot name a plan inside the plans folder, or None when it can."""
    if not isinstance(filename_prefix, str) or not re.fullmatch(r"[A-Za-z0-9_.\-/]+", filename_prefix) \
            or ".." in filename_prefix or filename_prefix.startswith("/") or filename_prefix.endswith("/"):
        return (f"filename_prefix {filename_prefix!r}: use letters, digits, '_', '-', '.' and '/' for "
                f"sub-folders (no spaces, no '..', no absolute path, not ending in '/')")
    return None


def save_plan_to_folder(plan: Plan, filename_prefix: str) -> str:
    """Save under the first plans folder as ``<prefix>_00001.json`` (next free number); atomic."""
    import folder_paths

    from .._folders import PLANS_FOLDER

    problem = filename_prefix_problem(filename_prefix)
    if problem:
        raise ValueError(problem)
    folder = folder_paths.get_folder_paths(PLANS_FOLDER)[0]
    target_dir = os.path.join(folder, os.path.dirname(filename_prefix))
    os.makedirs(target_dir, exist_ok=True)
    stem = os.path.basename(filename_prefix)
    numbers = [int(m.group(1)) for name in os.listdir(target_dir)
               if (m := re.fullmatch(re.escape(stem) + r"_(\d{5})\.json", name))]
    name = f"{stem}_{(max(numbers) + 1 if numbers else 1):05d}.json"
    plan.save(os.path.join(target_dir, name))
    return os.path.join(os.path.dirname(filename_prefix), name)


class DiTFastAttnLoadPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTFastAttnLoadPlan",
            display_name="DiTFastAttn Load Plan",
            category=CATEGORY,
            description="Load a DiTFastAttn plan from models/ditfastattn_plans, or from JSON text "
                        "embedded in the workflow (so a shared workflow carries its plan).",
            inputs=[
                io.Combo.Input("plan_name", options=[EMBEDDED] + plans_folder_files(), default=EMBEDDED,
                               tooltip="A plan file in models/ditfastattn_plans (written by "
                                       "DiTFastAttnCalibrate or DiTFastAttnSavePlan). Choose "
                                       f"'{EMBEDDED}' to use the JSON text below instead."),
                io.String.Input("plan_json", multiline=True, default="",
                                tooltip="Plan JSON pasted into the workflow (the output of "
                                        "DiTFastAttnSavePlan's plan_json). Used when plan_name is "
                                        f"'{EMBEDDED}'; ignored otherwise."),
            ],
            outputs=[DiTFastAttnPlan.Output(display_name="plan"),
                     io.String.Output(display_name="summary")],
        )

    @classmethod
    def validate_inputs(cls, plan_name, plan_json):
        if plan_name == EMBEDDED and not (plan_json or "").strip():
            return f"plan_name is '{EMBEDDED}' but plan_json is empty: pick a plan file or paste a plan"
        return True

    @classmethod
    def execute(cls, plan_name, plan_json) -> io.NodeOutput:
        if plan_name == EMBEDDED:
            if not (plan_json or "").strip():
                raise ValueError(f"plan_name is '{EMBEDDED}' but plan_json is empty: pick a plan "
                                 f"file or paste the JSON of a plan")
            try:
                plan = Plan.from_json(plan_json)
            except PlanFormatError as exc:
                raise ValueError(f"plan_json is not a valid DiTFastAttn plan: {exc}") from None
        else:
            import folder_paths

            from .._folders import PLANS_FOLDER

            path = folder_paths.get_full_path(PLANS_FOLDER, plan_name)
            if path is None:
                raise FileNotFoundError(f"DiTFastAttn plan {plan_name!r} not found in "
                                        f"models/{PLANS_FOLDER}; refresh the node list or recalibrate")
            plan = Plan.load(path)
        summary = plan_summary(plan)
        return io.NodeOutput(plan, summary, ui=ui.PreviewText(summary))


class DiTFastAttnSavePlan(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiTFastAttnSavePlan",
            display_name="DiTFastAttn Save Plan",
            category=CATEGORY,
            description="Save a DiTFastAttn plan to models/ditfastattn_plans and output its JSON "
                        "text (paste it into DiTFastAttnLoadPlan to embed it in a workflow).",
            is_output_node=True,
            inputs=[
                DiTFastAttnPlan.Input("plan", tooltip="The plan to save."),
                io.String.Input("filename_prefix", default="ditfastattn/plan",
                                tooltip="File name prefix inside models/ditfastattn_plans; a "
                                        "number and .json are appended (files are never overwritten)."),
            ],
            outputs=[io.String.Output(display_name="plan_json"), io.String.Output(display_name="filename")],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None):
        return (filename_prefix_problem(filename_prefix) or True) if filename_prefix is not None else True

    @classmethod
    def execute(cls, plan, filename_prefix) -> io.NodeOutput:
        filename = save_plan_to_folder(plan, filename_prefix)
        text = plan.to_json()
        return io.NodeOutput(text, filename, ui=ui.PreviewText(f"saved {filename}\n{plan_summary(plan)}"))
