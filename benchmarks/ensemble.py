"""Ensembles of reward models (issue 13): the default recipe alone against ``--ensemble 4``.

    python -m benchmarks.ensemble train      # 3 seeds x (single, ensemble of 4), one at a time
    python -m benchmarks.ensemble evaluate   # export each checkpoint, score dev per member
    python -m benchmarks.ensemble cost       # ORT scoring cost per pair, single vs ensemble
    python -m benchmarks.ensemble summary    # the table of docs/training.md from the JSON
    python -m benchmarks.ensemble timing     # seed 0's two runs again, on a quieter machine
    python -m benchmarks.ensemble independent  # 3 seeds x --ensemble-diversity independent
    python -m benchmarks.ensemble train --seeds 3 4  # more seeds (then evaluate, summary)

Each stage appends to ``benchmarks/results/cpu/ensemble.json`` as each measurement comes (a
stopped run keeps what it measured; ``train`` and ``evaluate`` skip what is already there), and
keeps its checkpoints and bundles under ``artifacts/ensemble-bench/`` (not in git).

- ``train`` runs ``rmserve train`` (the default recipe: the minilm-hh preset on HH-harmless,
  evaluated on dev) with ``--seed S`` and with ``--seed S --ensemble 4``, seeds 0, 1, 2,
  single and ensemble alternating so that both see the same machine conditions. It records
  the wall time of the whole command, the CPU seconds it used (user + system, what the time
  would be on free cores) and the load average around it: the machine is shared.
- ``evaluate`` exports each checkpoint (fp32) and scores the 240 dev pairs with the bundle
  through onnxruntime: the accuracy of each member and of their mean, the members'
  disagreement, and the accuracy per quartile of the pairs' uncertainty (the std over members
  of the margin r(chosen) - r(rejected)).
- ``cost`` scores the same dev batches with the single bundle and the ensemble bundle of one
  seed, interleaved round by round, and reports the median time per pair of each and their
  ratio.
- ``independent`` trains ``--ensemble 4 --ensemble-diversity independent`` (K whole models,
  each on its own bootstrap resample and seed) for the same seeds, evaluates each as
  ``evaluate`` does, and measures its serving cost against one of its own members exported
  alone (a single model of the default recipe: the same architecture and length).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "cpu" / "ensemble.json"
LOGS = REPO_ROOT / "benchmarks" / "results" / "cpu" / "logs"
WORK = REPO_ROOT / "artifacts" / "ensemble-bench"
DEV = REPO_ROOT.parent / "shared" / "data" / "hh-harmless" / "dev.jsonl.gz"
SEEDS = (0, 1, 2)
MEMBERS = 4


def _load() -> dict[str, Any]:
    if RESULTS.is_file():
        data: dict[str, Any] = json.loads(RESULTS.read_text())
        return data
    return {"train": {}, "evaluate": {}, "cost": None}


def _save(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def _result_key(name: str, seeds: tuple[int, ...]) -> str:
    """Where a stage over seeds stores its record: ``name`` for the default seeds, else
    ``name_seeds_0-1-2-3-4``, so that more seeds do not replace the three the docs quote."""
    return name if seeds == SEEDS else f"{name}_seeds_" + "-".join(map(str, seeds))


def _runs(
    members: int, seeds: tuple[int, ...], prefix: str = ""
) -> list[tuple[str, int, list[str]]]:
    """(name, seed, extra flags), single and ensemble alternating."""
    runs: list[tuple[str, int, list[str]]] = []
    for seed in seeds:
        runs.append((f"{prefix}single-seed{seed}", seed, []))
        runs.append((f"{prefix}ensemble{members}-seed{seed}", seed, ["--ensemble", str(members)]))
    return runs


def _independent_runs(members: int, seeds: tuple[int, ...]) -> list[tuple[str, int, list[str]]]:
    flags = ["--ensemble", str(members), "--ensemble-diversity", "independent"]
    return [(f"independent{members}-seed{seed}", seed, flags) for seed in seeds]


def train(
    members: int,
    seeds: tuple[int, ...],
    prefix: str = "",
    runs: list[tuple[str, int, list[str]]] | None = None,
) -> None:
    """Train each run not yet recorded, one at a time (never two: 2 cores). ``prefix``
    names a repeat of runs (``timing-``: the same runs again, for their time alone);
    ``runs``: others than single and ensemble alternating."""
    LOGS.mkdir(parents=True, exist_ok=True)
    for name, seed, extra in runs or _runs(members, seeds, prefix):
        results = _load()
        if name in results["train"]:
            continue
        out = WORK / name
        command = [sys.executable, "-m", "rmserve.cli", "train", "--seed", str(seed)]
        command += ["--out", str(out), "--no-progress", *extra]
        print(f"ensemble bench: training {name}: {' '.join(command[2:])}", flush=True)
        load_before = os.getloadavg()
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        with open(LOGS / f"ensemble-{name}.log", "w") as log:
            done = subprocess.run(
                command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True
            )
        wall = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed (exit {done.returncode}); see {log.name}")
        summary = json.loads([x for x in done.stdout.splitlines() if x.startswith("{")][-1])
        results = _load()
        results["train"][name] = {
            "seed": seed,
            "members": members if extra else 1,
            "command": "rmserve train " + " ".join(command[4:]),
            "wall_s": round(wall, 1),
            "cpu_s": round(
                (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime),
                1,
            ),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "summary": summary,
        }
        _save(results)
        print(f"ensemble bench: {name}: {wall:.0f} s, dev {summary.get('eval_accuracy')}")


def _bootstrap_gap(
    correct: Any, uncertainty: Any, resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Accuracy of the least uncertain quartile minus the most uncertain one, with a 95%
    percentile interval from resampling the pairs (the quartiles recomputed each time)."""
    import numpy as np

    def gap(index: Any) -> float:
        order = index[np.argsort(uncertainty[index], kind="stable")]
        quarter = len(order) // 4
        return float(correct[order[:quarter]].mean() - correct[order[-quarter:]].mean())

    rng = np.random.default_rng(seed)
    everything = np.arange(len(correct))
    draws = [gap(rng.choice(everything, size=len(everything))) for _ in range(resamples)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"gap": gap(everything), "ci95_low": float(low), "ci95_high": float(high)}


