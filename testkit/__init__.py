"""Helpers shared by the tests, ``scripts/demo.py`` and the benches (never imported by the pack itself).

* ``comfyui``: find a ComfyUI install and import it in-process with the pack loaded (tier 2);
* ``server``: a real headless ComfyUI server with the pack loaded, and running prompts on it (tier 3);
* ``workflows``: the example workflows (UI and API twins) and the inputs and settings their runs share;
* ``golden``: where the official implementations' outputs are kept (``tests/golden``);
* ``fastattn_tiny``: tiny random native DiTs of every family DiTFastAttn supports;
* ``reducio_dit_standins``: tiny files in the real formats for the full-size Reducio-DiT workflows;
* ``fastattn_ui_format``: UI-format twins of the DiTFastAttn API workflows.

Run from the repository root (pytest's ``pythonpath`` and ``python -m`` put it on the path).
"""
