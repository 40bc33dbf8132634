"""Settings, recipes and the command line: one source of values for Python, the CLI and the notebooks."""
import dataclasses
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from hdkdlib.config import RECIPES, TrainConfig, argparser, config_from_dict, config_to_dict, to_argv
from hdkdlib.resume import LEGACY_VALUES, stored_config


def _cli_config(argv):
    """The TrainConfig the training CLI builds from argv (without training)."""
    from hdkdlib.train import _parser
    given = {k: v for k, v in vars(_parser(argv).parse_args(argv)).items()
             if v is not None and k not in ("resume", "no_eval", "debug")}
    return config_from_dict(given)


def test_python_and_cli_get_the_same_recipe():
    py = TrainConfig(dataset="folder")
    assert (py.batch_size, py.epochs, py.lr_milestones, py.arch) == (256, 90, (30, 60), "msdnet_imagenet_step4")
    assert _cli_config(["--dataset", "folder"]) == py.validate()
    cifar = TrainConfig()
    assert (cifar.batch_size, cifar.epochs, cifar.arch, cifar.nesterov) == (64, 300, "msdnet_cifar_anytime", False)
    assert _cli_config([]) == cifar.validate()
    paper = TrainConfig(recipe="paper_cifar")
    assert (paper.batch_size, paper.arch) == (128, "msdnet_cifar_dbt11")
    dbt = TrainConfig(recipe="dbt_cifar", batch_size=32)  # a given value beats the recipe
    assert (dbt.nesterov, dbt.n_per_class, dbt.val_per_class, dbt.batch_size) == (True, 450, 50, 32)
    assert _cli_config(["--recipe", "dbt_cifar", "--batch-size", "32"]) == dbt.validate()


def test_help_states_the_recipe_that_will_be_used():
    out = subprocess.run([sys.executable, "-m", "hdkdlib.train", "--dataset", "folder", "--help"],
                         capture_output=True, text=True, check=True).stdout
    flat = " ".join(out.split())
    assert "recipe imagenet" in flat
    assert "images per step and process (recipe) (default [recipe]: 256)" in flat
    assert "(default [recipe]: 'msdnet_imagenet_step4')" in flat
    cifar = " ".join(subprocess.run([sys.executable, "-m", "hdkdlib.train", "--help"], capture_output=True,
                                    text=True, check=True).stdout.split())
    assert "(default [recipe]: 64)" in cifar and "recipe msdnet_cifar" in cifar
    for f in dataclasses.fields(TrainConfig):  # every option explained
        assert f.metadata["help"] and ("--" + f.name.replace("_", "-")) in cifar


def test_help_shows_the_settings_in_sections_each_setting_once():
    from hdkdlib.config import OPTION_GROUPS, argparser
    grouped = [n for names in OPTION_GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(TrainConfig))  # each exactly once
    text = argparser().format_help()
    starts = [text.index(f"\n{title}:\n") for title in OPTION_GROUPS]
    assert starts == sorted(starts)  # the sections in order, each holding its own options
    for (title, names), start, end in zip(OPTION_GROUPS.items(), starts, starts[1:] + [len(text)]):
        section = text[start:end]
        assert all(re.search(rf"--{n.replace('_', '-')}(?![\w-])", section) for n in names), title


def test_to_argv_round_trips_through_the_parser():
    for cfg in (TrainConfig(dataset="folder", method="dbt", lr_milestones=(5, 9), threads=1).validate(),
                TrainConfig(recipe="dbt_cifar", nesterov=False, meta_schedule="fixed", meta_lr=0.01).validate(),
                TrainConfig(dataset="folder", lr_schedule="cosine", method="ce").validate()):
        assert _cli_config(to_argv(cfg)) == cfg