def _dev_encoded(bundle: Path) -> tuple[Any, Any]:
    from rmserve.encoding import PairEncoder
    from rmserve.manifest import load_bundle
    from rmserve.training.data import read_examples
    from rmserve.training.pairs import encode_examples

    manifest = load_bundle(bundle)
    encoder = PairEncoder.from_file(
        str(bundle / "tokenizer.json"), manifest.max_length, manifest.text_format
    )
    examples = read_examples(str(DEV)).examples
    return manifest, encode_examples(examples, encoder, manifest.text_format)


def evaluate(
    members: int, seeds: tuple[int, ...], runs: list[tuple[str, int, list[str]]] | None = None
) -> None:
    """Export each trained checkpoint (fp32) and score dev through onnxruntime."""
    from rmserve.training.data import read_examples
    from rmserve.training.export import ExportOptions, export_bundle
    from rmserve.training.pairs import pair_metrics, score_pairs
    from rmserve.training.scoring import onnx_scorer
    from rmserve.training.uncertainty import ensemble_metrics, score_members

    dev = read_examples(str(DEV)).examples
    for name, _, _ in runs or _runs(members, seeds):
        results = _load()
        if name not in results["train"] or name in results["evaluate"]:
            continue
        bundle = WORK / f"{name}-bundle"
        print(f"ensemble bench: exporting and evaluating {name}", flush=True)
        started = time.perf_counter()
        export_bundle(WORK / name, bundle, ExportOptions(eval_data=str(DEV)), eval_pairs=dev)
        export_s = time.perf_counter() - started
        manifest, encoded = _dev_encoded(bundle)
        scorer = onnx_scorer(str(bundle / "model.onnx"))
        record: dict[str, Any] = {"export_s": round(export_s, 1)}
        measures: dict[str, Any] = {}
        if manifest.ensemble is None:
            scores = score_pairs(encoded, scorer, manifest.pad_token_id)
        else:
            by_member = score_members(encoded, scorer, manifest.pad_token_id)
            scores = by_member.mean()
            record |= ensemble_metrics(by_member)
            record["member_parity"] = list(manifest.ensemble.member_parity)
            measures = _uncertainty_measures(by_member)
        record["accuracy"] = float(pair_metrics(scores)["accuracy"])
        record["uncertainty_measures"] = _judge(measures, scores)
        record["manifest_accuracy"] = manifest.evaluation.accuracy if manifest.evaluation else None
        results = _load()
        results["evaluate"][name] = record
        _save(results)
        print(f"ensemble bench: {name}: dev accuracy {record['accuracy']:.4f}", flush=True)


