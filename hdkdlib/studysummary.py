"""A study's tables, computed from its records (hdkdlib.studyrecords) alone: per-exit test top-1 (mean ± sd over
seeds), the per-seed means the protocols' rules read, paired differences with their tests (mean, SE, 95%
interval, p), validation accuracy, learned weights, and per run its device, speed and command. Markdown text:
SUMMARY.md of each study and the index results/README.md are this module's output, never edited by hand."""
from __future__ import annotations

import re
from typing import Dict, List

import numpy as np
import pandas as pd

from . import config, objectives, resume, stats
from .records import read_text as records_text
from .studyrecords import Study, per_exit, seed_of, variant


def mean_sd(values: pd.Series, sign: str = "") -> str:
    """The cell of a per-seed quantity: "mean ± sd" (sample sd), or the mean alone for one seed; sign "+" for
    differences."""
    if len(values) > 1:
        return f"{values.mean():{sign}.2f} ± {values.std(ddof=1):.2f}"
    return f"{values.mean():{sign}.2f}"


def _median(values):
    return float(np.median(values)) if len(values) else float("nan")


def baselines_of(variant_name: str, baseline: str, variants, untagged: bool = True) -> list:
    """The baseline run sets a variant is paired with: the baseline with each prefix of the variant's tag that was
    run, longest first (dbt-n100 with ce-n100; hdkd-n50-w50 with ce-n50: the same protocol, a switch added;
    hdkd-n50-s143 with ce-n50-s143 and with ce-n50), else, if untagged, the untagged baseline (hdkd-T3 with ce)."""
    parts = variant_name.split("-")[1:]
    names = ("-".join([baseline, *parts[:k]]) for k in range(len(parts), 0, -1))
    tagged = [n for n in names if n in variants and n != variant_name]
    return tagged or ([baseline] if untagged and baseline in variants and baseline != variant_name else [])


def comparisons(variants, baselines=("ce", "dbt")) -> list:
    """The (variant, baseline run set) pairs the summary reports, fixed methods first: every variant against CE,
    learned-weight variants against DBT too."""
    pairs = []
    for v in sorted(variants, key=lambda v: (v.split("-")[0] in objectives.LEARNED, v)):
        method = v.split("-")[0]
        for b in baselines:
            if b == "ce" or method in objectives.LEARNED:
                # a baseline's own variants (ce-n50-s143) pair with its shorter tags only (ce-n50), not untagged
                pairs += [(v, base) for base in baselines_of(v, b, variants, untagged=method != b)]
    return pairs


def paired_frames(table: pd.DataFrame, baselines=("ce", "dbt"), held_out: Dict[str, float] = None,
                  exits=None) -> tuple:
    """(differences, tests): per comparison, the per-exit test top-1 difference of runs with the same seed (same
    split and initial network) as "mean ± sd" over the seeds both have, and, with 2+ seeds, the test of the mean
    over exits (or over `exits`, e.g. (1, 2)): mean, SE, 95% interval, p. Every variant against CE (dbt − ce is the
    positive control of distillation), learned-weight variants against DBT too; pairs run at several learning
    rates also pooled over them and, given each variant's `held_out` top-1, each method at its held-out-best lr.
    `table`: one row per run and exit (run, variant, exit, top1 as a fraction), as studyrecords.per_exit gives."""
    seed = table["run"].map(seed_of)
    top1 = (100 * table.assign(seed=seed).pivot_table(index=["variant", "seed"], columns="exit", values="top1"))
    if exits is not None:
        top1 = top1[[e for e in exits if e in top1.columns]]
    differences, pairs = {}, {}
    for v, base in comparisons(set(top1.index.get_level_values(0)), baselines):
        seeds = sorted(set(top1.loc[v].index) & set(top1.loc[base].index))
        if seeds:
            differences[f"{v} − {base}"] = top1.loc[v].loc[seeds] - top1.loc[base].loc[seeds]
            pairs[f"{v} − {base}"] = (v, base)
    for name, members in lr_groups(pairs).items():
        seeds = sorted(set.intersection(*(set(differences[m].index) for _, m in members)))
        if len(members) > 1 and seeds:
            lrs = ", lr".join(lr for lr, _ in members)
            differences[f"{name} (mean over lr{lrs})"] = sum(differences[m].loc[seeds] for _, m in members) / len(members)
        if len(members) > 1 and held_out:
            v, base = (max((pairs[m][k] for _, m in members), key=lambda x: held_out.get(x, -1)) for k in (0, 1))
            seeds = sorted(set(top1.loc[v].index) & set(top1.loc[base].index))
            differences[f"{v} − {base} (each at its held-out-best lr)"] = top1.loc[v].loc[seeds] - top1.loc[base].loc[seeds]
    rows, tests = [], []
    for name, d in differences.items():
        d = d.assign(**{"mean over exits": d.mean(axis=1)})
        cells = {(f"exit {c}" if c != "mean over exits" else c): mean_sd(d[c], "+") for c in d.columns}
        rows.append({"difference": name, "seeds": len(d), **cells})
        if len(d) > 1:
            tests.append(paired_test_row(name, d["mean over exits"]))
    return pd.DataFrame(rows), pd.DataFrame(tests)


