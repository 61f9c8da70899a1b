"""Training end to end on synthetic faces: accuracy, files, exact resume, early stopping, errors."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import dataset
import run
import synthetic
import train
import checkpoint
from utils import UserError, amp_dtype_for, atomic_write, eval_batch_size, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def faces_csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return synthetic.write_synthetic_csv(str(folder / "faces.csv"), n_train=1600, n_val=400,
                                         n_test=400, seed=1)


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return synthetic.write_synthetic_csv(str(folder / "tiny.csv"), n_train=192, n_val=64,
                                         n_test=64, seed=2)


def run_args(csv, tmp_path, *extra):
    return ["-d", csv, "--checkpoint_dir", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"),
            "--pretrained", "no", "--num_save", "0", "--run_name", "r", *extra]


def test_short_run_learns_synthetic_faces_and_writes_everything(faces_csv, tmp_path):
    # The synthetic demo's settings: random erasing off (it hides the mouth that carries most of
    # the expression), AdamW, which learns these faces fastest (84% after 6 epochs when measured).
    assert run.main(run_args(faces_csv, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "6",
                             "--batch_size", "64", "--optimizer", "adamw", "--erase_p", "0")) == 0
    ckpt_dir, out = tmp_path / "ckpt" / "r", tmp_path / "out" / "r"
    assert sorted(os.listdir(ckpt_dir)) == ["vgg2_0_2_best.pth", "vgg2_0_2_last.pth"]
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert (out / "history.csv").read_text().count("\n") == 7
    for name in ("curves.png", "class_distribution.png", "args.json", "test/metrics.json"):
        assert (out / name).stat().st_size > 0, name
    test = json.loads((out / "test" / "metrics.json").read_text())
    assert test["n"] == 400 and os.path.exists(out / "test" / "confusion_matrix.png")
    assert test["accuracy"] > 0.60, test  # chance is 1/7, the majority class 25%


def final_weights(path):
    """The trained weights and their moving average, as one dict."""
    ckpt = torch.load(path, weights_only=True)
    return {**ckpt["model_state"], **{f"ema.{k}": v for k, v in ckpt["ema_state"].items()}}


@pytest.mark.parametrize("batch, stopped_at, extra", [
    (2, 9, []), (1, 8, []),
    (2, 9, ["--teacher", os.path.join(ROOT, "pretrained", "fer2013_vgg2_0_2.pth")]),  # distillation
    (2, 9, ["--mixup", "0.4", "--teacher", os.path.join(ROOT, "pretrained", "fer2013_vgg2_0_2.pth")]),
    (2, 9, ["--teacher", "fold0.pth", "fold1.pth"])])  # made below: each labels the fold it held out
def test_interrupted_and_resumed_run_ends_with_identical_weights(tiny_csv, tmp_path, monkeypatch, fold_teacher,
                                                                 batch, stopped_at, extra):
    shipped = os.path.join(ROOT, "pretrained", "fer2013_vgg2_0_2.pth")
    extra = [fold_teacher(shipped, tmp_path / name, int(name[4]), 2, tiny_csv) if name.startswith("fold")
             else name for name in extra]
    common = ["-m", "vgg2_0_2", "--epoch_num", "3", "--batch_size", "32",
              "--num_iter_to_validate", "4", "--seed", "3", *extra]
    straight = tmp_path / "straight"
    assert run.main(run_args(tiny_csv, straight, *common)) == 0

    # Second run: a real SIGINT arrives during a step of epoch 2, as a Ctrl-C would: batch 2 (step
    # 9, not a validation step), or batch 1, the step that ends at the validation of step 8, which
    # must still happen before the stop (the resumed run starts past it).
    real = train.batch_generator

    def interrupt_once(seed, epoch, batch_):
        if (epoch, batch_) == (1, batch) and not interrupt_once.fired:
            interrupt_once.fired = True
            signal.raise_signal(signal.SIGINT)
        return real(seed, epoch, batch_)
    interrupt_once.fired = False
    monkeypatch.setattr(train, "batch_generator", interrupt_once)
    resumed = tmp_path / "resumed"
    assert run.main(run_args(tiny_csv, resumed, *common)) == 130
    last = resumed / "ckpt" / "r" / "vgg2_0_2_last.pth"
    assert torch.load(last, weights_only=True)["train_state"]["step"] == stopped_at
    assert run.main(["--checkpoint", str(last), "-o", str(resumed / "out")]) == 0

    a, b = final_weights(straight / "ckpt/r/vgg2_0_2_last.pth"), final_weights(last)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = (json.loads((root / "out/r/history.json").read_text()) for root in (straight, resumed))
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [4, 8, 12, 16, 18]
    for ra, rb in zip(rows_a, rows_b):
        # Every number repeats, except the training loss over the steps the interruption split.
        same = [k for k in ra if k != "time" and not (k.startswith("train_") and ra["step"] == 12)]
        assert {k: ra[k] for k in same} == {k: rb[k] for k in same}


def test_fine_tuning_starts_a_new_run_from_the_weights(tiny_csv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # fine-tuning runs go to ./checkpoint/
    assert run.main(run_args(tiny_csv, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "1")) == 0
    source = tmp_path / "ckpt" / "r" / "vgg2_0_2_best.pth"
    out = tmp_path / "tuned"
    argv = ["-d", tiny_csv, "-m", "vgg2_0_2", "--checkpoint", str(source), "-o", str(out),
            "--epoch_num", "1", "--run_name", "t", "--num_save", "0", "--lr", "1e-9", "--erase_p", "0"]
    assert run.main(argv) == 0
    tuned = torch.load(tmp_path / "checkpoint" / "t" / "vgg2_0_2_last.pth", weights_only=True)
    progress = tuned["train_state"]
    assert progress["step"] == 2 and len(progress["history"]) == 1  # a new run: its own step count
    start = final_weights(source)  # fine-tuning starts from the averaged weights that were selected
    assert torch.allclose(tuned["model_state"]["classifier.4.weight"], start["ema.classifier.4.weight"], atol=1e-5)


def test_early_stopping_stops_after_patience_bad_validations(tiny_csv, tmp_path):
    assert run.main(run_args(tiny_csv, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "30",
                             "--batch_size", "32", "--num_iter_to_validate", "2",
                             "--patience", "2", "--lr", "0.05", "--scheduler", "none")) == 0
    history = json.loads((tmp_path / "out/r/history.json").read_text())
    losses = [h["val_loss"] for h in history]
    assert len(history) < 30 * 6 // 2  # stopped early
    best = int(np.argmin(losses))
    assert best == len(losses) - 3  # the best, then exactly `patience` validations without a better one
    assert min(losses[-2:]) >= losses[best]


def test_train_state_counts_bad_validations():
    state = checkpoint.TrainState()
    assert [state.record(s, "acc") for s in (0.5, 0.6, 0.6, 0.55)] == [True, True, False, False]
    assert state.bad_validations == 2 and state.best_score == 0.6
    loss = checkpoint.TrainState()
    assert [loss.record(s, "loss") for s in (1.0, 0.9, 0.95, 0.8)] == [True, True, False, True]
    assert loss.bad_validations == 0 and loss.best_score == 0.8


def test_weighted_loss_uses_inverse_class_frequency():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1 + [4] * 2)  # class 3, 5, 6 absent
    weights = train.class_weights(labels).numpy()
    present = weights[[0, 1, 2, 4]]
    assert np.allclose(present.mean(), 1.0)
    assert np.allclose(present * np.array([6, 3, 1, 2]), present[0] * 6)  # w ~ 1 / count
    assert np.all(weights[[3, 5, 6]] == 0)


def test_a_chart_that_cannot_be_drawn_is_a_warning_not_a_failure(tiny_csv, tmp_path, monkeypatch,
                                                                  capsys):
    def broken(counts, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(dataset, "plot_class_distribution", broken)
    assert run.main(run_args(tiny_csv, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "1")) == 0
    err = capsys.readouterr().err
    assert "warning: could not draw" in err and "class_distribution.png" in err
    assert "Traceback" not in err
    assert (tmp_path / "out" / "r" / "test" / "metrics.json").exists()


def test_weighted_run_prints_the_weights(tiny_csv, tmp_path, capsys):
    assert run.main(run_args(tiny_csv, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "1", "--wl")) == 0
    assert "class weights (inverse frequency, mean 1): Angry" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--patience", "0"], "--patience must be at least 1"),
    (["--epoch_num", "0"], "--epoch_num must be positive"),
    (["--label_smoothing", "1.5"], "--label_smoothing must be in"),
    (["--mixup", "-0.2"], "--mixup must be 0 or more"),
])
def test_impossible_values_fail_before_any_work(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(run.main, ["-d", str(tmp_path / "missing.csv"), *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "no dataset" not in err


@pytest.mark.parametrize("flags, batch", [
    (["-m", "vgg2_4_ilrb_2"], 128),
    (["-m", "vgg2_4_ilrb_2", "--batch_size", "32"], 32),
])
def test_training_batch_size_default_and_flag(flags, batch):
    args, _, _ = run.resolve_run(run.get_args_parser(), flags)
    assert args.batch_size == batch and args.eval_batch_size is None


@pytest.mark.parametrize("given, device, expected", [
    (None, "cpu", 64), (None, torch.device("cpu"), 64), (None, "cuda:1", 512),
    (None, torch.device("mps"), 512), (7, "cpu", 7), (1024, "cuda", 1024)])
def test_eval_batch_size_defaults_per_device(given, device, expected):
    assert eval_batch_size(given, device) == expected


def test_unknown_model_is_rejected_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(run.main, ["-m", "resnet50"])
    assert exit_.value.code == 2
    assert "vgg2_4_2_conv3" in capsys.readouterr().err


def test_a_mistyped_model_gets_one_line_with_the_closest_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(run.main, ["-m", "vgg2_4_2_conf3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "did you mean vgg2_4_2_conv3?" in err and len(err.strip().splitlines()) == 1


def test_abbreviated_flags_are_refused_not_silently_dropped_on_resume(capsys):
    with pytest.raises(SystemExit) as exit_:
        run.get_args_parser().parse_args(["--epoch", "5"])
    assert exit_.value.code == 2 and "unrecognized arguments: --epoch" in capsys.readouterr().err


def test_both_spellings_of_every_flag_are_accepted():
    parse = run.get_args_parser().parse_args
    assert parse(["--batch-size", "32", "--epoch-num", "3"]).batch_size == 32
    assert parse(["--weighted-loss"]).wl and parse(["--wl"]).wl
    assert parse(["--num_workers", "2"]).threads == parse(["--threads", "2"]).threads == 2


def test_missing_dataset_is_one_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli(run.main, run_args(str(tmp_path / "none.csv"), tmp_path))
    assert exit_.value.code == 2
    assert "-d synthetic" in capsys.readouterr().err


def test_failed_checkpoint_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model_best.pth"
    atomic_write(path, lambda f: f.write(b"good old checkpoint"))

    def dies_halfway(f):
        f.write(b"half a new chec")
        raise OSError(28, "No space left on device")
    with pytest.raises(UserError, match="is full"):
        atomic_write(path, dies_halfway)
    assert path.read_bytes() == b"good old checkpoint"
    assert os.listdir(tmp_path) == ["model_best.pth"]  # no temporary file left behind


def test_mixup_blends_each_face_with_its_partners_and_keeps_its_own_label_the_larger_part():
    # Face i is filled with the value i and labelled i: a mixed face's value tells its blend.
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 1, 4, 4)
    labels = torch.arange(8)
    mixed, partners, lam = train.mixup(x, labels, torch.Generator().manual_seed(1), 0.4)
    assert 0.5 <= lam <= 1 and sorted(partners.tolist()) == list(range(8))  # a permutation
    assert torch.allclose(mixed[:, 0, 0, 0], lam * labels + (1 - lam) * partners)
    assert (partners != labels).any()  # faces are mixed with others, not with themselves
    again = train.mixup(x, labels, torch.Generator().manual_seed(1), 0.4)
    assert torch.equal(mixed, again[0]) and lam == again[2]  # a pure function of the generator
    lams = [train.mixup(x, labels, torch.Generator().manual_seed(s), 0.4)[2] for s in range(200)]
    assert min(lams) >= 0.5 and 0.7 < sum(lams) / len(lams) < 0.95  # folded Beta(0.4, 0.4): mean ~0.82


def test_a_mixup_run_mixes_every_training_batch_and_says_so(tiny_csv, tmp_path, monkeypatch, capsys):
    alphas, real = [], train.mixup
    monkeypatch.setattr(train, "mixup", lambda *a: alphas.append(a[3]) or real(*a))
    assert run.main(run_args(tiny_csv, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "1",
                             "--batch_size", "32", "--mixup", "0.3")) == 0
    assert alphas == [0.3] * 6  # 192 training faces in batches of 32
    assert "mixup alpha 0.3" in capsys.readouterr().out


def test_batched_augmentation_keeps_shapes_labels_and_range():
    images = torch.randint(0, 256, (16, 1, 48, 48), dtype=torch.uint8)
    args = run.get_args_parser().parse_args([])
    out = train.augment(images, torch.Generator().manual_seed(0), args)
    assert out.shape == (16, 1, 48, 48) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    again = train.augment(images, torch.Generator().manual_seed(0), args)
    assert torch.equal(out, again)  # a pure function of the generator: resume repeats it
    fixed = run.get_args_parser().parse_args(["--max_rotate", "0", "--max_shift", "0", "--scale", "1", "1",
                                              "--erase_p", "0"])
    plain = train.augment(images, torch.Generator().manual_seed(0), fixed)
    flipped = images.flip(-1).float() / 255
    unflipped = images.float() / 255
    same = [torch.allclose(p, a, atol=1e-5) or torch.allclose(p, b, atol=1e-5)
            for p, a, b in zip(plain, unflipped, flipped)]
    assert all(same)  # without the other transforms, each face is itself or its mirror


def test_shards_cover_the_epoch_exactly_once():
    labels = torch.arange(103)
    shards = [dataset.Batches(labels.numpy(), labels.numpy(), 10, seed=5, rank=r, world=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # every rank takes the same number of steps
    seen = torch.cat([torch.cat(s.epoch_indices(4)) for s in shards])
    assert sorted(seen.tolist()) == list(range(103))


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_trains_once_and_agrees(faces_csv, tmp_path):
    """torchrun with 2 CPU processes: one set of files, far above chance."""
    root = ROOT
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), "run.py", *run_args(faces_csv, tmp_path, "-m", "vgg2_0_2",
               "--epoch_num", "4", "--batch_size", "32", "--optimizer", "adamw", "--erase_p", "0",
               "--threads", "1")]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("testing the best checkpoint") == 1  # once, on rank 0
    assert "weights identical on all 2 ranks" in result.stdout
    assert sorted(os.listdir(tmp_path / "ckpt" / "r")) == ["vgg2_0_2_best.pth", "vgg2_0_2_last.pth"]  # lock gone
    history = json.loads((tmp_path / "out" / "r" / "history.json").read_text())
    assert len(history) == 4 and history[-1]["val_acc"] > 0.5
    assert json.loads((tmp_path / "out" / "r" / "test" / "metrics.json").read_text())["n"] == 400


def test_amp_on_a_cpu_trains_in_bf16_when_the_cpu_has_it(tiny_csv, tmp_path, capsys):
    dtype = amp_dtype_for(torch.device("cpu"))
    assert run.main(run_args(tiny_csv, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "2", "--amp",
                             "--optimizer", "adamw", "--erase_p", "0")) == 0
    out = capsys.readouterr().out
    history = json.loads((tmp_path / "out/r/history.json").read_text())
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in history)
    if dtype is None:
        assert "training in fp32" in out and ", fp32, " in out
    else:
        assert dtype == torch.bfloat16 and "training in fp32" not in out
        assert ", bfloat16 autocast, " in out  # the start line says what the run computes in




def test_a_failed_start_leaves_no_folders_behind(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(run.main, run_args(str(tmp_path / "none.csv"), tmp_path))
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


def test_resuming_with_another_epoch_count_says_the_schedule_changes(tiny_csv, tmp_path, capsys):
    assert run.main(run_args(tiny_csv, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "1")) == 0
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    assert run.main(["--checkpoint", str(last), "--epoch_num", "2", "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "--epoch_num 2 (the run was planned for 1)" in out and "learning rate jumps" in out


def test_synthetic_data_gets_its_own_defaults_unless_typed():
    parser = run.get_args_parser()
    args, _, _ = run.resolve_run(parser, ["-d", "synthetic"])
    assert args.epoch_num == run.SYNTHETIC_DEFAULTS["epoch_num"] and args.erase_p == 0
    args, _, _ = run.resolve_run(parser, ["-d", "synthetic", "--erase_p", "0.3", "--epochs", "2"])
    assert args.erase_p == 0.3 and args.epoch_num == 2
    args, _, _ = run.resolve_run(parser, ["-d", "fer.csv"])
    assert args.epoch_num == 50 and args.erase_p == 0.5


def test_fine_tuning_and_resuming_never_fetch_imagenet_weights(tiny_csv, tmp_path, monkeypatch):
    """Both start from weights they already have, so fetching the 507 MB ImageNet prefix would be
    wasted. The stand-in records every call: build_model under --pretrained auto swallows the
    error of a failed fetch, so only the record can tell."""
    import models
    fetched = []

    def offline():
        fetched.append(1)
        raise OSError("offline")
    monkeypatch.setattr(models, "imagenet_prefix_state", offline)
    common = ["-d", tiny_csv, "-m", "vgg2_0_2", "--pretrained", "auto", "--checkpoint_dir", str(tmp_path / "ckpt"),
              "-o", str(tmp_path / "out"), "--epoch_num", "1", "--num_save", "0"]
    assert run.main(common + ["--run_name", "new"]) == 0
    assert fetched == [1]  # a new run does try: the stand-in is the one build_model calls
    fetched.clear()
    source = tmp_path / "ckpt" / "new" / "vgg2_0_2_best.pth"
    assert run.main(common + ["--run_name", "tuned", "--init_from", str(source)]) == 0
    last = tmp_path / "ckpt" / "new" / "vgg2_0_2_last.pth"
    assert run.main(["--checkpoint", str(last), "--epoch_num", "2", "-o", str(tmp_path / "out")]) == 0
    assert fetched == []


def test_help_is_grouped_with_examples_and_one_default_each(capsys):
    with pytest.raises(SystemExit):
        run.get_args_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for group in ("data:", "model:", "optimisation:", "schedule and stopping:", "augmentation",
                  "checkpoints and outputs:", "hardware:", "examples:"):
        assert group in text
    assert "(default: None)" not in text and text.count("vgg2_4_ilrb_2") == 1


def test_a_validation_line_gives_the_epoch_time_and_what_is_left(tiny_csv, tmp_path, capsys):
    assert run.main(run_args(tiny_csv, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "2")) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch 1.00/2:")]
    assert len(lines) == 1 and " s/epoch, " in lines[0] and lines[0].endswith("min to go")
    assert "first training step" not in out  # no developer messages


def test_a_taken_run_name_is_refused_before_any_download(tiny_csv, tmp_path, monkeypatch):
    import models
    fetched = []
    monkeypatch.setattr(models, "imagenet_prefix_state", lambda: fetched.append(1) or {})
    (tmp_path / "ckpt" / "r").mkdir(parents=True)
    (tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth").write_bytes(b"an earlier run")
    argv = [a if a != "no" else "auto" for a in run_args(tiny_csv, tmp_path, "-m", "vgg2_0_2")]
    with pytest.raises(UserError, match="already holds a run; resume it with"):
        run.main(argv)
    assert fetched == []


def test_the_download_message_says_how_to_skip_it(tmp_path, monkeypatch, capsys):
    import torchvision.models
    import models
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torchvision.models.VGG11_BN_Weights, "get_state_dict",
                        lambda self, progress=True: (_ for _ in ()).throw(OSError("offline")))
    model, used = models.build_model("vgg2_0_2", "auto")
    err = capsys.readouterr().err
    assert not used and "downloading the VGG11-BN ImageNet weights" in err and "--pretrained no" in err


@pytest.mark.parametrize("extra", [[], ["--hold_out", "0", "2"]])  # a hold-out run trains on fewer faces
def test_resuming_a_finished_run_says_how_to_go_on_and_tests_nothing_again(tiny_csv, tmp_path, capsys, extra):
    assert run.main(run_args(tiny_csv, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "1", *extra)) == 0
    report_before = (tmp_path / "out" / "r" / "test" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    last = tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth"
    assert run.main(["--checkpoint", str(last), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "already finished all its 1 epochs" in out and "--epoch_num N (more than 1)" in out
    assert (tmp_path / "out" / "r" / "test" / "metrics.json").stat().st_mtime_ns == report_before
    assert not (tmp_path / "out" / "r" / "test_2").exists()