def _uncertainty_measures(by_member: Any) -> dict[str, Any]:
    """Every candidate measure of a pair's uncertainty (larger: less sure)."""
    import numpy as np

    scores = by_member.mean()
    margin_std = by_member.margin_std()
    mean_margin = np.abs(scores.chosen - scores.rejected)
    return {
        "margin_std": margin_std,  # what rmserve eval reports
        "response_std": (by_member.chosen.std(axis=1) + by_member.rejected.std(axis=1)) / 2,
        # the spread relative to the decision's own size
        "margin_std_over_abs_margin": margin_std / (mean_margin + 1e-12),
    }


def _judge(measures: dict[str, Any], scores: Any) -> dict[str, Any]:
    """Accuracy per quartile of each measure, and bottom minus top quartile with its CI."""
    import numpy as np

    from rmserve.training.uncertainty import uncertainty_bins

    margin = scores.chosen - scores.rejected
    correct = np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0))
    # The baseline any model has, ensemble or not: a small |margin| is an uncertain pair.
    measures = {**measures, "negative_abs_margin": -np.abs(margin)}
    return {
        measure: {
            "quartiles": [
                {"min": lo, "max": hi, "accuracy": acc, "pairs": n}
                for lo, hi, acc, n in uncertainty_bins(values, scores)
            ],
            "bottom_minus_top": _bootstrap_gap(correct, values),
        }
        for measure, values in measures.items()
    }


def cross_seed(seeds: tuple[int, ...]) -> None:
    """The single models of the seeds taken together as an ensemble of independent models
    (each its own seed: head, dropout, data order; no bootstrap): what more diversity than
    shared-backbone heads gives, at no training cost here (K times the serving cost)."""
    from rmserve.training.pairs import pair_metrics
    from rmserve.training.scoring import onnx_scorer, stacked_scorer
    from rmserve.training.uncertainty import ensemble_metrics, score_members

    bundles = [WORK / f"single-seed{s}-bundle" for s in seeds]
    if len(bundles) < 2 or not all((b / "rmserve.json").is_file() for b in bundles):
        print("ensemble bench: cross-seed needs 2+ single bundles; run evaluate first")
        return
    manifest, encoded = _dev_encoded(bundles[0])
    scorer = stacked_scorer([onnx_scorer(str(b / "model.onnx")) for b in bundles])
    by_member = score_members(encoded, scorer, manifest.pad_token_id)
    record: dict[str, Any] = {"seeds": list(seeds)}
    record["accuracy"] = float(pair_metrics(by_member.mean())["accuracy"])
    record |= ensemble_metrics(by_member)
    record["uncertainty_measures"] = _judge(_uncertainty_measures(by_member), by_member.mean())
    results = _load()
    results[_result_key("cross_seed", seeds)] = record
    _save(results)
    print(f"ensemble bench: cross-seed ensemble of {len(seeds)}: {record['accuracy']:.4f}")


