"""Tier 1: the prepared GPU bench (bench/gpu/run.sh) runs end to end, tiny, on the CPU.

The GPU run is rare (a 15-minute device lease now and then), so the script must not rot in
between: `--smoke` takes every code path of the GPU run at tiny sizes, and this test checks that
the one JSON it writes holds every section, every case, a passing numerics check for every path
that ran, and a reason for everything it skipped (the CUDA-only kernels on this machine).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("device", "window_kernels", "vae", "dit")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench") / "gpu_results.json"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu" / "run.sh"), "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_section_ran_and_passed(smoke):
    data, stdout = smoke
    assert data["mode"] == "smoke" and data["device"]["device"] == "cpu"
    assert data["device"]["torch"]
    assert set(data["sections"]) == set(SECTIONS)
    for name in SECTIONS:
        assert data["sections"][name]["status"] == "ok", (name, data["sections"][name])
    assert data["summary"]["numerics_failed"] == []
    assert "total" in stdout  # the closing table the device tool returns


def test_window_kernels_cover_every_backend(smoke):
    data, _ = smoke
    cases = data["sections"]["window_kernels"]["cases"]
    assert [c["seq_len"] for c in cases] == [256, 512, 256]
    for case in cases:
        backends = case["backends"]
        assert set(backends) == {"sdpa_full", "masked_sdpa", "banded", "flex", "flash"}
        for name in ("sdpa_full", "masked_sdpa", "banded", "flex"):
            entry = backends[name]
            assert entry["status"] == "ok" and entry["median_ms"] > 0, (name, entry)
            assert entry["numerics"]["ok"] and entry["numerics"]["rel_error"] < 1e-2
        assert backends["flash"] == {"status": "unavailable", "reason": "flash-attn runs on CUDA only"}


def test_vae_and_dit_figures_have_numerics(smoke):
    data, _ = smoke
    vae = data["sections"]["vae"]["cases"]
    ran = [c for c in vae if c["status"] == "ok"]
    assert {(c["case"], c["op"]) for c in ran} == {
        ("16x16x16", "encode"), ("16x16x16", "decode"),
        ("16x40x16 tiled (tile 32)", "encode"), ("16x40x16 tiled (tile 32)", "decode")}
    assert all(c["output_finite"] and c["median_ms"] > 0 for c in ran)
    assert [c["dtype"] for c in vae if c["status"] == "unavailable"] == ["float16"]  # no fast CPU kernel
    dit = {c["case"]: c for c in data["sections"]["dit"]["cases"]}
    assert dit["full attention"]["status"] == "ok"
    for backend in ("auto", "banded"):
        assert dit[f"DiTFastAttn plan, step 1, kernel_backend={backend}"]["status"] == "ok"
    checks = {c["check"] for c in data["numerics"]}
    for op in ("encode", "decode"):
        assert any(c.startswith(f"{op} 16x40x16 tiled") for c in checks)
    assert any(c.startswith("plan step 1") for c in checks) and any(c.startswith("full step") for c in checks)
    for check in data["numerics"]:
        assert check["ok"] and check["nonfinite"] == 0 and check["ref_norm"] > 0, check


def test_a_failing_section_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    from bench.gpu import suite

    def broken(settings, results, budget):
        raise RuntimeError("injected failure")

    monkeypatch.setitem(suite.SECTIONS, "window_kernels", broken)
    out = tmp_path / "results.json"
    data = suite.run(suite.SMOKE_SETTINGS, [out], ["window_kernels", "device"])
    assert data["sections"]["window_kernels"]["status"] == "failed"
    assert "injected failure" in data["sections"]["window_kernels"]["error"]
    assert data["sections"]["device"]["status"] == "ok"
    assert json.loads(out.read_text())["summary"]["sections"] == {"window_kernels": "failed", "device": "ok"}
