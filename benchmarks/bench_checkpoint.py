"""What a sharded checkpoint costs at 1, 2 and 4 ranks, side by side in one run.

Every world size trains the same model (301.5M parameters; `--quick`: 7.1M) for two
optimizer steps on random tokens through the real engine (DeepSpeed ZeRO-2, fp32, torch AdamW,
so the fp32 masters and both Adam moments are partitioned over data parallel), started with
torchrun on this machine (gloo, one thread per rank), and measures:

  * a synchronous save (`train.checkpoint.Saver`, async_save=false): seconds, the slowest rank;
  * an asynchronous save (async_save=true): how long `Saver.save` holds the caller (the loop),
    how much of that is the copy to host memory, and how long until the save is complete
    (`Saver.wait` called at once: the loop does nothing meanwhile);
    one optimizer step before every save; `--repeat` saves of each kind, alternating, the
    fastest shown (the machine is shared: noise only adds);
  * the old approach for reference: rank 0 gathering the full fp32 weights and Adam moments
    (`consolidated_state_dict` + `consolidated_moments`, DeepSpeed's safe_get_full_* API);
    the old save then also wrote them with safetensors and wrote DeepSpeed's own files, which
    is not counted here;
  * resuming in a fresh torchrun: building the engine from the checkpoint (each rank reads its
    slices of the weights) plus `resume` (its fragments of the masters and moments), against
    building it from the initializer; a checksum of every rank's restored pieces must equal
    the one taken at the save (the files were just written: much of them is read from the
    page cache);
  * peak resident memory growth of every rank during each save: /proc/self/statm sampled every
    2 ms by a thread, and the kernel's own high-water mark (VmHWM, reset through
    /proc/self/clear_refs just before), the larger of the two, minus the RSS just before the
    save (freed heap memory is handed back first with malloc_trim, so reuse does not hide
    growth).

To fit 4 ranks of the full model in a 24 GB machine the workers lower DeepSpeed's reduce
and all-gather buckets from 5e8 to 5e7 elements (at 2 ranks the backward pass then grows each
rank by 0.94 GB instead of 2.45 GB); that shapes the training step's memory, not the save's.
The driver stops a run (and says so) if the machine's available memory falls under 1 GB.

The full state is counted as the checkpoint holds it: 12 bytes per parameter (fp32 master
weights + Adam's two moments). An fp32 run also keeps DeepSpeed's fp32 working weights (4 more
bytes per parameter, replicated), which a checkpoint does not save.

    python benchmarks/bench_checkpoint.py [--quick] [--ranks 1 2 4] [--repeat 2] [--zero 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATE_BYTES_PER_PARAM = 12  # fp32 master + exp_avg + exp_avg_sq: what the shards hold
GB = 1e9
BUCKET = 50_000_000  # DeepSpeed's reduce / all-gather buckets, in elements (its default: 5e8)
GROWTHS = ("sync_growth", "async_growth", "old_growth")
MIN_AVAILABLE = 1 << 30  # the driver stops the workers when the machine has less memory left

MODELS = {  # dim, layers, heads, kv heads, ffn, vocab
    "full": (1024, 20, 16, 8, 2816, 32000),
    "quick": (256, 4, 8, 4, 704, 8192),
}


# ---------------------------------------------------------------- memory


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _trim() -> None:
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Peak RSS while the block runs, sampled every `every` s and from the kernel's VmHWM."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self.base = every, 0, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_now())
            time.sleep(self.every)

    def __enter__(self) -> PeakRSS:
        _trim()
        self.base = self.peak = rss_now()
        self._kernel = _reset_hwm()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_now(), _hwm() if self._kernel else 0)

    @property
    def growth(self) -> int:
        return self.peak - self.base


# ---------------------------------------------------------------- the workers (under torchrun)


def _smaller_buckets() -> None:
    """DeepSpeed's gradient buckets at BUCKET elements (see the module docstring)."""
    import dist_llm.train.engine as engine_module

    build = engine_module.deepspeed_config

    def deepspeed_config(config, dp_size):
        ds = build(config, dp_size)
        ds["zero_optimization"].update(reduce_bucket_size=BUCKET, allgather_bucket_size=BUCKET)
        return ds

    engine_module.deepspeed_config = deepspeed_config