LR_TAG = re.compile(r"-lr(\d+)(?=-|$)")


def lr_groups(pairs: Dict[str, tuple]) -> Dict[str, list]:
    """Comparisons made at several learning rates (tags lr01, lr02: the same pair of methods at each), grouped:
    {"dbt-n20-lr*-s100 − ce-n20-lr*": [("01", its comparison's name), ("02", ...)]}, lrs in order. A protocol that
    judges a method at no single step size reads their pooled difference (tin100-cpu-control's C1)."""
    groups: Dict[str, list] = {}
    for name, (v, base) in pairs.items():
        lrs = LR_TAG.findall(v)
        if len(lrs) == 1 and LR_TAG.findall(base) == lrs:
            groups.setdefault(f"{LR_TAG.sub('-lr*', v)} − {LR_TAG.sub('-lr*', base)}", []).append((lrs[0], name))
    return {name: sorted(members) for name, members in groups.items()}


def paired_differences(table: pd.DataFrame, baselines=("ce", "dbt"), held_out: Dict[str, float] = None) -> list:
    """Markdown lines of paired_frames' tables: the differences, their tests, and the tests of exits 1-2."""
    rows, tests = paired_frames(table, baselines, held_out)
    if rows.empty:
        return []
    lines = ["", "Paired differences of test top-1 (points), same seed = same split and initial network; "
                 "mean ± sd over seeds:", "", rows.to_markdown(index=False, disable_numparse=True)]
    if not tests.empty:
        lines += ["", "Paired tests of the mean over exits (points; t-test on the per-seed differences, the 95% "
                      "interval two-sided; sign-flip: exact permutation p of mean > 0). Read by the protocol's rule, "
                      "not by eye:", "", tests.to_markdown(index=False, disable_numparse=True)]
        early = paired_frames(table, baselines, held_out, exits=(1, 2))[1]
        lines += ["", "The same tests of the mean over exits 1 and 2 (the protocols' secondary reading):", "",
                  early.to_markdown(index=False, disable_numparse=True)]
    return lines


def paired_test_row(name: str, differences: pd.Series) -> dict:
    """One row of the paired-tests table: mean, SE, 95% interval and p values of per-seed differences."""
    try:
        r = stats.paired_test(differences.to_numpy())
    except ImportError as e:  # a lent GPU without scipy: the summary is rebuilt on the CPU machine
        return {"difference": name, "seeds": len(differences), "mean": f"{differences.mean():+.2f}", "SE": str(e)}
    return {"difference": name, "seeds": r["n"], "mean": f"{r['mean']:+.2f}", "SE": f"{r['se']:.2f}",
            "95% interval": f"[{r['low']:+.2f}, {r['high']:+.2f}]", "p (one-sided, > 0)": p_value(r["p_greater"]),
            "p (two-sided)": p_value(r["p_two_sided"]), "p (sign-flip, > 0)": p_value(r["p_sign_flip"])}