def test_unknown_recipe_and_bad_values_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown recipe 'paper'; valid: msdnet_cifar, paper_cifar"):
        TrainConfig(recipe="paper")
    cases = {"meta_traverse": (0.0, r"meta_traverse must lie in \(0, 1\]"),
             "meta_lr": (-1.0, "meta_lr .* must be > 0"),
             "meta_schedule": ("cosine", "unknown meta_schedule 'cosine'; valid: per_run, fixed"),
             "hypergrad_norm": ("grad", "unknown hypergrad_norm 'grad'; valid: lr, none"),
             "alpha": (5.0, r"alpha must lie in \[0, 1\]"),
             "temperature": (-1.0, "temperature must be > 0"),
             "min_init_weight": (0.0, r"min_init_weight must lie in \(0, 1\]"),
             "threads": (-2, r"threads must lie in \[0, 1024\]")}
    cases["threads"] = (10 ** 9, r"threads must lie in \[0, 1024\]")  # the OS refuses them, after the data loaded
    for name, (value, message) in cases.items():
        extra = {"meta_schedule": "fixed"} if name == "meta_lr" else {}
        with pytest.raises(ValueError, match=message):
            TrainConfig(**{name: value}, **extra).validate()
    with pytest.raises(ValueError, match=r"threads must lie in \[0, 1024\]"):
        TrainConfig(threads=-2).validate()
    with pytest.raises(ValueError, match="meta_lr 0.01 is used only with meta_schedule 'fixed'"):
        TrainConfig(meta_lr=0.01).validate()
    # a hand-edited config.json: wrong types are one ValueError line, never a TypeError traceback
    for values, message in (({"lr_milestones": 30}, "lr_milestones must be a list of epochs, got 30"),
                            ({"recipe": ["imagenet"]}, r"recipe must be a name \(text\), got \['imagenet'\]"),
                            ({"dataset": {"x": 1}}, "dataset must be a name"),
                            ({"lr_milestones": ["a"]}, "lr_milestones must be")):
        with pytest.raises(ValueError, match=message):
            config_from_dict(values)


def test_stored_configs_of_older_runs_keep_their_behaviour():
    """A config.json written before the weight-dynamics settings existed resumes as it trained."""
    old = {k: v for k, v in dataclasses.asdict(TrainConfig()).items()
           if k not in ("meta_schedule", "hypergrad_norm", "nesterov", "recipe")}
    filled = stored_config(old)
    assert (filled["meta_schedule"], filled["hypergrad_norm"], filled["nesterov"]) == ("fixed", "none", False)
    assert config_from_dict(filled).meta_lr == 1e-3
    assert set(LEGACY_VALUES) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_argparser_defaults_are_none_so_only_given_values_override():
    args = vars(argparser().parse_args(["--epochs", "3"]))
    assert args["epochs"] == 3 and all(v is None for k, v in args.items() if k != "epochs")
    assert set(RECIPES) == {"msdnet_cifar", "paper_cifar", "dbt_cifar", "imagenet", "finetune"}


