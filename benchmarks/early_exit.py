"""Early exit in time, not just FLOPs: for each exit k of a network on a device,

    flops_ratio    cumulative FLOPs up to exit k / the whole network's
    latency_ratio  share of a plain forward's time spent up to and including exit k, timed stage by stage
    time_ratio     evaluation.early_exit_predict with every sample leaving at exit k / a plain forward

plus one row {"exit": "all"} (the whole network run exit by exit, every sample to the end, against a plain
forward) and one mixed case (thresholds fitted on the network's own outputs so that equal shares of the
samples leave at every exit). Each path is measured in the same run: eager fp32, and the fast inference copy
(hdkdlib.inference: BatchNorm folded; --paths adds channels-last or bf16). The realised share of the saving
that FLOPs promise is (1 - time_ratio) / (1 - flops_ratio).

    python benchmarks/early_exit.py --device cpu --json            # msdnet_cifar_anytime, batch 256
    python benchmarks/early_exit.py --device cuda --out early_exit.json

Timings: a warm-up pass, then the median of --repeats. No number here is asserted by a test.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from hdkdlib import cost, evaluation, inference, models, runinfo

PATHS = ("eager", "fast", "fast+cl", "fast+bf16")


def _timed(fn, device, repeats, warmup=1):
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def network_for(model, path: str):
    """The network a path runs: the model itself (eager) or its fast inference copy."""
    if path == "eager":
        return model.eval()
    return inference.fast_copy(model, channels_last="cl" in path)


def measure_path(model, path, x, repeats) -> dict:
    device = x.device
    net = network_for(model, path)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in path else nullcontext()
    xin = x.contiguous(memory_format=torch.channels_last) if "cl" in path else x
    K, n = net.num_exits, len(x)
    with torch.no_grad(), autocast:
        forward = _timed(lambda: net(xin), device, repeats)
        stage = cost.latency(net, tuple(x.shape[1:]), batch_size=n, repeats=repeats, warmup=1, device=device,
                             memory_format=torch.channels_last if "cl" in path else torch.contiguous_format)
        flops = cost.exit_flops(model, tuple(x.shape[1:]))

        def leave_at(k):  # thresholds: nobody leaves before k, everybody at k
            return [math.inf] * k + [-math.inf] * (K - k)
        rows = []
        for k in range(K):
            t = _timed(lambda: evaluation.early_exit_predict(net, xin, leave_at(k), batch_size=n), device, repeats)
            rows.append({"exit": k + 1, "flops_ratio": flops[k] / flops[-1], "latency_ratio": stage[k] / stage[-1],
                         "time_ratio": t / forward})
        rows.append({"exit": "all", "time_ratio": rows[-1]["time_ratio"]})
        probs = torch.stack([torch.softmax(z.float(), 1) for z in net(xin)]).cpu()
        # thresholds from other images (as from a validation split): fitted on these very probabilities, a
        # threshold would equal a sample's confidence, and rounding in a smaller batch could flip that sample
        calibration = torch.stack([torch.softmax(z.float(), 1) for z in net(xin.flip(0).roll(1, dims=-1))]).cpu()
        thresholds = evaluation.fit_thresholds(calibration, evaluation.exit_shares(1.0, K))
        mixed = evaluation.early_exit_predict(net, xin, thresholds, batch_size=n, exit_flops=flops)
        t_mixed = _timed(lambda: evaluation.early_exit_predict(net, xin, thresholds, batch_size=n), device, repeats)
        simulated = evaluation.apply_thresholds(probs, torch.zeros(n, dtype=torch.long), thresholds, flops)
        same = mixed["predictions"].cpu() == probs.max(2).indices.gather(0, simulated["exit_index"].view(1, -1))[0]
        graphs = stage_graph_rows(net, xin, forward, repeats) if n == 1 and "bf16" not in path else None
    for r in rows:
        if r["exit"] != "all":
            saved = 1 - r["flops_ratio"]
            r["realised_saving"] = (1 - r["time_ratio"]) / saved if saved > 0 else None
    return {"path": path, "forward_ms_per_image": 1000 * forward / n, "rows": rows,
            "mixed": {"thresholds_for": "equal shares at every exit", "flops_ratio": mixed["flops"] / n / flops[-1],
                      "time_ratio": t_mixed / forward,
                      "exit_fractions": torch.bincount(mixed["exit_index"].cpu(), minlength=K).div(n).tolist(),
                      "predictions_equal_to_simulation": int(same.sum()), "samples": n},
            **({"stage_graphs": graphs} if graphs is not None else {})}


def stage_graph_rows(net, x, forward_s, repeats) -> list:
    """Batch 1: inference.StageGraphs (a CUDA graph per stage on a GPU, eager stages elsewhere) leaving at each
    exit, as a fraction of the plain forward's time."""
    K = net.num_exits
    graphs = inference.StageGraphs(net, capture=x.is_cuda)
    rows = []
    for k in range(K):
        thresholds = [math.inf] * k + [-math.inf] * (K - k)
        t = _timed(lambda: graphs.predict(x, thresholds), x.device, repeats)
        rows.append({"exit": k + 1, "time_ratio": t / forward_s, "captured": x.is_cuda})
    return rows


