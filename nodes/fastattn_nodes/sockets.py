"""The pack's DiTFastAttn socket type."""
from __future__ import annotations

from .._compat import io

# Carries a fastattn.plan.Plan (immutable) between nodes.
DiTFastAttnPlan = io.Custom("DITFASTATTN_PLAN")
CATEGORY = "advanced/model/ditfastattn"