def p_value(p: float) -> str:
    """A p value to three decimals; one that would print as 0.000 prints as < 0.001 (it is not zero)."""
    return "< 0.001" if p < 0.0005 else f"{p:.3f}"


def per_seed_rows(table: pd.DataFrame) -> list:
    """Markdown lines: per variant and seed, the test top-1 (%) mean over the exits: the number the protocols'
    per-seed rules read (a paired difference is two cells of one column)."""
    seed = table["run"].map(seed_of)
    means = (100 * table.assign(seed=seed).groupby(["variant", "seed"]).top1.mean()).unstack("seed")
    cells = means.map(lambda v: "" if np.isnan(v) else f"{v:.2f}").rename(columns=lambda s: f"seed {s}")
    return ["", "Test top-1 (%) per seed, mean over the exits:", "",
            cells.rename_axis(index="run", columns=None).reset_index().to_markdown(index=False, disable_numparse=True)]


def per_exit_cells(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of (variant, exit, top1 in %) as a table: a row per variant, "mean ± sd" over seeds per exit column."""
    return rows.groupby(["variant", "exit"]).top1.agg(mean_sd).unstack("exit").rename(columns=lambda k: f"exit {k}")


def validation_rows(last_epochs: Dict[str, dict]) -> list:
    """Markdown lines: per variant, the last epoch's validation top-1 per exit, mean ± sd over seeds. The held-out
    split is where settings are chosen (the test table is for reporting); the learned-weight methods also fit
    their weights to it, so it flatters them against the baselines, but not one such variant against another."""
    rows = [{"variant": variant(n), "run": n, "exit": k + 1, "top1": 100 * v}
            for n, last in last_epochs.items() for k, v in enumerate(last["val_top1"])]
    val = pd.DataFrame(rows)
    per_seed = val.groupby(["variant", "run"]).top1.mean()
    table = per_exit_cells(val)
    table["mean over exits"] = per_seed.groupby(level=0).agg(mean_sd)
    return ["", "Per-exit validation top-1 (%) after the last epoch, mean ± sd over seeds (the held-out split on "
                "which settings are chosen; learned-weight methods also fit their weights to it):", "",
            table.rename_axis("run").reset_index().to_markdown(index=False, disable_numparse=True)]


def held_out_means(last_epochs: Dict[str, dict]) -> Dict[str, float]:
    """Per variant, the last epoch's validation top-1 (%) averaged over exits and seeds: where settings, such as
    a method's learning rate, are chosen."""
    per_run = pd.Series({n: 100 * float(np.mean(last["val_top1"])) for n, last in last_epochs.items()})
    # rounded: equal accuracies tie (a protocol's tie rule decides), whatever order the floats were summed in
    return per_run.groupby(per_run.index.map(variant)).mean().round(9).to_dict()


def temperature_rows(last_epochs: Dict[str, dict]) -> list:
    """Markdown lines: per variant whose runs anneal a temperature (DBT), its value after the last epoch: the
    median over seeds (a protocol may fix another method's temperature at it), min and max."""
    final = pd.Series({n: last["temperature"] for n, last in last_epochs.items() if "temperature" in last})
    if final.empty:
        return []
    table = final.groupby(final.index.map(variant)).agg(["count", "median", "min", "max"])
    table = table.map(lambda v: f"{v:.2f}").assign(count=table["count"].astype(int))
    return ["", "Temperature after the last epoch (DBT's annealing rule), over seeds:", "",
            table.rename(columns={"count": "seeds"}).rename_axis("run").reset_index()
            .to_markdown(index=False, disable_numparse=True)]


def fit_reached(rows) -> str:
    """The last epoch's training top-1 (%) of the first and the last exit: whether the run fit its data (the
    training batches are augmented and the network is in train mode, so this is a slight underestimate)."""
    first, last = rows[-1]["train_top1"][0], rows[-1]["train_top1"][-1]
    return f"{100 * first:.1f} / {100 * last:.1f}"


def weight_learning_runs(records: dict) -> dict:
    """The runs whose loss weights learned: a learned-weight method, not frozen (at its start or at another
    run's weights); their weights get a table and a figure."""
    return {n: r for n, r in records.items()
            if r["config"]["method"] in objectives.LEARNED and not r["config"].get("freeze_weights_from")}


def initial_weights(record: dict, num_exits: int) -> Dict[str, float]:
    """The loss weights a run began from, as its objective builds them from its recorded settings."""
    cfg = resume.completed_config(record["config"])
    return objectives.build(cfg.method, num_exits, **cfg.objective_options()).named_weights()


EARLY_STUDENTS = 4  # the protocols' "students 1-4": the early exits whose KD weight their rules read


def kd_weight_per_student(weights: dict, num_exits: int) -> np.ndarray:
    """Each student exit's KD weights summed over its teachers (exits 1 .. K-1), as recorded: loss scale included."""
    matrix = objectives.weight_matrix(weights, num_exits)
    return np.nansum(np.triu(matrix, 1), axis=1)[:-1]


def students_kd_rows(final: dict, start: dict, num_exits: int) -> list:
    """Markdown lines: per run, each student's KD weight at the end, and the mean over students 1-4 at the end,
    at the start and as a fraction of the start (the quantity the protocols' "keeps distillation" rules read).
    final: run -> its learned weights; start: run -> the weights it began from."""
    rows = []
    for run, weights in final.items():
        end, begin = kd_weight_per_student(weights, num_exits), kd_weight_per_student(start[run], num_exits)
        early_end, early_start = end[:EARLY_STUDENTS].mean(), begin[:EARLY_STUDENTS].mean()
        rows.append({"run": run, **{f"exit {i + 1}": f"{v:.3f}" for i, v in enumerate(end)},
                     f"students 1-{EARLY_STUDENTS}": f"{early_end:.3f}", "start": f"{early_start:.3f}",
                     "end / start": f"{early_end / early_start:.0%}"})
    return ["", "Students' KD weight at the end of each run (per student exit, its KD weights summed over its "
                "teachers, as recorded: loss scale included):", "",
            pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)]