def independent_cost(members: int, seed: int, rounds: int, batch_sizes: tuple[int, ...]) -> None:
    """The independent ensemble's serving cost against its first member exported alone."""
    from rmserve.training.data import read_examples
    from rmserve.training.export import ExportOptions, export_bundle

    name = f"independent{members}-seed{seed}"
    member = WORK / f"{name}-member0-bundle"
    if not (member / "rmserve.json").is_file():
        dev = read_examples(str(DEV)).examples
        export_bundle(
            WORK / name / "member_0", member, ExportOptions(eval_data=str(DEV)), eval_pairs=dev
        )
    bundles = {"single": member, f"independent{members}": WORK / f"{name}-bundle"}
    cost(members, seed, rounds, batch_sizes, bundles=bundles, key="independent_cost")


def cost(
    members: int,
    seed: int,
    rounds: int,
    batch_sizes: tuple[int, ...],
    bundles: dict[str, Path] | None = None,
    key: str = "cost",
) -> None:
    """Median time per dev pair of the single and the ensemble bundle, the same batches,
    interleaved round by round (the machine's load drifts; the ratio stays comparable).
    ``bundles``: "single" and the other, recorded under ``key``."""
    import onnxruntime as ort

    from rmserve.training.scoring import pad_batch

    bundles = bundles or {
        "single": WORK / f"single-seed{seed}-bundle",
        f"ensemble{members}": WORK / f"ensemble{members}-seed{seed}-bundle",
    }
    other = next(name for name in bundles if name != "single")
    manifest, encoded = _dev_encoded(bundles["single"])
    order = sorted(range(len(encoded.ids)), key=lambda i: len(encoded.ids[i]))
    pairs = len(encoded.winners)
    sessions = {}
    for name, bundle in bundles.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one core each: less noise from the shared machine
        options.inter_op_num_threads = 1
        sessions[name] = ort.InferenceSession(
            str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
    record: dict[str, Any] = {
        "seed": seed,
        "pairs": pairs,
        "rounds": rounds,
        "threads": 1,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    for batch_size in batch_sizes:
        batches = [
            pad_batch([encoded.ids[i] for i in order[s : s + batch_size]], manifest.pad_token_id)
            for s in range(0, len(order), batch_size)
        ]
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for session in sessions.values():  # warm-up pass, not timed
            for ids, mask in batches:
                session.run(["reward"], {"input_ids": ids, "attention_mask": mask})
        for r in range(rounds):
            names = list(sessions) if r % 2 == 0 else list(reversed(sessions))
            for name in names:
                started = time.perf_counter()
                for ids, mask in batches:
                    sessions[name].run(["reward"], {"input_ids": ids, "attention_mask": mask})
                times[name].append((time.perf_counter() - started) / pairs)
        medians = {name: statistics.median(t) for name, t in times.items()}
        single, ensemble = medians["single"], medians[other]
        record[f"batch{batch_size}"] = {
            "ms_per_pair": {name: round(v * 1e3, 4) for name, v in medians.items()},
            "ratio": round(ensemble / single, 4),
            "ratio_per_round": [
                round(e / s, 4) for s, e in zip(times["single"], times[other], strict=True)
            ],
        }
        print(f"ensemble bench: cost batch {batch_size}: {record[f'batch{batch_size}']}")
    record["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    record["model_bytes"] = {
        name: (bundle / "model.onnx").stat().st_size for name, bundle in bundles.items()
    }
    results = _load()
    results[key] = record
    _save(results)


def summary(members: int, seeds: tuple[int, ...]) -> dict[str, Any]:
    """Means and sds over seeds, from the JSON; printed and stored (:func:`_result_key`)."""
    results = _load()

    def stats(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}

    table: dict[str, Any] = {}
    recipes = ("single", f"ensemble{members}", f"independent{members}")
    for recipe, prefix in ((r, r) for r in recipes):
        names = [f"{prefix}-seed{s}" for s in seeds]
        trained = [results["train"][n] for n in names if n in results["train"]]
        evaluated = [results["evaluate"][n] for n in names if n in results["evaluate"]]
        row: dict[str, Any] = {
            "dev_accuracy_at_training": stats([t["summary"]["eval_accuracy"] for t in trained]),
            "dev_accuracy_onnx": stats([e["accuracy"] for e in evaluated]),
            "wall_s": stats([t["wall_s"] for t in trained]),
            "cpu_s": stats([t["cpu_s"] for t in trained]),
            "train_loop_s": stats([t["summary"]["seconds"] for t in trained]),
        }
        if recipe != "single" and evaluated:
            row["member_accuracy"] = stats([a for e in evaluated for a in e["member_accuracy"]])
            for key in ("mean_margin_std", "mean_std", "split_pairs", "member_agreement"):
                row[key] = stats([e["disagreement"][key] for e in evaluated])
            for part in ("unanimous", "split"):
                row[f"accuracy_{part}"] = stats(
                    [e["accuracy_by_agreement"][part]["accuracy"] for e in evaluated]
                )
                row[f"pairs_{part}"] = stats(
                    [e["accuracy_by_agreement"][part]["pairs"] for e in evaluated]
                )
        if evaluated:
            # Least uncertain quartile's accuracy, most uncertain's, and their gap, per measure.
            row["uncertainty"] = {
                measure: {
                    "bottom_quartile_accuracy": stats(
                        [
                            e["uncertainty_measures"][measure]["quartiles"][0]["accuracy"]
                            for e in evaluated
                        ]
                    ),
                    "top_quartile_accuracy": stats(
                        [
                            e["uncertainty_measures"][measure]["quartiles"][-1]["accuracy"]
                            for e in evaluated
                        ]
                    ),
                    "gap": stats(
                        [
                            e["uncertainty_measures"][measure]["bottom_minus_top"]["gap"]
                            for e in evaluated
                        ]
                    ),
                }
                for measure in evaluated[0]["uncertainty_measures"]
            }
        table[recipe] = row
    paired = [
        results["evaluate"][f"ensemble{members}-seed{s}"]["accuracy"]
        - results["evaluate"][f"single-seed{s}"]["accuracy"]
        for s in seeds
        if f"ensemble{members}-seed{s}" in results["evaluate"]
        and f"single-seed{s}" in results["evaluate"]
    ]
    table["ensemble_minus_single_same_seed"] = stats(paired)
    table["independent_minus_single_same_seed"] = stats(
        [
            results["evaluate"][f"independent{members}-seed{s}"]["accuracy"]
            - results["evaluate"][f"single-seed{s}"]["accuracy"]
            for s in seeds
            if f"independent{members}-seed{s}" in results["evaluate"]
            and f"single-seed{s}" in results["evaluate"]
        ]
    )
    results = _load()
    results[_result_key("summary", seeds)] = table
    _save(results)
    print(json.dumps(table, indent=2))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ensemble", description=__doc__)
    parser.add_argument(
        "stage",
        choices=["train", "evaluate", "cost", "summary", "timing", "independent", "all"],
    )
    parser.add_argument("--members", type=int, default=MEMBERS)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--cost-seed", type=int, default=0, help="bundles the cost stage compares")
    parser.add_argument("--rounds", type=int, default=7, help="cost stage: timed passes each")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args(argv)
    seeds = tuple(args.seeds)
    if args.stage in ("train", "all"):
        train(args.members, seeds)
    if args.stage == "timing":  # a repeat of seed 0's two runs when the machine is quiet
        train(args.members, seeds[:1], prefix="timing-")
    if args.stage in ("evaluate", "all"):
        evaluate(args.members, seeds)
        cross_seed(seeds)
    if args.stage in ("cost", "all"):
        cost(args.members, args.cost_seed, args.rounds, tuple(args.batch_sizes))
    if args.stage == "independent":
        runs = _independent_runs(args.members, seeds)
        train(args.members, seeds, runs=runs)
        evaluate(args.members, seeds, runs=runs)
        independent_cost(args.members, args.cost_seed, args.rounds, tuple(args.batch_sizes))
    if args.stage in ("summary", "independent", "all"):
        summary(args.members, seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
