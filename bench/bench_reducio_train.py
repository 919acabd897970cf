"""Training throughput of the tiny Reducio VAE and DiT on this machine: 1 process against 2 (torchrun, gloo).

    .venv/bin/python -m bench.bench_reducio_train [--vae-steps 12] [--dit-steps 120] [--out bench/reducio_train_throughput]

Both models are trained with the real ``python -m reducio.train`` commands, on the tiny presets and the
64 px synthetic clips, with the same global batch and settings in both layouts:

* 1 process using every core (torch's intra-op threads);
* 2 processes (``torchrun --nproc_per_node 2``, gloo; the DiT sharded with FSDP2, the VAE under DDP),
  each with cores / 2 threads.

Throughput is clips per second over the steps after the first logged interval (start-up, first
allocation and data caching are left out), from the timestamps the trainers write to metrics.jsonl.
The DiT trains on features encoded once here (``encode`` with the built-in encoders and a random tiny
VAE: the time per step does not depend on the weights). Writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def throughput(run_dir: Path, batch: int, skip_first: int) -> float:
    """Clips per second between the first logged step after ``skip_first`` and the last one."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] > skip_first]
    if len(rows) < 2:
        raise RuntimeError(f"{run_dir}: too few logged steps to time; raise the step count")
    steps = rows[-1]["step"] - rows[0]["step"]
    return steps * batch / (rows[-1]["time"] - rows[0]["time"])


def launch(jobs: list[list[str]], processes: int, work: Path) -> None:
    cores = os.cpu_count() or 1
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(max(1, cores // processes))}
    path = work / f"jobs_{processes}.json"
    path.write_text(json.dumps(jobs))
    if processes == 1:
        command = [sys.executable, "-m", "reducio.train.jobs", str(path)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone",
                   "-m", "reducio.train.jobs", str(path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae-steps", type=int, default=12)
    parser.add_argument("--vae-batch", type=int, default=4)
    parser.add_argument("--dit-steps", type=int, default=120)
    parser.add_argument("--dit-batch", type=int, default=32)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--out", type=Path, default=BENCH / "reducio_train_throughput")
    args = parser.parse_args(argv)
    from reducio.train.testing import write_test_vae

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        vae_file = write_test_vae(work / "vae_tiny.safetensors", preset="tiny")
        subprocess.run([sys.executable, "-m", "reducio.train", "encode", "--vae", str(vae_file), "--size", "64",
                        "--clips", "256", "--dit-config", str(REPO / "models" / "reducio_tiny_dit_config.json"),
                        "--out", str(work / "features"), "--quiet"], cwd=REPO, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        vae_log = max(1, args.vae_steps // 6)
        dit_log = max(1, args.dit_steps // 6)
        for processes in (1, 2):
            vae_out, dit_out = work / f"vae_{processes}", work / f"dit_{processes}"
            common = ["--precision", args.precision, "--quiet", "--ckpt-every", "100000"]
            launch([["vae", "--model", "tiny", "--size", "64", "--clips", "512", "--batch-size", str(args.vae_batch),
                     "--steps", str(args.vae_steps), "--log-every", str(vae_log), "--disc-start", "1000000",
                     "--posterior", "mean", "--out", str(vae_out), *common],
                    ["dit", "--features", str(work / "features"), "--model-config",
                     str(REPO / "models" / "reducio_tiny_dit_config.json"), "--batch-size", str(args.dit_batch),
                     "--steps", str(args.dit_steps), "--log-every", str(dit_log), "--out", str(dit_out), *common]],
                   processes, work)
            results[processes] = {"vae_clips_per_s": round(throughput(vae_out, args.vae_batch, vae_log), 2),
                                  "dit_clips_per_s": round(throughput(dit_out, args.dit_batch, dit_log), 1)}
    report = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "torch": torch.__version__, "precision": args.precision, "vae_batch": args.vae_batch,
              "dit_batch": args.dit_batch, "vae_steps": args.vae_steps, "dit_steps": args.dit_steps,
              "results": results}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    one, two = results[1], results[2]
    lines = ["# Tiny Reducio training throughput: 1 process vs 2 (torchrun, gloo)", "",
             f"`python -m bench.bench_reducio_train` on {report['cores']} cores ({report['machine']}), torch "
             f"{report['torch']}, {args.precision}, 64 px synthetic clips; same global batch in both layouts "
             f"(VAE {args.vae_batch}, DiT {args.dit_batch}); 1 process uses every core, 2 processes half each. "
             "Clips per second after the first logged interval.", "",
             "| model | 1 process | 2 processes | ratio 2/1 |", "| --- | --- | --- | --- |",
             f"| tiny VAE (DDP) | {one['vae_clips_per_s']} | {two['vae_clips_per_s']} | "
             f"{two['vae_clips_per_s'] / one['vae_clips_per_s']:.2f} |",
             f"| tiny DiT (FSDP2) | {one['dit_clips_per_s']} | {two['dit_clips_per_s']} | "
             f"{two['dit_clips_per_s'] / one['dit_clips_per_s']:.2f} |"]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