def summarize(study: Study, epochs_full: int = 300) -> str:
    """Markdown section for one study: per-exit test top-1 (mean and spread over seeds), per-seed means, paired
    differences and their tests, validation accuracy, learned weights, and per run its device, torch version,
    epoch time and command; then the study's NOTES.md."""
    runs, curves = study.load()
    if runs.empty:
        raise ValueError(f"no runs recorded in {study.path}: train some with python -m hdkdlib.study first")
    table = per_exit(runs)
    records = {n: study.record(runs, n) for n in runs["run"]}
    epochs = {n: study.metrics(curves, n) for n in records}
    exits = sorted(table.exit.unique())
    percent = table.assign(top1=100 * table.top1)
    acc = percent.groupby(["variant", "exit"]).top1.agg(["mean", "count"])
    out = [f"## {study.name}", ""]
    per_exit_table = per_exit_cells(percent)
    per_exit_table.insert(0, "seeds", acc["count"].groupby(level=0).first().astype(int))
    per_exit_table["mean"] = acc["mean"].groupby(level=0).mean().map(lambda v: f"{v:.2f}")
    out += ["Per-exit test top-1 (%), mean ± standard deviation over seeds:", "",
            per_exit_table.rename_axis("run").reset_index().to_markdown(index=False, disable_numparse=True)]
    out += per_seed_rows(table)
    last = {n: rows[-1] for n, rows in epochs.items()}
    out += paired_differences(table, held_out=held_out_means(last))
    out += validation_rows(last)
    out += temperature_rows(last)
    learned = weight_learning_runs(records)
    for name in sorted({variant(n) for n in learned}):
        mats = [objectives.weight_matrix(r["weights"], len(exits)) for n, r in learned.items() if variant(n) == name]
        matrix = pd.DataFrame(np.mean(mats, axis=0), index=pd.Index(exits, name="exit"), columns=exits)
        seeds = f"mean over {len(mats)} seeds" if len(mats) > 1 else "one seed"
        out += ["", f"Final learned weights of {name} ({seeds}): row = student exit, "
                    "diagonal = its CE weight, column j > row = weight of KD from exit j:", "",
                matrix.map(lambda v: "" if np.isnan(v) else f"{v:.3f}").reset_index().to_markdown(index=False, disable_numparse=True)]
    if learned:
        starts = {n: initial_weights(r, len(exits)) for n, r in learned.items()}
        out += students_kd_rows({n: r["weights"] for n, r in learned.items()}, starts, len(exits))
    per_run = []
    for name, r in records.items():
        rows = epochs[name]
        epoch = _median([row["epoch_seconds"] for row in rows])
        commit = r["commit"]
        per_run.append({"run": name, "device": r["device"], "torch": r["torch"], "at once": r.get("at_once", "?"),
                        "epochs": len(rows), "epoch": f"{epoch:.1f} s",
                        "train wall": f"{sum(row['epoch_seconds'] for row in rows) / 60:.1f} min",
                        f"{epochs_full} epochs": f"{epoch * epochs_full / 3600:.2f} h",
                        "images/s": f"{_median([row['images_per_s'] for row in rows]):.0f}",
                        "train top-1 (first / last exit)": fit_reached(rows),
                        "commit": commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")})
    out += ["", f"Per run (epoch: median epoch wall time, training only; at once: runs that shared the device; "
                f"{epochs_full} epochs: the epoch time {epochs_full} times):", "",
            pd.DataFrame(per_run).to_markdown(index=False, disable_numparse=True)]
    out += ["", "Commands (the study's, each with the runs it trained; then each run's own):", "", "```"]
    invocations: Dict[tuple, List[str]] = {}
    for name, r in records.items():
        if r.get("invocation"):
            invocations.setdefault((r.get("started", ""), r["invocation"]), []).append(name)
    out += [f"{command}    # {started}: {', '.join(names)}" for (started, command), names in sorted(invocations.items())]
    for name, r in records.items():
        out.append(f"python -m hdkdlib.train {' '.join(config.to_argv(resume.completed_config(r['config'])))}")
    out += ["```", "", f"Figures: `python -m hdkdlib.study --name {study.name} --figures` (never committed).", ""]
    notes = study.path / "NOTES.md"
    if notes.exists():  # the hand-written reading of these numbers
        out += ["### Observations", "", records_text(notes).strip(), ""]
    return "\n".join(out)


def index(studies: List[Study]) -> str:
    """results/README.md: one line per study (its runs, variants and seeds) with links to its files."""
    lines = ["# Results on real data", "",
             "One folder per study: its protocol (PROTOCOL*.md, written before its runs), the reading (NOTES.md),",
             "the records (runs.csv: a row per run; curves.csv.gz: a row per run and epoch) and SUMMARY.md, which",
             "`python -m hdkdlib.study --summarize-only --name <study>` computes from the records alone (never",
             "images or weights; `--figures` draws the figures). Studies run before 2026-12-05 were trained by",
             "`benchmarks/verify_real_data.py` (their protocols name it), which kept run folders; their records were",
             "made from those folders by `--merge-from`, and every table of their summaries came out unchanged.", "",
             "| study | runs | variants (seeds) | files |", "|---|---|---|---|"]
    for study in studies:
        runs = study.runs()
        seeds = runs.groupby("variant").seed.nunique()
        protocols = sorted(p.name for p in study.path.glob("PROTOCOL*.md"))
        files = ", ".join(f"[{n}]({study.name}/{n})" for n in ["SUMMARY.md", "NOTES.md", *protocols]
                          if (study.path / n).exists())
        lines.append(f"| {study.name} | {len(runs)} | {', '.join(f'{v} ({k})' for v, k in seeds.items())} | {files} |")
    return "\n".join(lines) + "\n"