@pytest.mark.parametrize("name, value, message", [
    ("lr", float("nan"), "lr must be a finite number, got nan"),
    ("lr", float("inf"), "lr must be a finite number, got inf"),
    ("momentum", float("nan"), "momentum must be a finite number"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("weight_decay", float("-inf"), "weight_decay must be a finite number"),
    ("momentum", 1.0, r"momentum must lie in \[0, 1\)"),
    ("momentum", -0.1, r"momentum must lie in \[0, 1\)"),
    ("weight_decay", -1e-4, "weight_decay must be >= 0"),
    ("workers", -1, r"workers must be >= 0 \(0: load in the main process\), got -1"),
])
def test_numbers_that_parse_but_make_no_sense_are_refused_before_anything_runs(name, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{name: value}).validate()


@pytest.mark.parametrize("name, value, message", [
    ("epochs", "2", "epochs must be a whole number, got '2'"),
    ("epochs", 2.5, "epochs must be a whole number, got 2.5"),  # else range(2.5) fails, or 3 epochs train
    ("batch_size", True, "batch_size must be a whole number, got True"),
    ("lr", "0.1", "lr must be a number, got '0.1'"),
    ("nesterov", "yes", "nesterov must be true or false, got 'yes'"),
    ("lr_milestones", [1.5, 3], r"lr_milestones must be a list of whole numbers, got \(1.5, 3\)"),
    ("arch", 7, "arch must be text, got 7"),
])
def test_settings_of_the_wrong_type_are_refused_by_name(name, value, message):
    """A hand-edited config.json (or JSON parameters) reaches the settings without argparse's types."""
    with pytest.raises(ValueError, match=message):
        config_from_dict({name: value})
    assert config_from_dict({"epochs": np.int64(3), "lr": 1, "lr_milestones": [1, 2]}).epochs == 3  # numbers are


def test_cli_refuses_nan_before_writing_the_run_folder(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "hdkdlib.train", "--dataset", "synthetic", "--arch", "toy_mlp",
                             "--lr", "nan", "--out", str(out), "--device", "cpu"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "hdkdlib.train: error: lr must be a finite number, got nan"]
    assert not out.exists()


@pytest.mark.parametrize("flags, line", [
    (["--method", "hdkd", "--weight-bound", "0.3"],
     "--weight-bound changes nothing in this run (it bounds learned weights under --weight-map bounded): drop it"),
    (["--method", "ce", "--meta-interval", "3"],
     "--meta-interval changes nothing in this run (ce's loss weights are not learned): drop it"),
    (["--method", "hdkd", "--meta-schedule", "fixed", "--meta-traverse", "0.5"],
     "--meta-traverse changes nothing in this run (it applies with --meta-schedule per_run): drop it"),
    (["--heads-reset", "all"], "--heads-reset changes nothing in this run (it applies with --train-heads-only): drop it"),
    # every such flag at once, and the reason that holds: ce learns no weights, bounded or not
    (["--method", "ce", "--weight-map", "bounded", "--weight-bound", "0.5", "--init", "dbt"],
     "--init, --weight-map and --weight-bound change nothing in this run (ce's loss weights are not learned): "
     "drop them"),
    (["--method", "hdkd", "--meta-schedule", "fixed", "--meta-traverse", "0.5", "--heads-reset", "all"],
     "--heads-reset changes nothing in this run (it applies with --train-heads-only); --meta-traverse changes "
     "nothing in this run (it applies with --meta-schedule per_run): drop them"),
])
def test_cli_refuses_a_setting_that_changes_nothing_before_writing_the_run_folder(tmp_path, capsys, flags, line):
    """A flag that cannot count means a missing one beside it (--weight-map bounded, a learned method): taking it
    silently would record a run that did not do what was asked."""
    from hdkdlib import train
    out = tmp_path / "run"
    code = train.main(["--dataset", "synthetic", "--arch", "toy_mlp", *flags, "--out", str(out), "--device", "cpu"])
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [f"hdkdlib.train: error: {line}"]
    assert not out.exists()


def test_to_argv_leaves_out_the_settings_that_change_nothing_and_the_cli_takes_it():
    """A record's former default (meta_traverse 0.25 under the fixed schedule, heads_reset "all" without a second
    stage) changes nothing in its run: the flags that rebuild it leave them out, so the CLI does not refuse them."""
    from hdkdlib import train
    cfg = TrainConfig(dataset="synthetic", arch="toy_mlp", method="hdkd", meta_schedule="fixed", meta_lr=0.01,
                      meta_traverse=0.25, heads_reset="all", weight_bound=0.5).validate()
    argv = to_argv(cfg)
    assert "--meta-traverse" not in argv and "--heads-reset" not in argv and "--weight-bound" not in argv
    assert argv[argv.index("--meta-lr") + 1] == "0.01"
    args = {k: v for k, v in vars(train._parser(argv).parse_args(argv)).items()
            if v is not None and k not in ("resume", "no_eval", "debug")}
    rebuilt = config_from_dict(args)
    assert {k for k in config_to_dict(cfg) if getattr(rebuilt, k) != getattr(cfg, k)} == {
        "meta_traverse", "heads_reset", "weight_bound"}


def test_info_is_quiet_on_a_closed_pipe_and_bounds_the_classes():
    piped = subprocess.run(f"{sys.executable} -m hdkdlib info msdnet_cifar_anytime --json | head -c 1",
                           shell=True, capture_output=True, text=True)
    assert piped.stdout == "[" and piped.stderr == ""
    # a reader that is gone before the first line (the child needs seconds to import torch): EPIPE on write
    proc = subprocess.Popen([sys.executable, "-m", "hdkdlib", "info", "toy_mlp"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait() == 141 and stderr == "", stderr
    big = subprocess.run([sys.executable, "-m", "hdkdlib", "info", "toy_mlp", "--num-classes", "1000000"],
                         capture_output=True, text=True)
    assert big.returncode == 2 and r"--num-classes must lie in [1, 100,000]" in big.stderr


def test_optimizer_schedule_and_weights_options():
    cosine = TrainConfig(recipe="finetune", epochs=10, warmup_epochs=2, lr=1.0).validate()
    assert cosine.optimizer == "adamw" and cosine.weight_decay == 0.05
    # warm-up: lr (e + 1) / (w + 1); then 0.5 (1 + cos(pi (e - w) / (E - w)))
    assert [round(cosine.lr_at(e), 6) for e in (0, 1, 2, 6, 9)] == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 0.5,
                                                                    round(0.5 * (1 + math.cos(math.pi * 7 / 8)), 6)]
    step = TrainConfig(epochs=8).validate()
    assert (step.optimizer, step.lr, step.weight_decay, step.lr_schedule) == ("sgd", 0.1, 1e-4, "step")
    assert [step.lr_at(e) for e in (3, 4, 6)] == [0.1, pytest.approx(0.01), pytest.approx(0.001)]
    # the default drops at 50% and 75%: none lands on epoch 0 or twice on one epoch in a short run
    for epochs, lrs in ((1, [0.1]), (2, [0.1, 0.01]), (3, [0.1, 0.01, 0.001]), (4, [0.1, 0.1, 0.01, 0.001])):
        short = TrainConfig(epochs=epochs).validate()
        assert [short.lr_at(e) for e in range(epochs)] == pytest.approx(lrs), epochs
    cases = [(dict(beta1=0.8), "beta1 and beta2 are AdamW options: add optimizer adamw"),
             (dict(lr_schedule="cosine", lr_milestones=(3,)), "lr_milestones and lr_gamma are options of the step "
                                                              "schedule \\(cosine ignores them\\)"),
             (dict(lr_schedule="cosine", lr_gamma=0.5), "lr_milestones and lr_gamma are options of the step schedule"),
             (dict(cuda_graphs="on", compile="step"), "cuda_graphs on and compile step exclude each other"),
             (dict(optimizer="adamw", momentum=0.5), "momentum and nesterov are SGD options"),
             (dict(dataset="folder", lr_schedule="cosine", lr_milestones=(30,)), "lr_milestones and lr_gamma are"),
             (dict(recipe="dbt_cifar", optimizer="adamw", nesterov=True), "momentum and nesterov are SGD options"),
             (dict(method="ce", temperature=3.0), r"temperature applies to the methods with distillation \(dbt, "
                                                   r"imta_kd, dkd, hdbt, hdkd\), not ce: drop it"),
             (dict(method="hmsdnet", temperature=3.0), "temperature applies .* not hmsdnet"),
             (dict(optimizer="adam"), "unknown optimizer 'adam'; valid: sgd, adamw"),
             # misspelt names, whatever the method (before: found when the Trainer was built, or never for ce)
             (dict(method="ce", val_loss="balance"), "unknown val_loss 'balance'; valid: ce, balanced"),
             (dict(init="dtb"), "unknown init 'dtb'; valid: dbt, ds, uniform, random"),
             (dict(method="dbt", weight_map="softmx"), "unknown weight_map 'softmx'; valid: softmax, softplus"),
             (dict(method="ce", meta_method="fd"), "unknown meta_method 'fd'; valid: exact, finite_difference"),
             (dict(method="ce", kd_share=0.3), "kd_share applies to dbt, hdbt, hdkd, imta_kd, not ce: drop it"),
             (dict(method="dbt", kd_share=1.0), r"kd_share must lie in \(0, 1\)"),
             (dict(method="hdkd", temperature_growth=1.1), r"are DBT's annealing \(dbt, hdbt\), not hdkd's"),
             (dict(method="dbt", temperature_growth=0.9), "temperature_growth must be >= 1"),
             (dict(method="dbt", temperature_threshold=1.5), r"temperature_threshold lie in \(0, 1\)"),
             # the lr bound holds after the drops too: lr 1e-9 is refused, so is 0.1 x 1e-30 x 1e-30
             (dict(lr_gamma=1e-30), r"lr_gamma 1e-30 takes the lr from 0.1 to 1e-61 by the last milestone"),
             (dict(lr_gamma=1000.0), r"lr_gamma 1000 takes the lr from 0.1 to 100000 by the last milestone"),
             (dict(lr_schedule="linear"), "unknown lr_schedule 'linear'; valid: step, cosine"),
             (dict(train_heads_only=True, heads_reset="stages"),
              "unknown heads_reset 'stages'; valid: classifiers, all"),
             (dict(warmup_epochs=300), r"warmup_epochs must lie in \[0, epochs\), got 300 of 300"),
             (dict(arch="vit_b_16_exits", weights="ViT_B_16_Weights.NOPE"),
              "unknown weights 'ViT_B_16_Weights.NOPE' for vit_b_16; valid: ViT_B_16_Weights.IMAGENET1K_V1"),
             (dict(weights="ResNet18_Weights.IMAGENET1K_V1"), "arch msdnet_cifar_anytime is not a torchvision backbone")]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**options).validate()
    assert TrainConfig(arch="resnet18_exits", weights="ResNet18_Weights.IMAGENET1K_V1").validate().weights
    # the recipe's step milestones and Nesterov give way to a cosine schedule or AdamW chosen over it (given
    # ones are refused above)
    assert TrainConfig(dataset="folder").validate().lr_milestones == (30, 60)
    assert TrainConfig(dataset="folder", lr_schedule="cosine").validate().lr_milestones == ()
    assert TrainConfig(recipe="dbt_cifar").validate().nesterov is True
    assert TrainConfig(recipe="dbt_cifar", optimizer="adamw").validate().nesterov is False


def test_run_folders_from_before_the_optimizer_settings_resume_as_sgd():
    old = {k: v for k, v in dataclasses.asdict(TrainConfig().validate()).items()
           if k not in ("optimizer", "lr_schedule", "warmup_epochs", "beta1", "beta2", "weights")}
    cfg = config_from_dict(stored_config(old))
    assert (cfg.optimizer, cfg.lr_schedule, cfg.warmup_epochs, cfg.lr) == ("sgd", "step", 0, 0.1)


def test_a_seed_beyond_torchs_32_bits_is_one_line_naming_it(tmp_path, capsys):
    """torch's CPU generator keeps 32 bits of a seed: seeds 2^32 apart drew the same network and batches, and a
    seed past 64 bits overflowed the epoch generator ((seed + 1) * 1_000_003 + epoch) after the run folder began."""
    from hdkdlib.config import MAX_SEED
    from hdkdlib.data.order import epoch_generator
    from hdkdlib.train import main
    out = tmp_path / "run"
    same = [torch.randn(3, generator=torch.Generator().manual_seed(s)) for s in (7, 7 + 2 ** 32)]
    assert torch.equal(*same)  # why the bound: 32 bits of a seed count
    for seed in (10 ** 20, MAX_SEED + 1, -1):
        assert main(["--dataset", "synthetic", "--arch", "toy_mlp", "--epochs", "1", "--device", "cpu",
                     "--no-progress", "--seed", str(seed), "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"hdkdlib.train: error: seed must lie in [0, 4294967295] (torch's generator keeps 32 bits of it), "
            f"got {seed}"]
    assert not out.exists()
    for seed in (0, MAX_SEED):  # the bounds themselves: validated, and their generators drawn
        TrainConfig(seed=seed).validate()
        for s in (seed, seed + 1):
            epoch_generator(s, 10 ** 9)


def test_the_baselines_kd_share_and_annealing_reach_their_objectives():
    """IMTA's ImageNet recipe (g = 0.1) and DBT's C and annealing are settings of a run, not only of the Python
    objective: each reaches the objective's weights and temperature rule."""
    from hdkdlib import objectives
    imta = TrainConfig(method="imta_kd", kd_share=0.1, temperature=1.0).validate()
    assert imta.objective_options() == {"temperature": 1.0, "gamma": 0.1}
    w = objectives.build("imta_kd", 3, **imta.objective_options()).named_weights()
    assert w["ce1"] == pytest.approx(0.9) and w["kd1<-3"] == pytest.approx(0.1) and w["ce3"] == 1.0
    dbt = TrainConfig(method="dbt", kd_share=0.3, temperature_growth=1.1, temperature_threshold=0.6).validate()
    obj = objectives.build("dbt", 3, **dbt.objective_options())
    w = {k: v / obj.scale for k, v in obj.named_weights().items()}  # DBT's whole loss x 2*5/K aside
    assert w["ce1"] == pytest.approx(0.7) and w["kd1<-3"] == pytest.approx(0.3)
    assert (obj.growth, obj.threshold) == (pytest.approx(1.1), pytest.approx(0.6))
    assert TrainConfig(method="dbt").objective_options() == {}  # 0: the objective's own defaults
    hdbt = objectives.build("hdbt", 3, **TrainConfig(method="hdbt", temperature_growth=1.2, kd_share=0.2)
                            .validate().objective_options())  # learned weights: annealed too, and start from C
    assert hdbt.growth == pytest.approx(1.2)
    w = {k: v / hdbt.scale for k, v in hdbt.named_weights().items()}
    assert w["ce1"] == pytest.approx(0.8, abs=1e-6) and w["kd1<-3"] == pytest.approx(0.2, abs=1e-6)