def bench_config(args, world_size: int, asynchronous: bool):
    from dist_llm.config import load_config

    dim, layers, heads, kv, ffn, vocab = MODELS["quick" if args.quick else "full"]
    return load_config(
        None,
        [
            f"model.vocab_size={vocab}",
            f"model.dim={dim}",
            f"model.n_layers={layers}",
            f"model.n_heads={heads}",
            f"model.n_kv_heads={kv}",
            f"model.ffn_hidden={ffn}",
            f"model.max_seq_len={args.seq}",
            f"data.seq_len={args.seq}",
            f"parallel.zero_stage={args.zero}",
            "train.dtype=fp32",
            "train.micro_batch_size=1",
            "optim.warmup_steps=0",
            "train.steps=100",
            f"train.out_dir={Path(args.dir) / f'ranks{world_size}'}",
            "checkpoint.keep=1",
            f"checkpoint.async_save={str(asynchronous).lower()}",
        ],
    )


def _checksum(engine, config, layout) -> float:
    """Sum over this rank's pieces of every saved tensor (float64): equal after an exact resume."""
    import torch

    from dist_llm.train.checkpoint import local_shards

    total = torch.zeros((), dtype=torch.float64)
    for sharded in local_shards(engine, config, layout).values():
        for piece in sharded.pieces:
            total += piece.tensor.double().abs().sum()
    return total.item()


def _time_staging() -> list[float]:
    """Record how long each staging copy (local_shards with copy=True, in Saver.save) takes."""
    from dist_llm.train import checkpoint

    took, local_shards = [], checkpoint.local_shards

    def timed(*args, copy=False, **kwargs):
        began = time.perf_counter()
        out = local_shards(*args, copy=copy, **kwargs)
        if copy:
            took.append(time.perf_counter() - began)
        return out

    checkpoint.local_shards = timed
    return took


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def worker_save(out: str, args) -> None:
    import torch
    import torch.distributed as dist

    from dist_llm.distributed import finish_process, gather_objects, init_world
    from dist_llm.model.llama import Llama, num_params
    from dist_llm.parallel import loss_function
    from dist_llm.train.checkpoint import Saver, consolidated_moments, consolidated_state_dict
    from dist_llm.train.loop import train_step
    from dist_llm.train.start import build_training

    world = init_world()
    _smaller_buckets()
    cfg = bench_config(args, world.size, asynchronous=False)
    torch.randn(64, 64) @ torch.randn(64, 64)  # load the math libraries before anything is timed
    result: dict = {}
    dist.barrier()
    began = time.perf_counter()
    layout, engine = build_training(cfg, world, None)
    result["fresh_build_s"] = time.perf_counter() - began
    loss = loss_function(layout)
    g = torch.Generator().manual_seed(layout.dp_rank)

    def batches():
        while True:
            tokens = torch.randint(0, cfg.model.vocab_size, (1, args.seq + 1), generator=g)
            yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    stream = batches()

    def step() -> None:
        train_step(engine, layout, stream, lambda logits, b: loss(logits, b["labels"]), 1, world)

    step()
    step()
    with torch.device("meta"):
        n_params = num_params(Llama(cfg.model))
    result["train_peak_rss"] = _hwm()  # build + two steps, before the first reset

    staging = _time_staging()
    savers = {
        "sync": Saver(cfg, world, layout),
        "async": Saver(bench_config(args, world.size, asynchronous=True), world, layout),
    }
    for key in ("sync_s", "sync_growth", "async_blocked_s", "async_complete_s", "async_growth", "staging_s"):
        result[key] = []
    for repeat in range(args.repeat):
        for kind in ("sync", "async"):
            step()
            saver, at = savers[kind], 2 + 2 * repeat + (kind == "async")
            last = repeat == args.repeat - 1 and kind == "async"
            if last:  # the checkpoint the resume will read
                result["checksum"] = _checksum(engine, cfg, layout)
            with PeakRSS() as mem:
                dist.barrier()
                began = time.perf_counter()
                saver.save(engine, at, 0, {}, None)
                blocked = time.perf_counter() - began
                saver.wait()
                complete = time.perf_counter() - began
            result["rss_before_save"] = mem.base
            if kind == "sync":
                result["sync_s"].append(complete)
            else:
                result["async_blocked_s"].append(blocked)
                result["async_complete_s"].append(complete)
                result["staging_s"].append(staging.pop())
            result[f"{kind}_growth"].append(mem.growth)
            assert saver.complete is not None and saver.complete.name == f"step_{at:09d}"
    result["final_step"] = at
    savers["async"].close()

    def gather_on_rank0() -> None:
        weights = consolidated_state_dict(engine, cfg, layout)
        moments = consolidated_moments(engine, cfg, layout)
        if world.is_main:
            held = sum(t.numel() * t.element_size() for t in (*weights.values(), *moments.values()))
            result["old_gathered_bytes"] = held
        del weights, moments
        dist.barrier()

    with PeakRSS() as mem:
        result["old_gather_s"] = _timed(gather_on_rank0)
    result["old_growth"] = mem.growth

    rows = gather_objects(result, world)
    if world.is_main:
        Path(out).write_text(json.dumps({"rows": rows, "params": n_params, "layout": layout.describe()}))
    finish_process()


