"""Tier 2: DiTFastAttn stacked with current core's attention patches (issue 10, "Stacking").

Current core's ModelAttentionBackend, BlockSparseAttention and MultiGPU CFG split do not exist in
ComfyUI 0.3.64 / 0.8.0, so each is reproduced here with the same mechanics, read from current core:

* ``set_model_optimized_attention(fn)``: a closure ``(_, *args, **kwargs) -> fn(*args, **kwargs)``
  written into the override slot; it ignores ``func`` and never calls the previous override;
* BlockSparseAttention: its override chains the previous one and is put back on top of the slot
  whenever the slot holds something it did not install, at patch time and before every step's model
  calls (core: ON_PREPARE_STATE inside calc_cond_batch; here a CALC_COND_BATCH wrapper, which on
  these versions is what receives the run's model_options at the same point); calls it "handles"
  never reach the override below it;
* MultiGPU CFG split: cond and uncond as separate batches, run concurrently in threads, each
  building its transformer_options from the shared model_options and tagging
  ``multigpu_thread_device``.

Every case runs in both orders of application.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from testkit import fastattn_tiny as tiny  # noqa: E402
from testkit.fastattn_tiny import spy_calls  # noqa: E402

pytestmark = pytest.mark.comfyui

POS, NEG = tiny.conditioning(7, seed=1), tiny.conditioning(5, seed=2)   # unequal: split calls
OVERRIDE = "optimized_attention_override"


def layers_of(fa, model):
    return fa.families.detect_family(model).layer_names(model.model.diffusion_model)


def plan_of(fa, model, rows):
    layers = layers_of(fa, model)
    return fa.Plan([[m] * len(layers) for m in rows], {"layer_names": layers, "architecture": "wan"})


def last_report(fa, model):
    return fa.patcher.installed_spec(model).sink.last


# ---------------------------------------------------------------- core mechanics, reproduced

def set_model_optimized_attention(model, attention):
    """core ModelPatcher.set_model_optimized_attention, on a clone (ModelAttentionBackend)."""
    patched = model.clone()

    def optimized_attention_override(_, *args, **kwargs):
        return attention(*args, **kwargs)

    patched.model_options.setdefault("transformer_options", {})[OVERRIDE] = optimized_attention_override
    return patched


def block_sparse_like(model, handles):
    """core BlockSparseAttention's install pattern; ``handles(options)`` says which calls it takes
    itself (core: sigma window, min_tokens, dense_blocks, CUDA kernel available)."""
    import comfy.ldm.modules.attention as attention
    import comfy.patcher_extension as pe

    installed = set()

    def make_override(previous):
        def override(func, *args, **kwargs):
            options = kwargs.get("transformer_options") or {}
            q, k = args[0], args[1]
            if q.shape == k.shape and handles(options):
                kw = {key: value for key, value in kwargs.items() if key != "transformer_options"}
                return attention.attention_pytorch(*args, **kw)      # "sparse": not through us
            return func(*args, **kwargs) if previous is None else previous(func, *args, **kwargs)
        return override

    def install(options):
        current = options.get(OVERRIDE)
        if current in installed:
            return
        override = make_override(current)
        installed.add(override)
        options[OVERRIDE] = override

    patched = model.clone()
    install(patched.model_options.setdefault("transformer_options", {}))

    def prepare_state(executor, model_, conds, x_in, timestep, model_options):
        install(model_options.setdefault("transformer_options", {}))
        return executor(model_, conds, x_in, timestep, model_options)

    patched.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "block_sparse_like", prepare_state)
    return patched


def multigpu_cfg_split_like(model, devices=(torch.device("cpu"), torch.device("cpu", 0))):
    """core _calc_cond_batch_multigpu: one cond per device, run concurrently in threads."""
    import comfy.patcher_extension as pe
    import comfy.samplers as samplers

    def calc_cond_batch(executor, model_, conds, x_in, timestep, model_options):
        jobs = []
        for index, cond in enumerate(conds):
            for entry in cond or []:
                p = samplers.get_area_and_mult(entry, x_in, timestep)
                if p is not None:
                    jobs.append((index, p))
        barrier = threading.Barrier(len(jobs))

        def run(job, device):
            index, p = job
            options = pe.merge_nested_dicts({}, model_options["transformer_options"], copy_dict1=False)
            options.update(cond_or_uncond=[index], uuids=[p.uuid], sigmas=timestep,
                           multigpu_thread_device=device)
            c = samplers.cond_cat([p.conditioning])
            c["transformer_options"] = options
            barrier.wait()                 # both devices' model calls really run at the same time
            with torch.no_grad():
                return index, model_.apply_model(p.input_x, timestep, **c) * p.mult, p.mult

        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(run, jobs, [devices[i % len(devices)] for i in range(len(jobs))]))
        out = [torch.zeros_like(x_in) for _ in conds]
        counts = [torch.ones_like(x_in) * 1e-37 for _ in conds]
        for index, value, mult in results:
            out[index] += value
            counts[index] += mult
        return [o / c for o, c in zip(out, counts)]

    patched = model.clone()
    patched.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "multigpu_like", calc_cond_batch)
    return patched


# ---------------------------------------------------------------- 1. ModelAttentionBackend

def test_model_attention_backend_after_us_is_detected_before_us_is_chained(fa, wan, caplog):
    import comfy.ldm.modules.attention as attention

    backend_calls = []

    def backend(*args, **kwargs):
        backend_calls.append(1)
        return attention.attention_pytorch(*args, **kwargs)

    plan = plan_of(fa, wan, ["full_attn", "output_share", "residual_window_attn", "output_share"])
    reference = fa.sample(set_model_optimized_attention(wan, backend), POS, NEG, tiny.video_latent())

    # DiTFastAttn, then the backend: replaced, nothing reaches us -> said in log and report
    replaced = set_model_optimized_attention(fa.apply(wan, plan), backend)
    with caplog.at_level("WARNING"):
        out = fa.sample(replaced, POS, NEG, tiny.video_latent())
    assert torch.equal(out, reference)
    report = last_report(fa, replaced)
    assert report.compressible_calls == 0
    assert any("replaced DiTFastAttn" in n for n in report.notes), report.notes
    assert any("never reached" in n for n in report.notes), report.notes
    assert "does not chain it" in caplog.text and "no attention call reached DiTFastAttn" in caplog.text

    # the backend, then DiTFastAttn: chained, compressed, and full attention runs on the backend
    backend_calls.clear()
    chained = fa.apply(set_model_optimized_attention(wan, backend), plan)
    out = fa.sample(chained, POS, NEG, tiny.video_latent())
    report = last_report(fa, chained)
    assert report.compressible_calls == 4 * 2 * 2 and report.flops_kept < 1.0
    assert not any("replaced" in n or "never reached" in n for n in report.notes), report.notes
    assert backend_calls, "full-attention calls must go to the backend chosen before DiTFastAttn"
    full = fa.apply(set_model_optimized_attention(wan, backend), plan_of(fa, wan, ["full_attn"] * 4))
    assert torch.equal(fa.sample(full, POS, NEG, tiny.video_latent()), reference)


# ---------------------------------------------------------------- 2. BlockSparseAttention

@pytest.mark.parametrize("order", ["sparse_first", "fastattn_first"])
def test_block_sparse_outer_override_never_causes_stale_reuse(fa, wan, order):
    """The outer override takes evaluations 1 and 2; evaluation 3 is AST in the plan and must not
    reuse evaluation 0's output (the gap rule recomputes), so the run equals the outer override
    alone (everything it passes on runs full)."""
    window = []        # the sigma range the outer override takes (core: start/end percent)

    def handles(options):
        return bool(window) and window[0] <= float(options["sigmas"][0]) <= window[1]

    plan = plan_of(fa, wan, ["full_attn", "output_share", "output_share", "output_share"])

    def capture_sigmas(executor, *args, **kwargs):
        sigmas = [float(s) for s in args[3]]
        window[:] = [sigmas[2] - 1e-6, sigmas[1] + 1e-6]         # evaluations 1 and 2
        return executor(*args, **kwargs)

    import comfy.patcher_extension as pe

    def build(model):
        if order == "sparse_first":
            return fa.apply(block_sparse_like(model, handles), plan)
        return block_sparse_like(fa.apply(model, plan), handles)

    base = wan.clone()
    base.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "capture", capture_sigmas)
    stacked = build(base)
    out = fa.sample(stacked, POS, NEG, tiny.video_latent())
    alone = fa.sample(block_sparse_like(base, handles), POS, NEG, tiny.video_latent())
    assert torch.equal(out, alone), "a later AST step reused an output older than the plan assumes"
    report = last_report(fa, stacked)
    assert report.method_counts == {"full_attn": 2 * 2 * 2}, report.method_counts   # evaluations 0 and 3
    assert any("8 of 16 self-attention calls" in n for n in report.notes), report.notes
    assert any("ran full attention instead of reusing" in n for n in report.notes), report.notes
    assert any("runs in front of DiTFastAttn" in n for n in report.notes), report.notes


# ---------------------------------------------------------------- 3. MultiGPU CFG split

@pytest.mark.parametrize("order", ["split_first", "fastattn_first"])
def test_multigpu_cfg_split_threads_get_per_device_state(fa, wan, order):
    def build(model, plan):
        if order == "split_first":
            return fa.apply(multigpu_cfg_split_like(model), plan)
        return multigpu_cfg_split_like(fa.apply(model, plan))

    # WA-RS / AST: each device keeps its own caches; same result as ComfyUI's own split calls
    plan = plan_of(fa, wan, ["full_attn", "residual_window_attn", "output_share", "residual_window_attn"])
    threaded = build(wan, plan)
    out = fa.sample(threaded, POS, NEG, tiny.video_latent())
    single = fa.sample(fa.apply(wan, plan), POS, NEG, tiny.video_latent())
    assert torch.allclose(out, single, rtol=0, atol=1e-6), (out - single).abs().max()
    report = last_report(fa, threaded)
    assert report.compressible_calls == 4 * 2 * 2 and report.flops_kept < 1.0
    assert any("2 devices" in n for n in report.notes), report.notes

    # ASC: cond and uncond on different devices cannot share; off, said so, equal to full attention
    asc = plan_of(fa, wan, ["full_attn"] + ["full_attn+cfg_attn_share"] * 3)
    threaded = build(wan, asc)
    out = fa.sample(threaded, POS, NEG, tiny.video_latent())
    report = last_report(fa, threaded)
    assert report.flops_kept == pytest.approx(1.0)
    assert any("ASC (CFG sharing) inactive for 6 calls" in n for n in report.notes), report.notes
    reference = fa.sample(multigpu_cfg_split_like(wan), POS, NEG, tiny.video_latent())
    assert torch.allclose(out, reference, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- 4. scale, enable_gqa, preferred

def front_override(model, transform):
    """An override installed after DiTFastAttn that chains it and rewrites Wan's self-attention
    calls (a model that passes scale= / enable_gqa= looks like this to DiTFastAttn)."""
    patched = model.clone()
    options = patched.model_options["transformer_options"]
    inner = options[OVERRIDE]

    def rewriting_override(func, q, k, v, *args, **kwargs):
        if q.shape == k.shape:
            q, k, v, extra = transform(q, k, v)
            kwargs = dict(kwargs, **extra)
        return inner(func, q, k, v, *args, **kwargs)

    options[OVERRIDE] = rewriting_override
    return patched


def test_compressed_path_honours_scale_and_gqa(fa, wan):
    plan = plan_of(fa, wan, ["full_attn", "residual_window_attn", "output_share", "residual_window_attn"])
    # tiny random weights give near-uniform attention: a large scale makes it matter
    heads, head_dim, scale = 4, 16, 3000.0

    def with_scale(q, k, v):
        return q, k, v, {"scale": scale}

    def prescaled(q, k, v):
        return q * (scale * head_dim ** 0.5), k, v, {}

    a = fa.sample(front_override(fa.apply(wan, plan), with_scale), POS, NEG, tiny.video_latent())
    b = fa.sample(front_override(fa.apply(wan, plan), prescaled), POS, NEG, tiny.video_latent())
    plain = fa.sample(fa.apply(wan, plan), POS, NEG, tiny.video_latent())
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert (a - plain).abs().max() > 1e-3, "scale= must change the compressed computation"

    def kv_heads_halved(t):
        b_, length, _ = t.shape
        return t.reshape(b_, length, heads, head_dim)[:, :, ::2].reshape(b_, length, -1)

    def gqa(q, k, v):
        return q, kv_heads_halved(k), kv_heads_halved(v), {"enable_gqa": True}

    def expanded(q, k, v):
        def expand(t):
            b_, length, _ = t.shape
            return kv_heads_halved(t).reshape(b_, length, heads // 2, head_dim).repeat_interleave(2, dim=2) \
                .reshape(b_, length, -1)
        return q, expand(k), expand(v), {}

    model = front_override(fa.apply(wan, plan), gqa)
    a = fa.sample(model, POS, NEG, tiny.video_latent())
    b = fa.sample(front_override(fa.apply(wan, plan), expanded), POS, NEG, tiny.video_latent())
    assert torch.equal(a, b)
    report = last_report(fa, model)
    assert report.compressible_calls == 16 and any("16 GQA calls" in n for n in report.notes), report.notes


def test_preferred_attention_of_the_block_runs_the_full_path(fa):
    """Core's wrap_attn pops preferred_attention before an override sees it; DiTFastAttn finds the
    block's ComfyAttention (``comfy_attention.function``) itself and uses it for full attention,
    unless an override installed before DiTFastAttn takes precedence (core's order)."""
    import types

    import comfy.ldm.modules.attention as attention

    model = tiny.tiny_wan(seed=0)
    calls = []

    def preferred(*args, **kwargs):
        calls.append(1)
        return attention.optimized_attention(*args, **kwargs)     # the backend this machine uses

    for block in model.model.diffusion_model.blocks:
        block.self_attn.comfy_attention = types.SimpleNamespace(function=preferred)
    reference = fa.sample(model, POS, NEG, tiny.video_latent())
    patched = fa.apply(model, plan_of(fa, model, ["full_attn"] * 4))
    assert torch.equal(fa.sample(patched, POS, NEG, tiny.video_latent()), reference)
    assert len(calls) == 4 * 2 * 2
    calls.clear()
    earlier = set_model_optimized_attention(model, attention.attention_pytorch)
    fa.sample(fa.apply(earlier, plan_of(fa, model, ["full_attn"] * 4)), POS, NEG, tiny.video_latent())
    assert not calls


# ---------------------------------------------------------------- 5. new classes, tokens beyond the grid

@pytest.mark.parametrize("class_name", ["WanAnimate2Model", "SCAILWanModel", "SCAIL2WanModel", "CausalWanModel",
                                        "WanDancerModel", "SomeFutureWanModel"])
def test_new_wan_classes_are_patched(fa, monkeypatch, caplog, class_name):
    model = tiny.tiny_wan(seed=0)
    dm = model.model.diffusion_model
    dm.__class__ = type(class_name, (type(dm),), {})        # a subclass of this version's WanModel
    assert fa.families.detect_family(model).name == "wan"
    seen = spy_calls(fa, monkeypatch)
    with caplog.at_level("INFO"):
        patched = fa.apply(model, plan_of(fa, model, ["full_attn", "output_share", "residual_window_attn",
                                                      "output_share"]))
    assert fa.patcher.installed_spec(patched) is not None
    if class_name == "SomeFutureWanModel":
        assert "not in the family table; patched as wan" in caplog.text
    fa.sample(patched, POS, NEG, tiny.video_latent(), steps=4)
    assert len(seen) == 4 * 2 * 2


def test_ltxv_image_model_by_name_and_structure(fa, caplog):
    model = tiny.tiny_ltxv(seed=0)
    dm = model.model.diffusion_model
    dm.__class__ = type("LTXVImageModel", (type(dm),), {})
    assert fa.families.detect_family(model).name == "ltxv"
    assert fa.patcher.installed_spec(fa.apply(model, fa.full_plan(model, 4))) is not None
    # a class of that name without the LTXV block layout is refused, with the reason
    import comfy.model_patcher

    class LTXVImageModel(torch.nn.Module):
        pass

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.diffusion_model = LTXVImageModel()

    other = comfy.model_patcher.ModelPatcher(Holder(), load_device="cpu", offload_device="cpu")
    with caplog.at_level("WARNING"):
        assert fa.patcher.apply_patch(other, plan=None)[1] is None
    assert "no 'transformer_blocks' block list" in caplog.text


def test_wan_reference_latent_tokens_are_kept_global(fa, monkeypatch):
    """Wan with ``ref_conv`` (Wan Fun): the reference latent's tokens are prepended to the image
    tokens; they are treated like text tokens (global), so the call is still compressed."""
    cfg = tiny.wan_config()
    cfg["in_dim_ref_conv"] = 16
    import comfy.supported_models

    model = tiny._finish(comfy.supported_models.WAN21_T2V(cfg), 0)
    assert model.model.diffusion_model.ref_conv is not None
    g = torch.Generator().manual_seed(4)
    reference = {"reference_latents": [torch.randn(1, 16, 1, 8, 8, generator=g)]}
    pos = [[POS[0][0], dict(reference)]]
    neg = [[NEG[0][0], dict(reference)]]
    seen = spy_calls(fa, monkeypatch)
    plan = plan_of(fa, model, ["full_attn", "output_share", "residual_window_attn", "residual_window_attn"])
    out = fa.sample(fa.apply(model, plan), pos, neg, tiny.video_latent())
    assert torch.isfinite(out).all()
    assert len(seen) == 4 * 2 * 2, "calls with reference tokens must not stay uncompressed"
    assert {s[1:] for s in seen} == {(16, 0, (3, 4, 4))}     # 8x8 reference / patch 2x2 = 16 tokens first