def agreement(model, path, x) -> dict:
    """How many of the fast path's per-exit predictions differ from eager fp32's (rounding only)."""
    if path == "eager":
        return {"differing_predictions": 0, "compared": 0}
    net = network_for(model, path)
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if "bf16" in path else nullcontext()
    with torch.no_grad():
        ref = [z.argmax(1) for z in model.eval()(x)]
        with autocast:
            got = [z.argmax(1) for z in net(x.contiguous(memory_format=torch.channels_last) if "cl" in path else x)]
    return {"differing_predictions": int(sum((a != b).sum() for a, b in zip(ref, got))),
            "compared": sum(len(a) for a in ref)}


def flat_rows(record: dict) -> list:
    rows = []
    for result in record["paths"]:
        rows += [{"path": result["path"], **r} for r in result["rows"]]
        rows.append({"path": result["path"], "exit": "mixed", **{k: result["mixed"][k] for k in
                                                                  ("flops_ratio", "time_ratio", "exit_fractions")}})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="msdnet_cifar_anytime")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--paths", nargs="+", default=["eager", "fast"], choices=PATHS)
    p.add_argument("--json", action="store_true", help="print a JSON list of {path, exit, flops_ratio, latency_ratio, "
                                                       "time_ratio, ...} instead of tables")
    p.add_argument("--out", default="", help="also write the JSON record to this file")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.build(args.arch, args.num_classes).to(device).eval()
    # Trained-looking BatchNorm statistics, so folding changes numbers as it would on a trained network.
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(args.batch_size, *model.input_shape, device=device)
    record = {"device": runinfo.device_name(device), "torch": torch.__version__, "host": platform.node(),
              "threads": torch.get_num_threads(), "arch": args.arch, "batch_size": args.batch_size,
              "command": "python benchmarks/early_exit.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "paths": []}
    for path in args.paths:
        result = measure_path(model, path, x, args.repeats)
        result["agreement_with_eager"] = agreement(model, path, x)
        record["paths"].append(result)
        if args.out:  # after every path: a deadline reached in a later path keeps the ones measured
            write_record(Path(args.out), record)
        if not args.json:
            print(f"== {path}: plain forward {result['forward_ms_per_image']:.3f} ms/image "
                  f"({record['device']}, batch {args.batch_size})")
            print(f"{'exit':>4} {'flops':>7} {'latency':>8} {'time':>7} {'realised':>9}")
            for r in result["rows"]:
                if r["exit"] == "all":
                    print(f"{'all':>4} {'':>7} {'':>8} {r['time_ratio']:>7.3f}")
                else:
                    print(f"{r['exit']:>4} {r['flops_ratio']:>7.3f} {r['latency_ratio']:>8.3f} {r['time_ratio']:>7.3f} "
                          f"{r['realised_saving'] if r['realised_saving'] is not None else float('nan'):>9.2f}")
            m = result["mixed"]
            print(f"mixed (equal shares): flops {m['flops_ratio']:.3f}, time {m['time_ratio']:.3f}; predictions equal to "
                  f"the simulation: {m['predictions_equal_to_simulation']}/{m['samples']}; differing from eager: "
                  f"{result['agreement_with_eager']['differing_predictions']}/{result['agreement_with_eager']['compared']}")
    if args.json:  # a flat list: one row per path and exit, the "all" row and the mixed case of each path
        print(json.dumps(flat_rows(record), indent=1))
    if args.out:
        write_record(Path(args.out), record)
    return record


def write_record(out: Path, record: dict) -> None:
    """The whole record in place at once (a temporary file, then renamed): a kill never leaves half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