def worker_resume(out: str, args) -> None:
    import torch
    import torch.distributed as dist

    from dist_llm.checkpoint import checkpoint_root, latest
    from dist_llm.distributed import finish_process, gather_objects, init_world
    from dist_llm.train.checkpoint import resume
    from dist_llm.train.start import build_training

    world = init_world()
    _smaller_buckets()
    cfg = bench_config(args, world.size, asynchronous=False)
    torch.randn(64, 64) @ torch.randn(64, 64)
    dist.barrier()
    began = time.perf_counter()
    path = latest(checkpoint_root(cfg))  # (checks that every listed file is there at its size)
    layout, engine = build_training(cfg, world, path)
    step, _, _ = resume(engine, cfg, world, layout, path)
    result = {
        "resume_s": time.perf_counter() - began,
        "step": step,
        "checksum": _checksum(engine, cfg, layout),
    }
    rows = gather_objects(result, world)
    if world.is_main:
        Path(out).write_text(json.dumps({"rows": rows, "path": str(path)}))
    finish_process()


# ---------------------------------------------------------------- the driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, ranks: int, args) -> dict:
    out = Path(args.dir) / f"{kind}_{ranks}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        f"--master_port={free_port()}",
        __file__,
        f"--worker={kind}",
        f"--out={out}",
        f"--dir={args.dir}",
        f"--seq={args.seq}",
        f"--zero={args.zero}",
        f"--repeat={args.repeat}",
        *(["--quick"] if args.quick else []),
    ]
    log = Path(args.dir) / f"{kind}_{ranks}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        while proc.poll() is None:
            if available_memory() < MIN_AVAILABLE:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: their own session
                proc.wait()
                raise SystemExit(
                    f"{kind} at {ranks} ranks stopped: the machine had under {MIN_AVAILABLE / GB:.1f} GB "
                    "available (a smaller model: --quick, or fewer --ranks)"
                )
            time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} at {ranks} ranks failed:\n{log.read_text()[-4000:]}")
    return json.loads(out.read_text())


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a ~10M-parameter model: a smoke run")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="saves of each kind (the fastest is shown)")
    parser.add_argument("--zero", type=int, choices=[1, 2], default=2, help="ZeRO stage")
    parser.add_argument("--dir", help="where the checkpoints go (default: a temporary folder, removed)")
    parser.add_argument("--worker", choices=["save", "resume"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (worker_save if args.worker == "save" else worker_resume)(args.out, args)
        return
    temporary = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_")
    try:
        results = {}
        for ranks in args.ranks:
            saved = launch("save", ranks, args)
            resumed = launch("resume", ranks, args)
            bad = [
                r
                for r, (a, b) in enumerate(zip(saved["rows"], resumed["rows"], strict=True))
                if a["checksum"] != b["checksum"] or b["step"] != a["final_step"]
            ]
            if bad:
                raise SystemExit(f"{ranks} ranks: ranks {bad} did not resume the saved state exactly")
            results[ranks] = (saved, resumed)
            shutil.rmtree(Path(args.dir) / f"ranks{ranks}", ignore_errors=True)
            print(f"  {ranks} rank(s) done", file=sys.stderr, flush=True)
    finally:
        if temporary:
            shutil.rmtree(args.dir, ignore_errors=True)
    report(results, args)


def slowest(rows: list[dict], key: str) -> float:
    """The slowest rank's time, of the fastest repeat (the machine is shared: noise only adds)."""
    return min(max(r[key][i] for r in rows) for i in range(len(rows[0][key])))


def growth(row: dict, key: str) -> int:
    return max(row[key])  # the larger of the repeats


def report(results: dict, args) -> None:
    first = next(iter(results.values()))[0]
    n_params, state = first["params"], first["params"] * STATE_BYTES_PER_PARAM
    print(
        f"model {n_params / 1e6:.1f}M params, seq {args.seq}, batch 1 per rank, fp32, ZeRO-{args.zero}, "
        f"torchrun + gloo on one machine ({os.cpu_count()} cores), 1 thread per rank; "
        f"full state (fp32 master + 2 Adam moments, {STATE_BYTES_PER_PARAM} B/param) {state / GB:.2f} GB "
        f"({n_params * 16 / GB:.2f} GB with the fp32 working weights)"
    )
    print(f"\ntimes in seconds, slowest rank (saves: the faster of {args.repeat})")
    print(
        f"{'ranks':>5}{'sync save':>11}{'async blocked':>15}{'of which copy':>15}{'async complete':>16}"
        f"{'blocked/sync':>14}{'old gather':>12}{'resume':>9}{'fresh build':>13}"
    )
    for ranks, (saved, resumed) in results.items():
        rows = saved["rows"]
        sync, blocked = slowest(rows, "sync_s"), slowest(rows, "async_blocked_s")
        print(
            f"{ranks:>5}{sync:>11.2f}{blocked:>15.2f}{slowest(rows, 'staging_s'):>15.2f}"
            f"{slowest(rows, 'async_complete_s'):>16.2f}{100 * blocked / sync:>13.0f}%"
            f"{max(r['old_gather_s'] for r in rows):>12.2f}{max(r['resume_s'] for r in resumed['rows']):>9.2f}"
            f"{max(r['fresh_build_s'] for r in rows):>13.2f}"
        )
    print("\npeak RSS growth during a save, GB (and as a share of the full state); RSS, GB")
    print(
        f"{'ranks':>5}{'rank0 sync':>16}{'rank0 async':>16}{'rank0 old':>16}{'others sync':>13}"
        f"{'others async':>14}{'state/rank':>12}{'RSS at save':>13}{'peak in steps':>15}"
    )
    for ranks, (saved, _) in results.items():
        rows = saved["rows"]
        zero = [
            f"{growth(rows[0], k) / GB:.2f} ({100 * growth(rows[0], k) / state:.0f}%)" for k in GROWTHS[:2]
        ]
        zero.append(f"{rows[0]['old_growth'] / GB:.2f} ({100 * rows[0]['old_growth'] / state:.0f}%)")
        others = [
            f"{max(growth(r, k) for r in rows[1:]) / GB:.2f}" if ranks > 1 else "-" for k in GROWTHS[:2]
        ]
        print(
            f"{ranks:>5}{zero[0]:>16}{zero[1]:>16}{zero[2]:>16}{others[0]:>13}{others[1]:>14}"
            f"{state / ranks / GB:>12.2f}{max(r['rss_before_save'] for r in rows) / GB:>13.2f}"
            f"{max(r['train_peak_rss'] for r in rows) / GB:>15.2f}"
        )

    print("\ntargets")
    for ranks, (saved, _) in results.items():
        rows = saved["rows"]
        sync, blocked = slowest(rows, "sync_s"), slowest(rows, "async_blocked_s")
        verdict = "met" if blocked <= 0.2 * sync else "NOT met"
        print(
            f"  {ranks} rank(s): async blocked {blocked:.2f} s = {100 * blocked / sync:.0f}% "
            f"of a sync save ({sync:.2f} s), target <= 20%: {verdict}"
        )
    widest = max(results)
    zero = results[widest][0]["rows"][0]
    shares = [growth(zero, k) for k in GROWTHS[:2]] + [zero["old_growth"]]
    for grew, what in zip(shares, ("sync save", "async save", "old gather"), strict=True):
        verdict = "met" if grew <= state / 3 else "NOT met"
        print(
            f"  {widest} ranks, {what}: rank 0 grows {grew / GB:.2f} GB = {100 * grew / state:.0f}% "
            f"of the full state, target <= 33%: {verdict}"
        )


if __name__ == "__main__":
    main()
